"""Wan LoRA files in the diffusers layout (``--lora_format diffusers``): ``transformer.<diffusers module path>.lora_A/B``,
and in the ComfyUI layout (``--lora_format comfyui``): ``diffusion_model.<official module path>.lora_A/B``.

The shared conversion (``networks.convert.to_other``) writes official module paths; diffusers' ``WanTransformer3DModel``
names them differently (``self_attn.q`` → ``attn1.to_q``, ``cross_attn.k_img`` → ``attn2.add_k_proj``, ``ffn.0`` →
``ffn.net.0.proj``), so the paths go through the DiT key table of ``wan.models.loading``. Such a file loads with
``WanTransformer3DModel.load_lora_adapter(..., prefix="transformer")`` with no missing or unexpected keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from musubi_tuner.networks.convert import convert_file_tensors
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.wan.models.loading import official_to_diffusers

PREFIX = "transformer"
COMFYUI_PREFIX = "diffusion_model"


def kohya_to_diffusers(
    sd: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya Wan LoRA tensors → diffusers-layout tensors (alpha folded into lora_A/lora_B)."""
    other, md = convert_file_tensors(sd, metadata, "other", "wan", PREFIX, source)
    out = {}
    for key, t in other.items():
        body = key[len(PREFIX) + 1 :]
        module, _, leaf = body.rpartition(".lora_")
        out[f"{PREFIX}.{official_to_diffusers(module)}.lora_{leaf}"] = t
    return out, md


def rewrite_as(path: Path, layout: str) -> None:
    """Replace a kohya LoRA file written by the trainer by its ``diffusers`` or ``comfyui`` form (atomic); the ComfyUI
    file is what ``convert_lora.py --target other --diffusers_prefix diffusion_model`` writes."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        md = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if layout == "diffusers":
        out, md = kohya_to_diffusers(sd, md, str(path))
    elif layout == "comfyui":
        out, md = convert_file_tensors(sd, md, "other", "wan", COMFYUI_PREFIX, str(path))
    else:
        raise ValueError(f"unknown LoRA layout {layout!r}")
    save_safetensors_atomic(out, path, md)
