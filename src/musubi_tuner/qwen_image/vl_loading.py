"""Load Qwen2.5-VL (transformers' class) streamed: built on the meta device, weights assigned tensor by tensor.

Sources: an HF snapshot directory (``config.json`` + safetensors + tokenizer), a diffusers pipeline directory
(``text_encoder/`` + ``tokenizer/``), a hub id (downloaded once by ``huggingface_hub``), or ComfyUI's single file
``qwen_2.5_vl_7b.safetensors``. A single file carries no config: it is inferred from its tensor shapes through
``RELEASED_VL_CONFIGS``; its tokenizer comes from ``utils.hf_sources.single_file_tokenizer``.

Key layouts: the release and ComfyUI's file use ``model.layers.*`` / ``model.embed_tokens`` / ``model.norm``,
``visual.*`` and ``lm_head.weight``; transformers ≥ 4.52 in memory uses ``model.language_model.*`` and
``model.visual.*``. Both map onto the model's names. With ``--fp8_vl`` the language model's Linear weights are
quantised (block-scaled fp8) while streaming, so the bf16 model never exists in memory. ComfyUI's
``qwen_2.5_vl_7b_fp8_scaled.safetensors`` (per-tensor scaled fp8 Linears, vision tower included) loads too: with
``--fp8_vl`` its fp8 weights and scales are used as stored, without it they are dequantised to ``dtype`` while streaming.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.modules.fp8_optimization import Fp8Config
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.hf_sources import resolve_model_source, single_file_tokenizer
from musubi_tuner.utils.key_mapping import KeyMap
from musubi_tuner.utils.model_loading import load_weights_into_model
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights

FP8_VL_EXCLUDES: tuple[str, ...] = ("visual", "embed", "norm", "lm_head")
VL_KEY_MAP = KeyMap(
    prefixes=(
        ("model.language_model.", "model.language_model."),
        ("model.visual.", "model.visual."),
        ("model.", "model.language_model."),
        ("visual.", "model.visual."),
    )
)

# Facts of the released Qwen2.5-VL-7B-Instruct config.json, keyed by what a weights file shows:
# (vocab, text hidden, text layers, vision hidden, vision depth) — see ``file_signature``.
RELEASED_VL_CONFIGS: dict[tuple[int, int, int, int, int], dict[str, Any]] = {
    (152064, 3584, 28, 1280, 32): {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
    }
}
_LAYER = re.compile(r"(?:model\.language_model\.|model\.)layers\.(\d+)\.")
_VISION_BLOCK = re.compile(r"(?:model\.)?visual\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class VLSource:
    """Where the config, weights and tokenizer of a Qwen2.5-VL come from; ``processor_dirs`` are searched in order
    for the image preprocessor (``--vl_processor`` first)."""

    config: dict[str, Any]
    weights: Path
    tokenizer: Path
    processor_dirs: tuple[Path, ...] = field(default=())
    single_file: bool = False


def file_signature(reader: WeightsReader) -> tuple[int, int, int, int, int]:
    """(vocab, text hidden, text layers, vision hidden, vision depth) of a Qwen2.5-VL weights file."""
    keys = reader.keys()
    embed = next((k for k in keys if k.endswith("embed_tokens.weight")), None)
    patch = next((k for k in keys if k.endswith("visual.patch_embed.proj.weight")), None)
    if embed is None or patch is None:
        raise UserError(
            f"{reader.name}: not a Qwen2.5-VL checkpoint (no embed_tokens / visual.patch_embed weights) (--text_encoder)"
        )
    vocab, hidden = reader.get_shape(embed)
    layers = 1 + max((int(m.group(1)) for k in keys if (m := _LAYER.match(k))), default=-1)
    depth = 1 + max((int(m.group(1)) for k in keys if (m := _VISION_BLOCK.match(k))), default=-1)
    return int(vocab), int(hidden), layers, int(reader.get_shape(patch)[0]), depth


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the Qwen2.5-VL config (--text_encoder): {e}") from None


def resolve_vl_source(name_or_path: str | os.PathLike, vl_processor: str | os.PathLike | None = None) -> VLSource:
    """A directory, hub id or single file (see module docstring); everything checked before anything loads."""
    path = Path(str(name_or_path)).expanduser()
    proc = [Path(vl_processor).expanduser()] if vl_processor else []
    if path.is_file():
        with open_weights(path) as reader:
            sig = file_signature(reader)
        config = RELEASED_VL_CONFIGS.get(sig)
        if config is None:
            shape = "vocab {}, hidden {}, {} layers, vision hidden {}, vision depth {}".format(*sig)
            known = "; ".join(
                "vocab {}, hidden {}, {} layers, vision hidden {}, vision depth {}".format(*k) for k in RELEASED_VL_CONFIGS
            )
            raise UserError(
                f"{path}: a single-file Qwen2.5-VL of unknown size ({shape}); known: {known}. "
                "Pass the Hugging Face model directory (with config.json) as --text_encoder instead"
            )
        tok = single_file_tokenizer(
            path, str(vl_processor) if vl_processor else None, "--text_encoder", tokenizer_flag="--vl_processor"
        )
        dirs = [*proc, tok, path.parent, path.parent / "processor"]
        return VLSource(dict(config), path, tok, tuple(dict.fromkeys(dirs)), single_file=True)
    src = resolve_model_source(name_or_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--text_encoder")
    model_dir = Path(src.model)
    if not src.local_files_only:
        from huggingface_hub import snapshot_download

        try:  # configs and tokenizer files first: a pipeline repo's weights other than text_encoder/ are never fetched
            model_dir = Path(snapshot_download(src.model, allow_patterns=["*.json", "*.txt"]))
            weights = "text_encoder/*.safetensors" if (model_dir / "text_encoder" / "config.json").is_file() else "*.safetensors"
            model_dir = Path(snapshot_download(src.model, allow_patterns=["*.json", "*.txt", weights]))
        except Exception as e:  # noqa: BLE001 - any hub failure is the user's id / network
            raise UserError(f"{src.model}: cannot download Qwen2.5-VL from the Hugging Face hub (--text_encoder): {e}") from None
        src = resolve_model_source(model_dir, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--text_encoder")
    root = Path(src.root)
    dirs = [*proc, Path(src.tokenizer), Path(src.model), root, root / "processor"]
    return VLSource(_read_json(Path(src.model) / "config.json"), Path(src.model), Path(src.tokenizer), tuple(dict.fromkeys(dirs)))


def _rebuild_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent RoPE tables are not in checkpoints: rebuild each rotary module (text and vision) on ``device``."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device):
                setattr(parent, leaf, type(module)(module.config))


def load_qwen25vl(src: VLSource, *, dtype: torch.dtype, device: torch.device, fp8: bool) -> torch.nn.Module:
    """``Qwen2_5_VLForConditionalGeneration`` with the weights of ``src`` streamed in (``dtype``; fp8 Linears)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if src.config.get("model_type") != "qwen2_5_vl":
        raise UserError(
            f"{src.weights}: --text_encoder is model_type {src.config.get('model_type')!r}; Qwen-Image needs Qwen2.5-VL"
        )
    try:
        config = Qwen2_5_VLConfig(**src.config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{src.weights}: invalid Qwen2.5-VL config (--text_encoder): {e}") from None
    config._attn_implementation = "sdpa"
    config.dtype = dtype
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    _rebuild_rotary(model, device)
    fp8_cfg = Fp8Config(mode="block", block_size=64, excludes=FP8_VL_EXCLUDES) if fp8 else None
    with open_weights(src.weights) as reader:
        has_lm_head = "lm_head.weight" in reader
        if not has_lm_head:  # encoding needs no LM head; captioning (generate) does and refuses without one
            model.lm_head = torch.nn.Identity()
        load_weights_into_model(
            model, reader, key_map=VL_KEY_MAP, dtype=dtype, device=device, fp8=fp8_cfg, strict=True,
            dequantize_prequantized=not fp8,
        )  # fmt: skip
    model.has_lm_head = has_lm_head
    return model.eval().requires_grad_(False)
