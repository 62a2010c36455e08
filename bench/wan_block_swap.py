"""Block-swap overhead of a Wan LoRA training step: the same step with 0 and N swapped blocks, same process.

Usage: python bench/wan_block_swap.py [--blocks 12] [--swap 6] [--steps 3] [--device cpu|cuda] [--dtype bfloat16]

Prints s/step for each setting and the ratio swapped / resident. On CPU the "device" and the host are the same
memory, so the ratio is the cost of the swap schedule itself (hooks, waits, buffer reuse); on a GPU it shows how
much of the host↔device copying is hidden behind compute — musubi-tuner once went from 8 to 24 s/it on Wan 2.2
after a block-swap change (#632), which this ratio would have shown.
"""

from __future__ import annotations

import argparse
import time

import torch

HEADS, HEAD_DIM, FFN, TEXT_DIM = 8, 64, 2048, 512
LATENT = (1, 16, 4, 32, 32)


def make(blocks: int, swap: int, device: str, dtype: torch.dtype):
    from musubi_tuner.modules.offloading import BlockSwapConfig
    from musubi_tuner.networks.lora_wan import create_arch_network
    from musubi_tuner.wan.models.dit import WanModel

    torch.manual_seed(0)
    model = WanModel(dim=HEADS * HEAD_DIM, ffn_dim=FFN, num_heads=HEADS, num_layers=blocks, text_dim=TEXT_DIM).to_dtype(dtype)
    model.requires_grad_(False)
    net = create_arch_network(1.0, 16, 16, None, None, model)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    net.to(device)
    if swap:
        model.enable_block_swap(swap, BlockSwapConfig(device, supports_backward=True, use_pinned_memory=device.startswith("cuda")))
        model.move_to_device_except_swap_blocks(device)
        model.switch_block_swap_for_training()
    else:
        model.to(device)
    model.train()
    return model, list(net.parameters())


def time_steps(model, params, steps: int, device: str, dtype: torch.dtype) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*LATENT, generator=g).to(device, dtype)
    ctx = torch.randn(1, 512, TEXT_DIM, generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)

    def step() -> None:
        if getattr(model, "offloaders", None):
            model.prepare_block_swap_before_forward()
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, t, [ctx[0]])
        out.float().square().mean().backward()
        for p in params:
            p.grad = None

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--swap", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    results = {}
    for swap in (0, a.swap):
        model, params = make(a.blocks, swap, a.device, dtype)
        results[swap] = time_steps(model, params, a.steps, a.device, dtype)
        if swap:
            model.disable_block_swap()
        del model, params
    print(
        f"config: dim {HEADS * HEAD_DIM}, ffn {FFN}, {a.blocks} blocks, 1024 + 512 tokens, LoRA rank 16, {a.dtype} {a.device}, {a.steps} steps"
    )
    for swap, s in results.items():
        print(f"blocks_to_swap {swap:3d}: {s:.3f} s/step")
    print(f"overhead ratio swapped/resident: {results[a.swap] / results[0]:.2f}")


if __name__ == "__main__":
    main()
