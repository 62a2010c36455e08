"""What ``--vae_cache_cpu`` moves off the device: the Wan 2.1 VAE's causal feature cache during encode and decode.

Default (any machine): the real-size ``AutoencoderKLWan`` (2.1 defaults, 127 M parameters) runs under
``FakeTensorMode`` (shapes only, no memory, no weights), and the bytes the cache holds at most are read from our
``OffDeviceFeatureCache`` — the device memory the option frees, up to the one entry being read at a time.

``--device cuda``: random weights on the GPU, real encode / decode, peak ``torch.cuda.max_memory_allocated`` with and
without the option, side by side.

    python bench/wan_vae_cache.py [--frames 81 --height 480 --width 832] [--device cuda]
"""

from __future__ import annotations

import argparse
import time


def fake_cache_bytes(frames: int, height: int, width: int) -> tuple[int, int]:
    """(encoder, decoder) cache peak bytes in bf16 for one video, from a fake-tensor run."""
    import torch
    from diffusers import AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensorMode

    from musubi_tuner.wan.vae import keep_feature_cache_on_cpu

    with FakeTensorMode():
        vae = AutoencoderKLWan()  # float32 (fake tensors cannot be cast); bf16 holds half the bytes
        keep_feature_cache_on_cpu(vae)
        vae.encode(torch.zeros(1, 3, frames, height, width))
        vae.clear_cache()
        enc = vae.cpu_cache_peak_bytes // 2
        vae.cpu_cache_peak_bytes = 0
        vae.decode(torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8))
        vae.clear_cache()
        return enc, vae.cpu_cache_peak_bytes // 2


def gpu_peaks(frames: int, height: int, width: int, cache_on_cpu: bool) -> dict[str, float]:
    """Peak allocated GiB for encode and decode (bf16, random weights) and their seconds."""
    import torch
    from diffusers import AutoencoderKLWan

    from musubi_tuner.wan.vae import WanVae

    torch.manual_seed(0)
    vae = WanVae(AutoencoderKLWan().to("cuda", torch.bfloat16).eval(), "wan2.1", cache_on_cpu=cache_on_cpu)
    x = torch.rand(1, 3, frames, height, width, device="cuda") * 2 - 1
    out: dict[str, float] = {}
    z = None
    for name in ("encode", "decode"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if name == "encode":
            z = vae.encode(x)
        else:
            vae.decode(z)
        torch.cuda.synchronize()
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", choices=("fake", "cuda"), default="fake")
    a = p.parse_args()
    if a.device == "fake":
        enc, dec = fake_cache_bytes(a.frames, a.height, a.width)
        print(
            f"{a.frames} frames {a.width}x{a.height}, bf16: causal cache peak encode {enc / 2**30:.2f} GiB, decode {dec / 2**30:.2f} GiB"
        )
        return
    for flag in (False, True):
        r = gpu_peaks(a.frames, a.height, a.width, flag)
        print(
            f"--vae_cache_cpu {'on ' if flag else 'off'}: encode {r['encode_gib']:.2f} GiB {r['encode_s']:.1f} s, "
            f"decode {r['decode_gib']:.2f} GiB {r['decode_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
