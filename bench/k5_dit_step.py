"""Kandinsky 5 DiT training step (forward + backward with LoRA) — ours vs diffusers, same config, same inputs, CPU.

Usage: python bench/k5_dit_step.py [--steps 3] [--threads 2]

Each side runs in its own subprocess so that peak memory (ru_maxrss above the resident size measured just before
the first step) is not polluted by the other model. ``peft`` is not a project dependency, so both models get the
same hand-written LoRA (rank 16) on the same Linear layers: q/k/v/out of every attention and both feed-forward
layers of every text and visual block (the K5 LoRA targets, specs/kandinsky5.md §11).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from dit_step_harness import run_dit_step_bench

CONFIG = dict(
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=512,
    in_text_dim2=128,
    time_dim=128,
    model_dim=256,
    ff_dim=1024,
    num_text_blocks=2,
    num_visual_blocks=4,
    axes_dims=(8, 12, 12),
    visual_cond=True,
)
LATENT = (1, 4, 32, 32)  # B, F, H, W  -> 4·16·16 = 1024 visual tokens
TEXT_LEN = 64
RANK = 16
TARGET_LEAVES = ("to_query", "to_key", "to_value", "out_layer", "in_layer")


class LoRALinear(nn.Module):
    """``base(x) + up(down(x))·alpha/r`` around a frozen Linear."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def add_lora(model: nn.Module) -> int:
    """Wrap the K5 LoRA targets inside text/visual blocks (modulations excluded); returns the module count."""
    model.requires_grad_(False)
    targets = []
    for name, module in model.named_modules():
        if "transformer_blocks" not in name or "modulation" in name:
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in TARGET_LEAVES:
                targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, LoRALinear(child, RANK))
    return len(targets)


def worker(args: argparse.Namespace):
    """One side's model, LoRA and inputs; the step and the LoRA module count."""
    side = args.worker
    if side == "ours":
        from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D

        model = DiffusionTransformer3D(**CONFIG)
    else:
        from diffusers import Kandinsky5Transformer3DModel

        model = Kandinsky5Transformer3DModel(**CONFIG)
    sd = {k: torch.randn_like(v) * 0.02 for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    n_lora = add_lora(model)
    model.train()
    b, f, h, w = LATENT
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, f, h, w, 33, generator=g)
    text = torch.randn(b, TEXT_LEN, CONFIG["in_text_dim"], generator=g)
    pooled = torch.randn(b, CONFIG["in_text_dim2"], generator=g)
    t = torch.tensor([500.0])

    def step() -> None:
        if side == "ours":
            out = model(x, text, pooled, t)
        else:
            pos = [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)]
            out = model(x, text, t, pooled, pos, torch.arange(TEXT_LEN), return_dict=False)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step, n_lora


def describe(args: argparse.Namespace, ours: dict, ref: dict) -> str:
    tokens = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)
    return (
        f"config: model_dim {CONFIG['model_dim']}, {CONFIG['num_text_blocks']}+{CONFIG['num_visual_blocks']} blocks, "
        f"{tokens} visual + {TEXT_LEN} text tokens, LoRA rank {RANK} on {ours['lora_modules']} Linears, "
        f"fp32 CPU, {args.threads} threads, {args.steps} timed steps, best of {args.repeats} runs"
    )


if __name__ == "__main__":
    run_dit_step_bench(__file__, __doc__.splitlines()[0], worker, describe)
