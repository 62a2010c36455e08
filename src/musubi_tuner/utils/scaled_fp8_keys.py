"""The keys of a scaled-fp8 checkpoint (ComfyUI's ``*_fp8_scaled.safetensors``) besides its weights, and what each means.

ComfyUI layout (e.g. ``qwen_2.5_vl_7b_fp8_scaled``, ``umt5_xxl_fp8_e4m3fn_scaled``): each quantised Linear stores
``<m>.weight`` in float8_e4m3fn and ``<m>.scale_weight``, a float32 scalar (shape ``[]``), with ``W = weight ·
scale_weight``; it may add ``<m>.scale_input``, a float32 scalar for quantising the activations when the matmul itself
runs in fp8. A top-level ``scaled_fp8`` tensor (empty, its dtype the weights' fp8 dtype; two elements meaning "matmul
in full precision") marks the format. Embeddings, norms, biases, convolutions and unquantised Linears keep bf16/fp16/
fp32. Newer ComfyUI files spell the pair ``<m>.weight_scale`` / ``<m>.input_scale`` and may add ``<m>.comfy_quant``
(the layer's config as UTF-8 JSON bytes, e.g. ``{"format": "float8_e4m3fn"}``).

``utils.model_loading`` gives each weight scale to its Linear as ``scale_weight`` (per tensor, shape ``[1]``); the
marker and the input scales are consumed and ignored (our fp8 Linear dequantises the weight and never quantises
activations with a file's scale; ``--fp8_fast`` computes its own), a ``comfy_quant`` entry is checked to name an fp8
format. Any other key the model does not have stays an "unexpected key" error.
"""

from __future__ import annotations

import json

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.safetensors_utils import WeightsReader

MARKER_KEY = "scaled_fp8"
WEIGHT_SCALE_SUFFIXES: tuple[str, ...] = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES: tuple[str, ...] = (".scale_input", ".input_scale")
COMFY_QUANT_SUFFIX = ".comfy_quant"
FP8_FORMATS: tuple[str, ...] = ("float8_e4m3fn", "float8_e5m2")


def _module_of(key: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def is_marker(key: str) -> bool:
    """The format's marker tensor (``scaled_fp8``, possibly under a prefix)."""
    return key == MARKER_KEY or key.endswith("." + MARKER_KEY)


def weight_scale_module(key: str) -> str | None:
    """The Linear a weight-scale key belongs to (``a.b.scale_weight`` / ``a.b.weight_scale`` → ``a.b``), else None."""
    return _module_of(key, WEIGHT_SCALE_SUFFIXES)


def ignored_companion_module(key: str) -> str | None:
    """The Linear an input scale or ``comfy_quant`` entry belongs to (consumed without effect), else None."""
    return _module_of(key, (*INPUT_SCALE_SUFFIXES, COMFY_QUANT_SUFFIX))


def is_scaled_fp8_companion(key: str) -> bool:
    """Whether ``key`` is one of the format's non-weight keys (for callers that compare key sets before loading)."""
    return is_marker(key) or weight_scale_module(key) is not None or ignored_companion_module(key) is not None


def check_comfy_quant(reader: WeightsReader, key: str) -> None:
    """A ``<m>.comfy_quant`` entry must declare an fp8 format (int8 / nvfp4 / mxfp8 layers are not supported)."""
    if not key.endswith(COMFY_QUANT_SUFFIX):
        return
    try:
        conf = json.loads(bytes(reader.get_tensor(key).flatten().tolist()).decode("utf-8").strip())
        fmt = conf.get("format") if isinstance(conf, dict) else None
    except (ValueError, TypeError):
        fmt = None
    if fmt not in FP8_FORMATS:
        raise UserError(
            f"{reader.file_of(key)}: {key!r} declares quantisation format {fmt!r}; only scaled fp8 "
            f"({', '.join(FP8_FORMATS)}) checkpoints are supported (use the bf16 or fp8_scaled file)"
        )
