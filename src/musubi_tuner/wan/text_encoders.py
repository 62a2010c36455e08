"""Wan text and image encoders (specs/wan.md §6): UMT5-XXL encoder and the CLIP ViT-H/14 vision tower (2.1 I2V).

Both come from transformers. ``--t5`` takes an HF directory (``UMT5EncoderModel`` config + weights + tokenizer), the
official ``models_t5_umt5-xxl-enc-bf16.pth`` (``torch.load(weights_only=True, mmap=True)``; keys converted by
``UMT5_OFFICIAL_KEY_MAP``, dims read from the shapes) or an HF-named single ``.safetensors``, with the tokenizer from
``--t5_tokenizer`` or the official ckpt layout ``<dir of the file>/google/umt5-xxl``. The encoder is built on the meta
device and its weights stream in tensor by tensor (``utils.model_loading``), cast to fp8 on the way with ``--fp8_t5``. ``--clip`` takes an HF ``CLIPVisionModel`` directory or the
official open-clip ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (its ``visual.*`` tower converted).

Prompts: ftfy-style cleaning (HTML unescape, whitespace collapse), ``max_length`` 512 tokens with truncation, the
encoder runs with the attention mask and each prompt's states are trimmed to its real length (the DiT pads to 512).
"""

from __future__ import annotations

import html
import json
import os
import re
import types
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.modules.fp8_optimization import Fp8Config
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.key_mapping import KeyMap
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import load_weights_into_model
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights
from musubi_tuner.utils.scaled_fp8_keys import is_scaled_fp8_companion, weight_scale_module

logger = get_logger(__name__)

T5_MAX_LENGTH = 512
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UMT5_FP8_TARGETS = ("encoder.block.",)  # --fp8_t5: every Linear of the blocks (embedding and norms stay as loaded)


def clean_prompt(text: str) -> str:
    """HTML-unescape (twice, as the references) and collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    reader = open_weights(path)
    try:
        return {k: reader.get_tensor(k) for k in reader.keys()}
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------------------------- UMT5


UMT5_OFFICIAL_KEY_MAP = KeyMap(
    regexes=(
        (r"^token_embedding\.weight$", "shared.weight"),
        (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
        (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
        (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
        (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
        (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
        (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
        (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
        (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    )
)


def umt5_hf_key_map(keys: list[str]) -> KeyMap:
    """HF-layout files (a UMT5EncoderModel snapshot, a full UMT5 / T5 checkpoint, ComfyUI's umt5_xxl single file): the
    decoder and LM head are not used; the tied input embedding is read once, as ``shared.weight`` (from
    ``encoder.embed_tokens.weight`` when a file stores only that name)."""
    dropped = (r"decoder\..*", r"lm_head\..*")
    if "shared.weight" in keys:
        return KeyMap(dropped=(*dropped, r"encoder\.embed_tokens\.weight"))
    return KeyMap(regexes=((r"^encoder\.embed_tokens\.weight$", "shared.weight"),), dropped=dropped)


def umt5_official_to_hf(key: str) -> str | None:
    """HF ``UMT5EncoderModel`` name of an official Wan T5 key (None: not part of the encoder)."""
    name = UMT5_OFFICIAL_KEY_MAP.map(key)
    return None if name == key else name


def umt5_config_from_hf_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``UMT5Config`` fields read from the shapes of an HF-named UMT5 encoder (UMT5-XXL: 24 layers, 4096 wide, 64 heads)."""
    try:
        vocab, d_model = shapes["shared.weight"]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"][0]
    except KeyError as e:
        raise UserError(f"not a UMT5 encoder checkpoint (missing {e})") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"^encoder\.block\.(\d+)\.", k)))
    return dict(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner) // int(heads),
        d_ff=int(d_ff),
        num_layers=layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )


def _umt5_weights_of_dir(p: Path) -> Path:
    """The weights to stream from an HF directory: its safetensors (index or shards), else ``pytorch_model.bin``."""
    if any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")):
        return p
    if (p / "pytorch_model.bin").is_file():
        return p / "pytorch_model.bin"
    raise UserError(f"{p}: no *.safetensors or pytorch_model.bin in the T5 encoder directory (--t5)")


def umt5_weights_file(path: str | os.PathLike) -> Path:
    """The weights ``--t5`` names: the file itself, or those of an HF directory (``_umt5_weights_of_dir``)."""
    p = Path(path)
    return _umt5_weights_of_dir(p) if p.is_dir() else p


def _stream_umt5(model: Any, reader: WeightsReader, key_map: KeyMap, dtype: torch.dtype, device: Any, fp8: bool) -> None:
    """Weights streamed tensor by tensor into the meta-built encoder (``--fp8_t5``: Linear weights of the blocks cast
    to fp8 on the way, upcast at compute time), so the peak host memory stays near the final model size. ComfyUI's
    ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` keeps its fp8 weights and scales with ``--fp8_t5`` and is dequantised
    to ``dtype`` while streaming without it."""
    model.encoder.embed_tokens = model.shared  # tied: one tensor, read once as shared.weight
    all_mapped = set(key_map.map_keys(reader.keys()).values())
    mapped = {k for k in all_mapped if not is_scaled_fp8_companion(k)}
    expected = set(model.state_dict()) - {"encoder.embed_tokens.weight"}
    missing, unexpected = sorted(expected - mapped), sorted(mapped - expected)
    orphans = sorted(k for k in all_mapped - mapped if (m := weight_scale_module(k)) and f"{m}.weight" in missing)
    if orphans:
        raise UserError(
            f"{reader.name}: fp8 scale {orphans[0]!r} has no weight {orphans[0].rpartition('.')[0] + '.weight'!r} "
            f"in the T5 checkpoint (--t5; {len(orphans)} such scale(s); a truncated or wrongly converted file?)"
        )
    if missing or unexpected:
        raise UserError(
            f"{reader.name}: not a UMT5 encoder checkpoint for this config (--t5): {len(missing)} tensors missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    fp8_cfg = Fp8Config(scaled=False, targets=UMT5_FP8_TARGETS) if fp8 else None
    result = load_weights_into_model(
        model, reader, key_map=key_map, dtype=dtype, device=device, fp8=fp8_cfg, strict=False, dequantize_prequantized=not fp8
    )
    if result.unexpected:  # scaled-fp8 keys the loader could not place (e.g. a scale of no Linear)
        raise UserError(f"{reader.name}: unexpected key(s) in the T5 checkpoint (--t5): {result.unexpected[:3]}")
    if fp8:
        from transformers.models.umt5.modeling_umt5 import UMT5DenseGatedActDense

        for module in model.modules():
            if isinstance(module, UMT5DenseGatedActDense):
                module.forward = types.MethodType(_gated_ffn_forward_fp8, module)
        logger.info("--fp8_t5: %d Linear weights of the T5 encoder in fp8", len(result.fp8_linears))


def _gated_ffn_forward_fp8(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' gated FFN without its cast of the activations to ``wo``'s weight dtype (meant for fp32 ``wo``; with
    an fp8 ``wo`` it casts the activations to fp8 and the residual add fails). ``wo`` upcasts its weight instead."""
    h = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
    return self.wo(self.dropout(h))


def _load_tokenizer(source: Path | str, flag: str) -> Any:
    from transformers import AutoTokenizer

    local = Path(source).exists()
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=local)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load the UMT5 tokenizer ({flag}): {e}") from None


class WanT5Encoder:
    """UMT5 encoder + tokenizer; ``encode(prompts) -> list[(L_i, 4096)]`` (valid length, float32 on CPU)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = T5_MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        fp8: bool = False,
    ) -> WanT5Encoder:
        """``--t5`` (HF dir or official ``.pth``/``.safetensors``); ``fp8`` stores the Linear weights in fp8 (``--fp8_t5``)."""
        from transformers import UMT5Config, UMT5EncoderModel

        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: T5 text encoder not found (--t5)")
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise UserError(f"{p}: not a T5 encoder directory (no config.json) (--t5)")
            try:
                config = UMT5Config.from_pretrained(str(p), local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"{p}: cannot read the UMT5 config (--t5): {e}") from None
            config.is_encoder_decoder, config.use_cache = False, False
            reader = open_weights(_umt5_weights_of_dir(p))
            key_map = umt5_hf_key_map(reader.keys())
            tok_src: Path | str = tokenizer or p
        else:
            reader = open_weights(p)
            official = "token_embedding.weight" in reader
            if not official and "shared.weight" not in reader and "encoder.embed_tokens.weight" not in reader:
                reader.close()
                raise UserError(f"{p}: not an official Wan UMT5 checkpoint (no token_embedding.weight) (--t5)")
            key_map = UMT5_OFFICIAL_KEY_MAP if official else umt5_hf_key_map(reader.keys())
            shapes = {name: tuple(reader.get_shape(k)) for k, name in key_map.map_keys(reader.keys()).items()}
            try:
                config = UMT5Config(**umt5_config_from_hf_shapes(shapes))
            except UserError as e:
                reader.close()
                raise UserError(f"{p}: {e} (--t5)") from None
            tok_src = tokenizer or (p.parent / "google" / "umt5-xxl")
            if not Path(tok_src).exists():
                reader.close()
                raise UserError(
                    f"no UMT5 tokenizer for {p}: pass --t5_tokenizer DIR (google/umt5-xxl) or place it at {tok_src} "
                    "(the official checkpoint layout)"
                )
        try:
            with torch.device("meta"):
                model = UMT5EncoderModel(config)
            _stream_umt5(model, reader, key_map, dtype, device, fp8)
        finally:
            reader.close()
        tok = _load_tokenizer(tok_src, "--t5_tokenizer")
        model = model.eval().requires_grad_(False)
        return cls(model, tok)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """States trimmed to each prompt's token count (special tokens included), float32 on the CPU."""
        texts = [clean_prompt(p) for p in prompts]
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        mask = ids.attention_mask.to(self.device)
        out = self.model(input_ids=ids.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [out[i, : int(n)].float().cpu() for i, n in enumerate(lengths)]


# ---------------------------------------------------------------------------------------------------------------- CLIP


def clip_official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open-clip ``visual.*`` ViT tensors → HF ``CLIPVisionModel`` names without the ``vision_model.`` prefix (fused
    in_proj split into q/k/v)."""
    out: dict[str, torch.Tensor] = {}
    top = {
        "visual.conv1.weight": "embeddings.patch_embedding.weight",
        "visual.class_embedding": "embeddings.class_embedding",
        "visual.positional_embedding": "embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "pre_layrnorm.weight",
        "visual.ln_pre.bias": "pre_layrnorm.bias",
        "visual.ln_post.weight": "post_layernorm.weight",
        "visual.ln_post.bias": "post_layernorm.bias",
    }
    sub = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        m = re.match(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$", k)
        if not m:
            continue  # text tower, projection, logit scale: unused by Wan
        n, name, kind = m.groups()
        base = f"encoder.layers.{n}"
        if name == "attn.in_proj":
            for part, t in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{base}.self_attn.{part}.{kind}"] = t.contiguous()
        elif name in sub:
            out[f"{base}.{sub[name]}.{kind}"] = v
    return out


def clip_config_from_hf_sd(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    width = sd["embeddings.patch_embedding.weight"].shape[0]
    patch = sd["embeddings.patch_embedding.weight"].shape[-1]
    positions = sd["embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.layers\.(\d+)\.", k)))
    ffn = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    grid = int(round((positions - 1) ** 0.5))
    return dict(
        hidden_size=int(width),
        intermediate_size=int(ffn),
        num_hidden_layers=layers,
        num_attention_heads=max(1, int(width) // 80) if int(width) % 80 == 0 else max(1, int(width) // 16),
        image_size=grid * int(patch),
        patch_size=int(patch),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


class WanClipEncoder:
    """CLIP ViT-H/14 vision tower; ``encode(images (N, 3, H, W) in [-1, 1]) -> (N, 257, 1280)`` penultimate states."""

    def __init__(self, model: Any):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"
    ) -> WanClipEncoder:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: CLIP image encoder not found (--clip)")
        if p.is_dir():
            try:
                model = CLIPVisionModel.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"{p}: cannot load the CLIP vision model (--clip): {e}") from None
        else:
            sd = _state_dict(p)
            if "visual.conv1.weight" not in sd:
                raise UserError(f"{p}: not an open-clip ViT checkpoint (no visual.conv1.weight) (--clip)")
            hf = clip_official_to_hf(sd)
            meta_cfg = _clip_metadata_config(p)
            config = CLIPVisionConfig(**(meta_cfg or clip_config_from_hf_sd(hf)))
            with torch.device("meta"):
                model = CLIPVisionModel(config)
            expected = model.state_dict()
            prefix = "vision_model." if any(k.startswith("vision_model.") for k in expected) else ""
            hf = {prefix + k: v for k, v in hf.items() if prefix + k in expected}
            missing = [k for k in expected if k not in hf and not k.endswith("position_ids")]
            if missing:
                raise UserError(f"{p}: CLIP checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]} (--clip)")
            model.load_state_dict({k: v.to(dtype) for k, v in hf.items()}, strict=False, assign=True)
            for module in model.modules():  # non-persistent buffers the file does not carry
                ids = getattr(module, "position_ids", None)
                if isinstance(ids, torch.Tensor) and ids.is_meta:
                    module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand((1, -1)), persistent=False)
        return cls(model.to(device=device).eval().requires_grad_(False))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the tower's size (bicubic), CLIP-normalise, return ``hidden_states[-2]`` (float32, CPU)."""
        import torch.nn.functional as F

        size = int(self.model.config.image_size)
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(device=self.device, dtype=next(self.model.parameters()).dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()


def _clip_metadata_config(path: Path) -> dict[str, Any] | None:
    """Tiny bundles store the CLIP config next to an official-layout file (``<file>.json``); real files do not."""
    side = path.with_suffix(path.suffix + ".json")
    if side.is_file():
        return json.loads(side.read_text(encoding="utf-8"))
    return None
