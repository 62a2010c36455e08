"""Peak host memory (RSS) while loading a checkpoint: the usual load vs our streaming loader.

Builds a synthetic bf16 checkpoint (many Linear layers, ``--size_gb``, default 2) in a temp directory, then loads it
in separate fresh processes so each peak is independent:

  baseline        safetensors.torch.load_file + model.load_state_dict into a CPU-initialised bf16 model
  mmap_fp8        safetensors safe_open (memory-mapped) tensor by tensor, quantised to fp8 into a meta model
  ours_bf16       load_weights_into_model into a meta model, bf16
  ours_fp8        load_weights_into_model into a meta model, fp8_scaled (block 64)
  scaled_bf16     the same weights as a ComfyUI scaled-fp8 file (per-tensor scale_weight, scale_input, scaled_fp8
                  marker) dequantised to bf16 while streaming (a text encoder without its --fp8_* flag)
  scaled_fp8      that file kept as stored, fp8 + scale (a text encoder with its --fp8_* flag)

For each it prints the peak RSS (VmHWM) minus the RSS just before loading (imports, interpreter), the bytes of the
final weights, and their ratio. Target for ours: <= 1.2x the final weight bytes.

    python bench/load_peak_memory.py                 # ~2 GB checkpoint
    python bench/load_peak_memory.py --size_gb 0.25  # quick run
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("baseline", "mmap_fp8", "ours_bf16", "ours_fp8", "scaled_bf16", "scaled_fp8")
SCALED = ("scaled_bf16", "scaled_fp8")


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _build_model(n_layers: int, dim: int, device: str, dtype):
    import torch
    import torch.nn as nn

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(dim, dim, dtype=dtype) for _ in range(n_layers))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with torch.device(device):
        return Stack()


def _shape_for(size_gb: float) -> tuple[int, int]:
    dim = 4096 if size_gb >= 0.5 else 1024
    per_layer = (dim * dim + dim) * 2
    return max(1, round(size_gb * 1e9 / per_layer)), dim


def _write_checkpoint(path: Path, n_layers: int, dim: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(n_layers):
        sd[f"blocks.{i}.weight"] = (torch.randn(dim, dim, generator=g) * dim**-0.5).to(torch.bfloat16)
        sd[f"blocks.{i}.bias"] = torch.zeros(dim, dtype=torch.bfloat16)
    save_file(sd, str(path))


def _write_scaled_fp8(src: Path, path: Path) -> None:
    """The checkpoint in ComfyUI's scaled-fp8 layout: per-tensor ``scale_weight`` (float32 scalar), ``scale_input``, marker."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = {}
    for key, t in load_file(src).items():
        if key.endswith(".weight"):
            scale = t.float().abs().amax() / 448.0
            sd[key] = (t.float() / scale).to(torch.float8_e4m3fn)
            sd[key[: -len("weight")] + "scale_weight"] = scale
            sd[key[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
        else:
            sd[key] = t
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(path))


def _final_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _child(variant: str, path: str, n_layers: int, dim: int) -> dict:
    import torch
    import torch.nn as nn

    from musubi_tuner.modules.fp8_optimization import Fp8Config, apply_fp8_monkey_patch, quantize_weight
    from musubi_tuner.utils.model_loading import load_weights_into_model

    before = _vm("VmRSS")
    t0 = time.perf_counter()
    if variant == "baseline":
        from safetensors.torch import load_file

        model = _build_model(n_layers, dim, "cpu", torch.bfloat16)
        model.load_state_dict(load_file(path))
    elif variant == "mmap_fp8":
        import ctypes

        from safetensors import safe_open

        libc = ctypes.CDLL("libc.so.6")

        model = _build_model(n_layers, dim, "meta", torch.bfloat16)
        scales = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                mod_name, _, leaf = key.rpartition(".")
                module = model.get_submodule(mod_name)
                t = f.get_tensor(key)
                if leaf == "weight":
                    t, scales[f"{mod_name}.scale_weight"] = quantize_weight(t, "block", 64)
                else:
                    t = t.clone()
                module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
                del t
                libc.malloc_trim(0)  # same heap trimming as ours, so the difference is the memory map alone
            apply_fp8_monkey_patch(model, scales)
    elif variant in SCALED:
        model = _build_model(n_layers, dim, "meta", torch.bfloat16)
        dequantize = variant == "scaled_bf16"
        load_weights_into_model(model, path, dtype=torch.bfloat16, dequantize_prequantized=dequantize, progress=False)
    else:
        model = _build_model(n_layers, dim, "meta", torch.bfloat16)
        fp8 = Fp8Config(mode="block", block_size=64) if variant == "ours_fp8" else None
        load_weights_into_model(model, path, fp8=fp8, progress=False)
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM")
    return {"variant": variant, "before": before, "peak": peak, "final": _final_bytes(model), "seconds": seconds}


def _run_child(variant: str, path: Path, n_layers: int, dim: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--path", str(path), "--layers", str(n_layers), "--dim", str(dim)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size_gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.path, args.layers, args.dim)))
        return

    n_layers, dim = _shape_for(args.size_gb)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "synthetic.safetensors"
        _write_checkpoint(path, n_layers, dim)
        scaled_path = Path(tmp) / "synthetic_fp8_scaled.safetensors"
        if any(v in SCALED for v in args.variants):
            _write_scaled_fp8(path, scaled_path)
        size = path.stat().st_size
        print(
            f"checkpoint: {n_layers} x Linear({dim}, {dim}) bf16, {size / 2**30:.2f} GiB; {platform.machine()}, python {platform.python_version()}"
        )
        print(f"{'variant':<10} {'peak RSS - pre-load':>20} {'final weights':>14} {'ratio':>6} {'seconds':>8}")
        for v in args.variants:
            r = _run_child(v, scaled_path if v in SCALED else path, n_layers, dim)
            delta = r["peak"] - r["before"]
            print(
                f"{v:<10} {delta / 2**30:>16.2f} GiB {r['final'] / 2**30:>10.2f} GiB {delta / r['final']:>6.2f} {r['seconds']:>8.1f}"
            )


if __name__ == "__main__":
    main()
