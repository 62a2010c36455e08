"""Qwen-Image DiT LoRA training step (forward + backward) — ours vs diffusers + PEFT, same config, same inputs, CPU.

Usage: python bench/qwen_image_dit_step.py [--steps 3] [--threads 2] [--repeats 2]

Ours: ``QwenImageTransformer`` with ``networks.lora_qwen_image`` (rank 16). Diffusers: ``QwenImageTransformer2DModel``
with a real PEFT LoRA (``add_adapter(LoraConfig)``, rank 16) on the same 12 Linears of every block (attention q/k/v/out
of both streams and both MLPs; modulations excluded). Same random weights (ours loads the diffusers state dict), a
batch of 2 with padded, masked text. Each side runs in its own subprocess; peak = ``ru_maxrss`` minus the RSS just
before the first step.
"""

from __future__ import annotations

import argparse

import torch
from dit_step_harness import run_dit_step_bench

CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=512,
    axes_dims_rope=(16, 24, 24),
)
LATENT_HW = (64, 64)  # latent 64x64 -> 1024 image tokens
TEXT_LENS = (96, 64)
RANK = 16
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]  # fmt: skip


def worker(args: argparse.Namespace):
    """One side's model, LoRA and inputs; the step and the LoRA module count."""
    from diffusers import QwenImageTransformer2DModel

    side = args.worker
    ref = QwenImageTransformer2DModel(**CONFIG)
    sd = {k: torch.randn_like(v) * 0.02 for k, v in ref.state_dict().items()}
    if side == "ours":
        from musubi_tuner.networks.lora_qwen_image import create_arch_network
        from musubi_tuner.qwen_image.models.dit import QwenImageTransformer

        del ref
        model = QwenImageTransformer(**CONFIG)
        model.load_state_dict(sd)
        model.requires_grad_(False)
        net = create_arch_network(1.0, RANK, RANK, None, None, model)
        net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
        n_lora = len(net.unet_loras)
    else:
        from peft import LoraConfig

        model = ref
        model.load_state_dict(sd)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=PEFT_TARGETS, init_lora_weights="gaussian"))
        n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    model.train()
    g = torch.Generator().manual_seed(1)
    h, w = LATENT_HW
    n_img = (h // 2) * (w // 2)
    x = torch.randn(2, n_img, 64, generator=g)
    lmax = max(TEXT_LENS)
    text = torch.randn(2, lmax, CONFIG["joint_attention_dim"], generator=g)
    mask = torch.zeros(2, lmax, dtype=torch.bool)
    for i, n in enumerate(TEXT_LENS):
        mask[i, :n] = True
    t = torch.tensor([0.3, 0.7])
    shapes = [(1, h // 2, w // 2)]

    def step() -> None:
        if side == "ours":
            out = model(x, text, mask, t, shapes)
        else:
            out = model(x, text, mask, t, img_shapes=[shapes] * 2, return_dict=False)[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step, n_lora


def describe(args: argparse.Namespace, ours: dict, ref: dict) -> str:
    dim = CONFIG["attention_head_dim"] * CONFIG["num_attention_heads"]
    return (
        f"config: hidden {dim}, {CONFIG['num_layers']} blocks, batch 2 x ({LATENT_HW[0] // 2 * LATENT_HW[1] // 2} image + "
        f"{'/'.join(map(str, TEXT_LENS))} masked text tokens), LoRA rank {RANK} on {ours['lora_modules']} / "
        f"{ref['lora_modules']} Linears, fp32 CPU, {args.threads} threads, {args.steps} timed steps, best of {args.repeats}"
    )


if __name__ == "__main__":
    run_dit_step_bench(__file__, __doc__.splitlines()[0], worker, describe)
