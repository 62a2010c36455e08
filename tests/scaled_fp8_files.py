"""Write a tiny ComfyUI-style scaled-fp8 text-encoder file from a bf16 state dict, quantised here independently of
``modules.fp8_optimization``: per tensor, ``scale = max|W| / 448`` (float32 scalar, shape ``[]``), ``q = W / scale``
in float8_e4m3fn, plus ``scale_input`` = 1 and the ``scaled_fp8`` marker; also the bf16 file whose weights are exactly
``q · scale`` (the reference a correct loader must reproduce)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

E4M3 = torch.float8_e4m3fn


def write_scaled_fp8_pair(
    sd: dict[str, torch.Tensor],
    quantise: Callable[[str], bool],
    scaled_path: Path,
    reference_path: Path,
    *,
    new_spelling: bool = False,
) -> list[str]:
    """Write both files; ``quantise(key)`` picks the Linear weights. ``new_spelling``: ``weight_scale`` /
    ``input_scale`` / ``comfy_quant`` (newer ComfyUI files) instead of ``scale_weight`` / ``scale_input`` + marker.
    Returns the quantised weight keys."""
    scaled: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    done = []
    for key, w in sd.items():
        if not (w.ndim == 2 and key.endswith(".weight") and quantise(key)):
            scaled[key] = reference[key] = w.contiguous()
            continue
        scale = (w.float().abs().amax() / 448.0).clamp(min=1e-8)
        q = (w.float() / scale).clamp(-448.0, 448.0).to(E4M3)
        module = key[: -len(".weight")]
        scaled[key] = q
        if new_spelling:
            scaled[f"{module}.weight_scale"] = scale
            scaled[f"{module}.input_scale"] = torch.tensor(1.0)
            scaled[f"{module}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            scaled[f"{module}.scale_weight"] = scale
            scaled[f"{module}.scale_input"] = torch.tensor(1.0)
        reference[key] = (q.float() * scale).to(w.dtype)
        done.append(key)
    if not new_spelling:
        scaled["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    save_file(scaled, str(scaled_path))
    save_file(reference, str(reference_path))
    return done
