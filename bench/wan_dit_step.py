"""Wan DiT training step (forward + backward with LoRA) — ours vs diffusers' WanTransformer3DModel, same config and
inputs, each side in its own process.

Usage: python bench/wan_dit_step.py [--steps 3] [--threads 2] [--device cpu|cuda] [--dtype float32|bfloat16]

Ours gets ``networks.lora_wan`` (rank 16); diffusers gets a real PEFT LoRA (rank 16) on the same layers: self- and
cross-attention q/k/v/o and both FFN Linears of every block. Peak memory: CPU ru_maxrss above the resident size
before the first step, or CUDA max_memory_allocated above the allocated size before it.
"""

from __future__ import annotations

import argparse

import torch
from dit_step_harness import run_dit_step_bench

HEADS, HEAD_DIM, FFN, LAYERS, TEXT_DIM = 8, 64, 2048, 8, 512
LATENT = (1, 16, 4, 32, 32)  # B, C, F, H, W -> 4·16·16 = 1024 tokens
RANK = 16


def build(side: str):
    if side == "ours":
        from musubi_tuner.networks.lora_wan import create_arch_network
        from musubi_tuner.wan.models.dit import WanModel

        model = WanModel(dim=HEADS * HEAD_DIM, ffn_dim=FFN, num_heads=HEADS, num_layers=LAYERS, text_dim=TEXT_DIM)
        model.requires_grad_(False)
        net = create_arch_network(1.0, RANK, RANK, None, None, model)
        net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
        return model, net, len(net.unet_loras)
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    model = WanTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, ffn_dim=FFN, num_layers=LAYERS, text_dim=TEXT_DIM
    )
    model.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights="gaussian"))
    n = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A.default"))
    return model, None, n


def worker(args: argparse.Namespace):
    """One side's model, LoRA and inputs on ``--device`` in ``--dtype``; the step and the LoRA module count."""
    side, device = args.worker, args.device
    dt = getattr(torch, args.dtype)
    model, net, n_lora = build(side)
    model.to(device=device, dtype=dt)
    if net is not None:
        net.to(device=device, dtype=torch.float32)
        params = list(net.parameters())
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*LATENT, generator=g).to(device, dt)
    ctx = torch.randn(1, 512, TEXT_DIM, generator=g).to(device, dt)
    t = torch.tensor([500.0], device=device)

    def step() -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=dt, enabled=dt != torch.float32):
            out = model(x, t, ctx) if side == "ours" else model(x, t, ctx, return_dict=False)[0]
        out.float().square().mean().backward()
        for p in params:
            p.grad = None

    return step, n_lora


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def describe(a: argparse.Namespace, ours: dict, ref: dict) -> str:
    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    return (
        f"config: dim {HEADS * HEAD_DIM} ({HEADS} heads), ffn {FFN}, {LAYERS} blocks, {tokens} tokens + 512 text, LoRA rank {RANK} "
        f"on {ours['lora_modules']} (ours) / {ref['lora_modules']} (PEFT) Linears, {a.dtype} {a.device}, {a.steps} timed steps, best of {a.repeats}"
    )


if __name__ == "__main__":
    run_dit_step_bench(__file__, __doc__.splitlines()[0], worker, describe, add_arguments)
