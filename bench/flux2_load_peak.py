"""Peak host memory while loading the FLUX.2 DiT and both text encoders (Qwen3, Mistral 3), bf16 and fp8.

Writes mid-size random checkpoints in the real layouts (official BFL DiT file; HF snapshot directories for Qwen3 and
Mistral 3 with their tokenizers from the tiny bundle), then loads each in a fresh process through the product's
loaders (``flux_2.models.loading.load_dit``, ``flux_2.text_encoders.Flux2TextEncoder``) and prints the peak RSS
(VmHWM) minus the RSS just before loading, against the bytes of the final weights. Target: <= 1.1x.

    python bench/flux2_load_peak.py [--scale 1.0] [--cases qwen3_fp8 mistral3_fp8]
    # Qwen3 at the released Qwen3-4B size (an 8 GB random checkpoint, written tensor by tensor; klein-4b's encoder):
    python bench/flux2_load_peak.py --qwen3_4b_real --cases qwen3_bf16 qwen3_fp8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = ("dit_bf16", "dit_fp8", "qwen3_bf16", "qwen3_fp8", "mistral3_bf16", "mistral3_fp8")


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _final_bytes(model) -> int:
    import itertools

    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def write_checkpoints(root: Path, scale: float) -> dict[str, str]:
    """A DiT (hidden 1536·scale, 4 double / 8 single blocks) and 12-layer encoders (hidden 1536·scale), bf16."""
    import torch
    from safetensors.torch import save_file
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    from musubi_tuner.demo.flux2_bundles import write_flux2_bundle
    from musubi_tuner.flux_2.models.dit import Flux2

    hidden = int(1536 * scale) // 128 * 128
    tiny = write_flux2_bundle(root / "tiny")
    dit_cfg = dict(in_channels=128, context_in_dim=3 * hidden, hidden_size=hidden, num_heads=hidden // 128, depth=4,
                   depth_single_blocks=8, axes_dim=(32, 32, 32, 32), guidance_embed=False)  # fmt: skip
    with torch.device("meta"):
        dit = Flux2(**dit_cfg)
    sd = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in dit.state_dict().items()}
    meta = {"flux2_dit_config": json.dumps({**dit_cfg, "axes_dim": list(dit_cfg["axes_dim"])}), "flux2_model_version": "klein-4b"}
    save_file(sd, str(root / "dit.safetensors"), meta)
    del sd
    common = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=12, num_attention_heads=hidden // 128,
                  num_key_value_heads=2, head_dim=128, vocab_size=640)  # fmt: skip
    q = Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=False)).to(torch.bfloat16)
    q.save_pretrained(root / "qwen3")
    del q
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "qwen3" / f).write_bytes((tiny.text_encoder_qwen3 / f).read_bytes())
    m_cfg = Mistral3Config(
        text_config={"model_type": "mistral", **common},
        vision_config={"model_type": "pixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 32, "image_size": 30, "patch_size": 6},
        spatial_merge_size=1, image_token_index=7,
    )  # fmt: skip
    m = Mistral3ForConditionalGeneration(m_cfg).to(torch.bfloat16)
    m.save_pretrained(root / "mistral3")
    del m
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "mistral3" / f).write_bytes((tiny.text_encoder_mistral3 / f).read_bytes())
    return {"dit": str(root / "dit.safetensors"), "qwen3": str(root / "qwen3"), "mistral3": str(root / "mistral3")}


# the released Qwen3-4B (config.json of Qwen/Qwen3-4B): what klein-4b encodes with
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960)  # fmt: skip


def write_real_qwen3_4b(root: Path) -> dict[str, str]:
    """A random bf16 Qwen3-4B snapshot (config + one safetensors file + the tiny bundle's tokenizer), streamed to disk
    one tensor at a time so writing it needs one tensor of memory."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from musubi_tuner.demo.flux2_bundles import write_flux2_bundle
    from musubi_tuner.networks.stream_writer import StreamingSafetensorsWriter

    tiny = write_flux2_bundle(root / "tiny")
    out = root / "qwen3"
    out.mkdir()
    config = Qwen3Config(**QWEN3_4B)
    config.save_pretrained(out)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    layout = {k: (torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    with StreamingSafetensorsWriter(out / "model.safetensors", layout) as writer:
        for key, (dtype, shape) in layout.items():
            writer.write(key, torch.randn(shape, generator=gen, dtype=dtype) * 0.02)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tiny.text_encoder_qwen3 / f).read_bytes())
    return {"qwen3": str(out)}


def child(case: str, paths: dict[str, str]) -> dict:
    import torch

    from musubi_tuner.flux_2.configs import get_model_version

    kind, prec = case.split("_")
    if kind != "dit":  # import the model classes and read the tokenizer first: only the weights are measured
        from transformers import AutoTokenizer, MistralConfig, MistralModel, Qwen3Config, Qwen3Model

        AutoTokenizer.from_pretrained(paths[kind])
        # the first model built pays a fixed ~7 MiB of lazy imports / first-use initialisation (not weights): warm up
        # with a throwaway 1-layer model on the meta device
        config_cls, model_cls = (MistralConfig, MistralModel) if kind == "mistral3" else (Qwen3Config, Qwen3Model)
        with torch.device("meta"):
            model_cls(config_cls(num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=64, vocab_size=64))  # fmt: skip
    before = _vm("VmRSS")
    if kind == "dit":
        from musubi_tuner.flux_2.models.loading import load_dit

        model = load_dit(get_model_version("klein-4b"), paths["dit"], dtype=torch.bfloat16, fp8_scaled=prec == "fp8")
    else:
        from musubi_tuner.flux_2.text_encoders import Flux2TextEncoder

        version = get_model_version("dev" if kind == "mistral3" else "klein-4b")
        model = Flux2TextEncoder(paths[kind], version, dtype=torch.bfloat16, fp8=prec == "fp8").model
    return {"case": case, "before": before, "peak": _vm("VmHWM"), "final": _final_bytes(model)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="width multiplier of the checkpoints (1.0: hidden 1536)")
    p.add_argument("--qwen3_4b_real", action="store_true", help="only Qwen3, at the released Qwen3-4B size (8 GB on disk)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which loads to measure (all)")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.paths))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_real_qwen3_4b(Path(tmp)) if args.qwen3_4b_real else write_checkpoints(Path(tmp), args.scale)
        print(f"{'case':<14} {'peak - pre-load':>16} {'final weights':>14} {'ratio':>6}")
        for case in args.cases:
            cmd = [sys.executable, __file__, "--child", case, "--paths", json.dumps(paths)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            delta = r["peak"] - r["before"]
            print(f"{case:<14} {delta / 2**20:>12.1f} MiB {r['final'] / 2**20:>10.1f} MiB {delta / r['final']:>6.2f}")


if __name__ == "__main__":
    main()
