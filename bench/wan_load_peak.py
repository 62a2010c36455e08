"""Peak host memory while loading the Wan DiT and the UMT5 encoder with our loaders, against the final weight bytes.

Writes a mid-size Wan DiT (official key layout, bf16, width 1536 like the 1.3B model, ``--layers`` blocks) and an
official-layout UMT5 ``.pth`` (``--t5_width``, ``--t5_layers``, default 8) into a temp dir, then loads each in a fresh process:

  dit_bf16    wan.models.loading.load_dit, bfloat16
  dit_fp8     load_dit with --fp8_scaled (block 64)
  t5_bf16     wan.text_encoders.WanT5Encoder.load (torch.load(weights_only=True, mmap=True), streamed into a meta model)
  t5_fp8      the same with --fp8_t5

Prints peak RSS (VmHWM) minus the RSS before loading, the final parameter bytes and their ratio (target <= 1.1).

    python bench/wan_load_peak.py [--layers 10] [--t5_width 2048] [--t5_layers 8]
    # UMT5-XXL at its real size (11.4 GB .pth; needs ~12 GB RAM to write and the disk space):
    python bench/wan_load_peak.py --variants t5_bf16 t5_fp8 --t5_width 4096 --t5_layers 24 --t5_vocab 256384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("dit_bf16", "dit_fp8", "t5_bf16", "t5_fp8")


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _params(layers: int) -> dict:
    return dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=layers, text_dim=4096)


def write(work: Path, layers: int, t5_width: int, t5_layers: int = 8, t5_vocab: int = 32000) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import UMT5Config, UMT5EncoderModel

    from musubi_tuner.demo.snapshot_io import seeded
    from musubi_tuner.wan.models.dit import WanModel
    from musubi_tuner.wan.text_encoders import umt5_official_to_hf

    with seeded(0):
        m = WanModel(**_params(layers))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}, str(work / "dit.safetensors"),
              metadata={"wan_dit_config": json.dumps({**_params(layers), "patch_size": [1, 2, 2]})})  # fmt: skip
    del m
    cfg = UMT5Config(vocab_size=t5_vocab, d_model=t5_width, d_kv=64, d_ff=t5_width * 5 // 2, num_layers=t5_layers,
                     num_heads=t5_width // 64, feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    with torch.device("meta"):
        t5 = UMT5EncoderModel(cfg)
    shapes = {k: v.shape for k, v in t5.state_dict().items()}
    names = ["token_embedding.weight", "norm.weight"] + [
        f"blocks.{n}.{p}.weight"
        for n in range(t5_layers)
        for p in (
            "norm1",
            "attn.q",
            "attn.k",
            "attn.v",
            "attn.o",
            "pos_embedding.embedding",
            "norm2",
            "ffn.gate.0",
            "ffn.fc1",
            "ffn.fc2",
        )
    ]
    # random bf16 weights drawn tensor by tensor (a real-size float32 model would not fit next to the checkpoint)
    gen = torch.Generator().manual_seed(1)
    sd = {n: torch.randn(shapes[umt5_official_to_hf(n)], generator=gen, dtype=torch.bfloat16) * 0.02 for n in names}
    torch.save(sd, work / "t5.pth")
    del sd
    tok = work / "google" / "umt5-xxl"
    from musubi_tuner.demo.wan_bundle import _train_t5_tokenizer

    tok.mkdir(parents=True)
    _train_t5_tokenizer().save(str(tok / "tokenizer.json"))
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5TokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def child(variant: str, work: Path) -> dict:
    import torch
    import transformers.models.umt5.modeling_umt5  # noqa: F401 - imported before "before": we measure the weights

    from musubi_tuner.wan.configs import get_task_config
    from musubi_tuner.wan.models.loading import load_dit
    from musubi_tuner.wan.text_encoders import WanT5Encoder

    before = _vm("VmRSS")
    if variant.startswith("dit"):
        model = load_dit(
            get_task_config("t2v-1.3B"),
            work / "dit.safetensors",
            dtype=torch.bfloat16,
            fp8_base=variant == "dit_fp8",
            fp8_scaled=variant == "dit_fp8",
        )
    else:
        model = WanT5Encoder.load(work / "t5.pth", dtype=torch.bfloat16, fp8=variant == "t5_fp8").model
    peak = _vm("VmHWM")
    seen, final = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            final += t.numel() * t.element_size()
    return {"variant": variant, "extra": peak - before, "final": final}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--t5_width", type=int, default=2048)
    p.add_argument("--t5_layers", type=int, default=8, help="UMT5 blocks (the real UMT5-XXL has 24)")
    p.add_argument("--t5_vocab", type=int, default=32000, help="UMT5 vocabulary (the real UMT5-XXL has 256384)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.work)))
        return
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        write(work, a.layers, a.t5_width, a.t5_layers, a.t5_vocab)
        print(f"{'variant':10s} {'peak−before GiB':>16s} {'final GiB':>10s} {'ratio':>6s}")
        for v in a.variants:
            out = subprocess.run(
                [sys.executable, __file__, "--child", v, "--work", str(work)], check=True, capture_output=True, text=True
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{v:10s} {r['extra'] / 2**30:16.2f} {r['final'] / 2**30:10.2f} {r['extra'] / r['final']:6.2f}")


if __name__ == "__main__":
    main()
