"""Peak host memory while loading the Qwen-Image DiT (ours: streamed into a meta model) and the Qwen2.5-VL encoder.

Writes synthetic checkpoints at the released widths with fewer layers (``--dit_layers``, ``--te_layers``) in a temp
directory, then loads each in a fresh process and prints peak RSS (VmHWM) minus the RSS just before loading, the
bytes of the final weights and their ratio (checklist target: <= 1.1x).

  dit_bf16      qwen_image.models.loading.load_dit, bf16 (released layout with the ComfyUI prefix)
  dit_fp8       the same with --fp8_scaled (block 64)
  te_bf16       qwen_image.text_encoders.QwenVLEncoder (streamed into a meta model), bf16; every weight is read
                once after loading (a tensor may still be memory-mapped, not yet resident)
  te_fp8        the same with --fp8_vl (Linear weights quantised while streaming)

    python bench/qwen_image_load_peak.py --dit_layers 2 --te_layers 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def write_dit(path: Path, layers: int) -> None:
    import torch

    from musubi_tuner.qwen_image.configs import dit_params_for
    from musubi_tuner.qwen_image.models.dit import QwenImageTransformer
    from musubi_tuner.utils.atomic import save_safetensors_atomic

    with torch.device("meta"):
        model = QwenImageTransformer(**dit_params_for("original", num_layers=layers))
    sd = {
        f"model.diffusion_model.{k}": torch.empty(v.shape, dtype=torch.bfloat16).normal_(0, 0.02)
        for k, v in model.state_dict().items()
    }
    save_safetensors_atomic(sd, path, metadata={})


def write_te(path: Path, layers: int) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from musubi_tuner.demo.bundles import write_tiny_qwen25vl

    write_tiny_qwen25vl(path, 0)  # tokenizer + processor files; the model is replaced below
    cfg = Qwen2_5_VLConfig(
        text_config={"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": layers,
                     "num_attention_heads": 28, "num_key_value_heads": 4,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
        vision_config={"depth": 1, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584},
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)


def worker(variant: str, path: str) -> dict:
    import torch

    before = _vm("VmRSS")
    if variant.startswith("dit"):
        from musubi_tuner.qwen_image.configs import get_model_version
        from musubi_tuner.qwen_image.models.loading import load_dit

        model = load_dit(get_model_version("original"), path, dtype=torch.bfloat16, fp8_scaled=variant == "dit_fp8")
        tensors = list(model.parameters()) + list(model.buffers())
    else:
        from musubi_tuner.qwen_image.text_encoders import QwenVLEncoder

        enc = QwenVLEncoder(path, dtype=torch.bfloat16, fp8_vl=variant == "te_fp8")
        tensors = list(enc.model.parameters()) + list(enc.model.buffers())
        for t in tensors:  # page in every weight: memory-mapped tensors are not resident until read
            t.view(torch.uint8).max() if t.dtype.itemsize == 1 else t.sum()  # (fp8: no float32 copy, it would count)
    final = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    return {"variant": variant, "peak_extra": _vm("VmHWM") - before, "final": final}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dit_layers", type=int, default=2)
    p.add_argument("--te_layers", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["dit_bf16", "dit_fp8", "te_bf16", "te_fp8"])
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        dit, te = Path(tmp) / "qwen_image_bf16.safetensors", Path(tmp) / "qwen25vl"
        if any(v.startswith("dit") for v in args.variants):
            write_dit(dit, args.dit_layers)
        if any(v.startswith("te") for v in args.variants):
            write_te(te, args.te_layers)
        print(f"DiT: {args.dit_layers} of 60 blocks at full width; Qwen2.5-VL: {args.te_layers} of 28 layers at full width")
        print(f"{'variant':10s} {'peak-pre GiB':>12s} {'final GiB':>10s} {'ratio':>6s}")
        for v in args.variants:
            path = dit if v.startswith("dit") else te
            out = subprocess.run([sys.executable, __file__, "--worker", v, str(path)], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{v:10s} {r['peak_extra'] / 2**30:12.2f} {r['final'] / 2**30:10.2f} {r['peak_extra'] / r['final']:6.2f}")


if __name__ == "__main__":
    main()
