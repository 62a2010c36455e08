"""FLUX.2 text encoders (specs/flux2.md §7): Qwen3 (klein) and Mistral Small 3.x (dev), streamed, optionally fp8.

Only the decoder layers whose outputs are used are built and loaded: the outputs of layers (9, 18, 27) of Qwen3 /
(10, 20, 30) of Mistral's 40 are captured with forward hooks, so the layers after the last one (and the LM head, and
Mistral's vision tower) are never read from disk. The weights stream tensor by tensor into a model built on the
meta device (``utils.model_loading``); with ``--fp8_text_encoder`` (alias ``--fp8_m3``) the Linear weights of the
decoder layers are stored block-scaled fp8 and computed in bf16 — for both encoders (upstream refuses Mistral 3).
A scaled-fp8 file (ComfyUI's fp8 Qwen3 / Mistral files: fp8 Linear weights with per-tensor scales) keeps its fp8
weights and scales with that flag and is dequantised to the compute dtype while streaming without it. ComfyUI's bare
files (no config.json: ``qwen_3_4b.safetensors``, ``mistral_3_small_flux2_bf16.safetensors``) get the config of the
released encoder their shapes match (``RELEASED_TEXT_CONFIGS``).

Output per prompt: ``(512, 3·hidden)``, the three layer outputs concatenated layer-major, all 512 positions (pads
included, as both references do).
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.flux_2.configs import TEXT_MAX_LENGTH, ModelVersion
from musubi_tuner.modules.fp8_optimization import Fp8Config
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.hf_sources import has_tokenizer_files, single_file_tokenizer
from musubi_tuner.utils.key_mapping import KeyMap
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import load_weights_into_model
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

MISTRAL_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
RELEASED_LAYERS = {"qwen3": 36, "mistral3": 40}
RELEASED_HIDDEN = {"mistral3": (5120,), "qwen3": (2560, 4096)}
KIND_NAMES = {"qwen3": "Qwen3", "mistral3": "Mistral 3 (Mistral-Small-3.x)"}
_MODEL_TYPES = {"qwen3": "qwen3", "mistral3": "mistral3"}
# The config.json facts of the released text encoders (Qwen/Qwen3-4B, Qwen/Qwen3-8B for klein; the text_config of
# mistralai/Mistral-Small-3.2-24B-Instruct-2506 for dev). ComfyUI ships them as bare files without a config
# (``qwen_3_4b.safetensors``, ``qwen_3_8b.safetensors``, ``mistral_3_small_flux2_bf16.safetensors`` / ``_fp8``): such a
# file is matched here by its embedding shape (vocab, width) and layer count (``infer_text_config``).
_QWEN3_COMMON = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 40960, "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
_MISTRAL_SMALL_3_TEXT = {
    "model_type": "mistral", "attention_dropout": 0.0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 32768, "max_position_embeddings": 131072, "num_attention_heads": 32,
    "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
    "sliding_window": None, "use_cache": True, "vocab_size": 131072,
}  # fmt: skip
RELEASED_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen3-4B": {**_QWEN3_COMMON, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
    "Qwen3-8B": {**_QWEN3_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False},
    "Mistral-Small-3.x-24B": {
        "model_type": "mistral3",
        "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": _MISTRAL_SMALL_3_TEXT,
    },
}
# Layer counts a bare file of a released encoder may have besides the full one: ComfyUI's FLUX.2 "pruned" Mistral
# drops layers 31-40 (dev reads hidden states up to 30) and may drop the final norm too.
BARE_LAYER_COUNTS: dict[str, tuple[int, ...]] = {"Mistral-Small-3.x-24B": (30,)}
FP8_TEXT_TARGETS = ("layers.",)
FP8_TEXT_EXCLUDES = ("norm",)
# Decoder-layer keys of every layout read here: HF Qwen3 / ComfyUI (``model.layers.N``), HF Mistral 3 (both spellings).
_LAYER_PREFIX = r"(?:model\.language_model\.|language_model\.model\.|model\.)?"
_LAYER_KEY = re.compile(_LAYER_PREFIX + r"layers\.(\d+)\.")


def output_layers_for(kind: str, official: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The hidden-state indices to stack: the official ones, remapped proportionally for smaller (test) models."""
    if num_layers >= max(official):
        return official
    real = RELEASED_LAYERS[kind]
    out = tuple(max(1, min(num_layers, round(k * num_layers / real))) for k in official)
    if len(set(out)) != len(out):
        raise UserError(f"text encoder has only {num_layers} layers; FLUX.2 needs at least {len(official)} distinct ones")
    return out


@dataclass(frozen=True)
class EncoderSource:
    """Where the config, weights and tokenizer of a text encoder are (``config`` None: a bare weights file)."""

    config: Path | None
    weights: Path
    tokenizer: Path


def resolve_encoder_source(path: str | os.PathLike, flag: str = "--text_encoder", tokenizer: str | None = None) -> EncoderSource:
    """A HF snapshot directory, a pipeline directory (``text_encoder/`` + ``tokenizer/``), or one weights file — with
    its ``config.json`` beside it, or bare (ComfyUI's ``qwen_3_4b.safetensors``: the config is inferred from its
    shapes, the tokenizer found by ``single_file_tokenizer``). ``tokenizer``: an explicit ``--tokenizer DIR``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: text encoder not found ({flag})")
    if p.is_file():
        config = p.parent / "config.json"
        return EncoderSource(config if config.is_file() else None, p, single_file_tokenizer(p, tokenizer, flag))
    model_dir = p if (p / "config.json").is_file() else p / "text_encoder"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{p}: no config.json (nor text_encoder/config.json) in the text encoder directory ({flag})")
    if tokenizer:
        return EncoderSource(model_dir / "config.json", model_dir, single_file_tokenizer(p, tokenizer, flag))
    return EncoderSource(model_dir / "config.json", model_dir, _tokenizer_dir(model_dir, p))


def _tokenizer_dir(model_dir: Path, root: Path) -> Path:
    for cand in (model_dir, root, root / "tokenizer"):
        if has_tokenizer_files(cand) or (cand / "tokenizer_config.json").is_file():
            return cand
    return model_dir


def _text_part(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (Mistral 3 nests it in ``text_config``)."""
    return cfg.get("text_config", cfg)


def infer_text_config(weights: Path, flag: str = "--text_encoder") -> dict[str, Any]:
    """The config of a bare text-encoder weights file: its embedding shape (vocab, width) and layer count matched
    against ``RELEASED_TEXT_CONFIGS``; anything else is a ``UserError`` naming the shapes found and the known ones."""
    with open_weights(weights) as reader:
        keys = reader.keys()
        embed = next((k for k in keys if k.endswith("embed_tokens.weight")), None)
        vocab, hidden = (int(n) for n in reader.get_shape(embed)[:2]) if embed else (None, None)
    layers = len({int(m[1]) for k in keys if (m := _LAYER_KEY.match(k))})
    for name, cfg in RELEASED_TEXT_CONFIGS.items():
        text = _text_part(cfg)
        counts = (text["num_hidden_layers"], *BARE_LAYER_COUNTS.get(name, ()))
        if (text["vocab_size"], text["hidden_size"]) == (vocab, hidden) and layers in counts:
            logger.info("%s: no config.json beside it; %s by its shapes (hidden %d, %d layers)", weights, name, hidden, layers)
            return copy.deepcopy(cfg)
    known = ", ".join(
        f"{n} (vocab {t['vocab_size']}, hidden {t['hidden_size']}, "
        f"{' or '.join(str(c) for c in (t['num_hidden_layers'], *BARE_LAYER_COUNTS.get(n, ())))} layers)"
        for n, t in ((n, _text_part(c)) for n, c in RELEASED_TEXT_CONFIGS.items())
    )
    found = f"vocab {vocab}, hidden {hidden}, {layers} layers" if embed else "no embed_tokens.weight"
    raise UserError(
        f"{weights}: no config.json beside this single file ({flag}) and its tensors ({found}) match no released "
        f"text encoder it could be: {known}; put the model's config.json beside it or pass the Hugging Face directory"
    )


def _read_config(src: EncoderSource, flag: str) -> dict:
    if src.config is None:
        return infer_text_config(src.weights, flag)
    try:
        return json.loads(src.config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{src.config}: cannot read the text encoder config ({flag}): {e}") from None


def encoder_kind(cfg: dict) -> str | None:
    """``"qwen3"`` / ``"mistral3"`` from a config.json (None for anything else)."""
    mt = cfg.get("model_type")
    for kind, name in _MODEL_TYPES.items():
        if mt == name:
            return kind
    return None


def check_encoder_for_version(cfg: dict, version: ModelVersion, source: str, flag: str = "--text_encoder") -> dict:
    """The text config of ``cfg`` after checking it is the encoder ``version`` needs (one ``UserError`` otherwise)."""
    kind = encoder_kind(cfg)
    want = version.text_encoder
    if kind != want:
        got = KIND_NAMES.get(kind or "", f"model_type {cfg.get('model_type')!r}")
        raise UserError(f"{source}: {flag} is {got}, but --model_version {version.name} needs a {KIND_NAMES[want]} encoder")
    text_cfg = _text_part(cfg) if kind == "mistral3" else cfg
    layers = int(text_cfg.get("num_hidden_layers", 0))
    hidden = int(text_cfg.get("hidden_size", 0))
    if layers == RELEASED_LAYERS[kind] and hidden != version.text_hidden_size:
        raise UserError(
            f"{source}: {flag} has hidden size {hidden}; --model_version {version.name} needs the {version.text_hidden_size}-wide "
            f"{KIND_NAMES[kind]} encoder (klein 4B: Qwen3-4B, klein 9B: Qwen3-8B)"
        )
    return text_cfg


def _build_decoder(kind: str, text_cfg: dict, num_layers: int) -> torch.nn.Module:
    """The bare decoder (embeddings + ``num_layers`` layers + norm) on the meta device."""
    fields = {k: v for k, v in text_cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    fields["num_hidden_layers"] = num_layers
    if isinstance(fields.get("layer_types"), list):
        fields["layer_types"] = fields["layer_types"][:num_layers]
    if kind == "qwen3":
        from transformers import Qwen3Config, Qwen3Model

        cfg, cls = Qwen3Config(**fields), Qwen3Model
    else:
        from transformers import MistralConfig, MistralModel

        cfg, cls = MistralConfig(**fields), MistralModel
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        return cls(cfg)


def _decoder_key_map(kind: str, keys: list[str], num_layers: int) -> KeyMap:
    """Checkpoint keys → bare-decoder keys; LM head, vision tower, projector and unused layers dropped."""
    prefixes = []
    for p in ("model.language_model.", "language_model.model.", "model."):
        if any(k.startswith(p) for k in keys):
            prefixes.append((p, ""))
            break
    unused = "|".join(str(i) for i in range(num_layers, 512))
    dropped = (
        r"(?:language_model\.)?lm_head\..*",
        r"(?:model\.)?vision_tower\..*",
        r"(?:model\.)?multi_modal_projector\..*",
        _LAYER_PREFIX + rf"layers\.(?:{unused})\..*",
        "tekken_model",  # ComfyUI's Mistral file embeds its tokenizer (tekken.json) as one uint8 tensor
    )
    return KeyMap(prefixes=tuple(prefixes), dropped=dropped)


class Flux2TextEncoder:
    """Tokenizer + truncated decoder of one FLUX.2 text encoder; ``encode(prompts) -> (B, 512, 3·hidden)``."""

    def __init__(
        self,
        path: str | os.PathLike,
        version: ModelVersion,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        fp8: bool = False,
        max_length: int = TEXT_MAX_LENGTH,
        flag: str = "--text_encoder",
        tokenizer: str | None = None,
    ):
        from transformers import AutoTokenizer

        src = resolve_encoder_source(path, flag, tokenizer)
        cfg = _read_config(src, flag)
        text_cfg = check_encoder_for_version(cfg, version, str(path), flag)
        self.kind = version.text_encoder
        self.version = version
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        total = int(text_cfg["num_hidden_layers"])
        self.layers = output_layers_for(self.kind, version.output_layers, total)
        self.hidden_size = int(text_cfg["hidden_size"])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(src.tokenizer), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{src.tokenizer}: cannot load the {KIND_NAMES[self.kind]} tokenizer ({flag}): {e}") from None
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise UserError(f"{src.tokenizer}: the tokenizer has no chat template ({flag}); use the model's full HF directory")
        n_build = max(self.layers)
        model = _build_decoder(self.kind, text_cfg, n_build)
        _init_rotary_buffers(model, self.device)
        reader = open_weights(src.weights)
        try:
            key_map = _decoder_key_map(self.kind, reader.keys(), n_build)
            if not any(key_map.map(k) == "norm.weight" for k in reader.keys()):
                model.norm = torch.nn.Identity()  # a pruned file without the final norm: its output is never used
            fp8_cfg = Fp8Config(mode="block", block_size=64, targets=FP8_TEXT_TARGETS, excludes=FP8_TEXT_EXCLUDES) if fp8 else None
            load_weights_into_model(
                model, reader, key_map=key_map, dtype=dtype, device=self.device, fp8=fp8_cfg, strict=True,
                dequantize_prequantized=not fp8,
            )  # fmt: skip
        finally:
            reader.close()
        self.model = model.eval().requires_grad_(False)
        self.fp8 = fp8
        logger.info(
            "%s text encoder from %s: %d of %d layers loaded (outputs %s)%s",
            KIND_NAMES[self.kind], path, n_build, total, self.layers, ", fp8" if fp8 else "",
        )  # fmt: skip

    def cache_metadata(self) -> dict[str, str]:
        """What the TE caches record (a cache made with another encoder is re-encoded / refused)."""
        return {
            "flux2_text_encoder": f"{self.kind}-{self.hidden_size}",
            "flux2_text_layers": ",".join(str(i) for i in self.layers),
            "flux2_text_max_length": str(self.max_length),
        }

    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        kw: dict[str, Any] = {"padding": "max_length", "truncation": True, "max_length": self.max_length, "return_tensors": "pt"}
        if self.kind == "qwen3":
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
                for p in prompts
            ]
            return dict(self.tokenizer(texts, **kw))
        batch = [
            [
                {"role": "system", "content": [{"type": "text", "text": MISTRAL_SYSTEM_MESSAGE}]},
                {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]},
            ]
            for p in prompts
        ]
        out = self.tokenizer.apply_chat_template(batch, add_generation_prompt=False, tokenize=True, return_dict=True, **kw)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, max_length, 3·hidden)`` in the encoder dtype (on the encoder device)."""
        inputs = {k: v.to(self.device) for k, v in self._tokenize(list(prompts)).items()}
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for k in self.layers:
            layer = self.model.layers[k - 1]  # hidden_states[k] is the output of decoder layer k

            def hook(_m, _args, out, k=k):
                captured[k] = out[0] if isinstance(out, tuple) else out

            hooks.append(layer.register_forward_hook(hook))
        try:
            self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        stacked = torch.stack([captured[k] for k in self.layers], dim=1)  # (B, 3, L, D)
        b, n, length, d = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(b, length, n * d)

    def close(self) -> None:
        """Free the weights (the encoder is never kept while the DiT loads)."""
        self.model = None  # type: ignore[assignment]


def _init_rotary_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent RoPE buffers are not in checkpoints: rebuild the rotary module on a real device."""
    rotary = getattr(model, "rotary_emb", None)
    if rotary is None:
        return
    with torch.device(device):
        model.rotary_emb = type(rotary)(config=model.config)
