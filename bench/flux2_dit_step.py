"""FLUX.2 DiT LoRA training step (forward + backward) — ours vs diffusers with a real PEFT LoRA, same config and
inputs, CPU.

Usage: python bench/flux2_dit_step.py [--steps 3] [--threads 2] [--repeats 2]

Each side runs in its own subprocess so that peak memory (ru_maxrss above the resident size just before the first
step) is not polluted by the other model. Ours: ``Flux2`` + ``networks.lora_flux_2`` (rank 16 on every Linear of the
double and single blocks). diffusers: ``Flux2Transformer2DModel`` (the same weights through the key table) +
``peft`` ``LoraConfig(r=16)`` on the same layers (the fused ``qkv`` of a double block is ``to_q/to_k/to_v`` there,
so diffusers carries three rank-16 adapters where we carry one). Two reference images ride along, as in editing.
"""

from __future__ import annotations

import argparse

import torch
from dit_step_harness import run_dit_step_bench

OFFICIAL = dict(
    in_channels=128, context_in_dim=3 * 256, hidden_size=256, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(16, 16, 16, 16)
)
TARGET_HW = (32, 32)  # 1024 target tokens (a 512x512 image)
REFS = ((16, 16), (16, 16))  # two references of 256 tokens
TEXT_LEN = 128
RANK = 16
DIFFUSERS_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out",
    "single_transformer_blocks.2.attn.to_out", "single_transformer_blocks.3.attn.to_out",
]  # fmt: skip


def _inputs(guidance: bool):
    from musubi_tuner.flux_2.sampling import build_img_ids, build_txt_ids

    g = torch.Generator().manual_seed(1)
    n = TARGET_HW[0] * TARGET_HW[1] + sum(h * w for h, w in REFS)
    img = torch.randn(1, n, 128, generator=g)
    ids = build_img_ids(TARGET_HW, list(REFS))
    txt = torch.randn(1, TEXT_LEN, OFFICIAL["context_in_dim"], generator=g)
    return img, ids, txt, build_txt_ids(TEXT_LEN), torch.tensor([0.5]), (torch.tensor([1.0]) if guidance else None)


def worker(args: argparse.Namespace):
    """One side's model, LoRA and inputs; the step and the LoRA module count."""
    from musubi_tuner.flux_2.models.dit import Flux2
    from musubi_tuner.flux_2.models.keys import official_to_diffusers

    side = args.worker
    ours = Flux2(**OFFICIAL, guidance_embed=True)
    sd = {k: torch.randn_like(v) * 0.02 for k, v in ours.state_dict().items()}
    img, ids, txt, txt_ids, t, gd = _inputs(True)
    n_target = TARGET_HW[0] * TARGET_HW[1]
    if side == "ours":
        from musubi_tuner.networks import lora_flux_2

        ours.load_state_dict(sd)
        model = ours.requires_grad_(False)
        net = lora_flux_2.create_arch_network(1.0, RANK, RANK, None, None, model)
        net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
        n_lora = len(net.unet_loras)

        def forward():
            return model(img, ids, txt, txt_ids, t, gd)
    else:
        from diffusers import Flux2Transformer2DModel
        from peft import LoraConfig

        model = Flux2Transformer2DModel(
            in_channels=128, num_layers=OFFICIAL["depth"], num_single_layers=OFFICIAL["depth_single_blocks"],
            attention_head_dim=64, num_attention_heads=4, joint_attention_dim=OFFICIAL["context_in_dim"],
            axes_dims_rope=OFFICIAL["axes_dim"], guidance_embeds=True,
        )  # fmt: skip
        del ours
        model.load_state_dict(official_to_diffusers(sd))
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=DIFFUSERS_TARGETS))
        n_lora = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)

        def forward():
            return model(img, txt, t, ids, txt_ids, guidance=gd, return_dict=False)[0]

    model.train()

    def step() -> None:
        forward()[:, :n_target].float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step, n_lora


def describe(args: argparse.Namespace, ours: dict, ref: dict) -> str:
    tokens = TARGET_HW[0] * TARGET_HW[1] + sum(h * w for h, w in REFS)
    return (
        f"config: hidden {OFFICIAL['hidden_size']}, {OFFICIAL['depth']} double + {OFFICIAL['depth_single_blocks']} single blocks, "
        f"{tokens} image tokens (2 references) + {TEXT_LEN} text, LoRA rank {RANK} "
        f"(ours {ours['lora_modules']} modules, diffusers/PEFT {ref['lora_modules']}), fp32 CPU, {args.threads} threads, "
        f"{args.steps} timed steps, best of {args.repeats} runs"
    )


if __name__ == "__main__":
    run_dit_step_bench(__file__, __doc__.splitlines()[0], worker, describe)
