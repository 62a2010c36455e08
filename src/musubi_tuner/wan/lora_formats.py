"""Wan LoRA files in the diffusers layout (``--lora_format diffusers``): ``transformer.<diffusers module path>.lora_A/B``.

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


def rewrite_as_diffusers(path: Path) -> None:
    """Replace a kohya LoRA file written by the trainer by its diffusers-layout form (atomic)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        md = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    out, md = kohya_to_diffusers(sd, md, str(path))
    save_safetensors_atomic(out, path, md)
