"""What a Kandinsky 5 DiT keeps resident after a forward pass with gradient checkpointing: ours vs diffusers.

Each side runs in its own process with glibc's mmap threshold pinned at 128 KiB (``mallopt``), so large tensors are
mapped and unmapped and the resident size follows the live tensors. After one warm-up step, a second forward runs
under ``torch.autograd.graph.saved_tensors_hooks`` and reports:

- ``rss_mib``: resident-size growth over that forward (what stays alive until backward);
- ``saved_mib``: bytes of the distinct storages autograd saved outside the checkpointed blocks (inside them the
  checkpoint keeps only the block inputs), with the largest tensors listed.

Both models get the same hand-written rank-16 LoRA (``bench/k5_dit_step.py``); ``--our_network`` gives ours the
project's ``networks.lora_kandinsky`` instead. Configs: ``bench`` (model_dim 256, 2+4 blocks, 1024 visual + 64 text
tokens) and ``lite`` (Video Lite widths: model_dim 1792, ff 7168, 28 heads, 2+2 blocks, 1024 visual + 256 text
tokens; about 1.5 min per side on 2 cores).

    python bench/k5_checkpointing_residency.py --config bench
    python bench/k5_checkpointing_residency.py --config lite
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "bench": (
        dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=512, in_text_dim2=128, time_dim=128, model_dim=256,
             ff_dim=1024, num_text_blocks=2, num_visual_blocks=4, axes_dims=(8, 12, 12), visual_cond=True),
        (1, 4, 32, 32), 64,
    ),
    "lite": (
        dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512, model_dim=1792,
             ff_dim=7168, num_text_blocks=2, num_visual_blocks=2, axes_dims=(16, 24, 24), visual_cond=True),
        (1, 4, 32, 32), 256,
    ),
}  # fmt: skip


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(side: str, config: str, our_network: bool) -> dict:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from k5_dit_step import add_lora

    cfg, (b, f, h, w), text_len = CONFIGS[config]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if side == "ours":
        from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D

        model = DiffusionTransformer3D(**cfg)
    else:
        from diffusers import Kandinsky5Transformer3DModel

        model = Kandinsky5Transformer3DModel(**cfg)
    model.enable_gradient_checkpointing()
    if side == "ours" and our_network:
        import musubi_tuner.networks.lora_kandinsky as lk

        model.requires_grad_(False)
        lk.create_arch_network(1.0, 16, 16, None, None, model).apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    else:
        add_lora(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, f, h, w, 33, generator=g)
    text = torch.randn(b, text_len, cfg["in_text_dim"], generator=g)
    pooled = torch.randn(b, cfg["in_text_dim2"], generator=g)
    t = torch.tensor([500.0])

    def forward():
        if side == "ours":
            return model(x, text, pooled, t)
        pos = [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)]
        return model(x, text, t, pooled, pos, torch.arange(text_len), return_dict=False)

    out = forward()
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    del out
    gc.collect()
    saved: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape))
        return tensor

    before = _rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = forward()
    after = _rss()  # measured while the output (and the graph behind it) is alive
    del out
    largest = sorted(saved.values(), reverse=True)[:5]
    return {
        "side": side + (" (networks.lora_kandinsky)" if side == "ours" and our_network else ""),
        "rss_mib": (after - before) / 2**20,
        "saved_mib": sum(n for n, _ in saved.values()) / 2**20,
        "largest": [f"{list(shape)} {n / 2**20:.2f} MiB" for n, shape in largest],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=tuple(CONFIGS), default="bench")
    p.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--our_network", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.our_network)))
        return
    runs = [("ours", False), ("ours", True), ("diffusers", False)]
    print(f"config {args.config}; gradient checkpointing on; fp32 CPU; glibc mmap threshold 128 KiB")
    print(f"{'side':36s} {'RSS growth MiB':>15s} {'saved outside blocks MiB':>25s}  largest saved")
    for side, net in runs:
        cmd = [sys.executable, __file__, "--worker", side, "--config", args.config] + (["--our_network"] if net else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{r['side']:36s} {r['rss_mib']:15.2f} {r['saved_mib']:25.2f}  {', '.join(r['largest'][:3])}")


if __name__ == "__main__":
    main()
