"""merge_lora (streaming, several LoRAs, LoHa, scaled fp8) and convert_lora (exact name tables, alpha folding)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi_tuner import convert_lora, merge_lora
from musubi_tuner.modules.fp8_optimization import dequantize_weight, quantize_weight
from musubi_tuner.networks.convert import to_default, to_other
from musubi_tuner.networks.merge import load_adapter, merge_lora_files, merge_lora_into_state_dict
from musubi_tuner.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
Q = "visual_transformer_blocks.0.self_attention.to_query"
K = "text_transformer_blocks.0.self_attention.to_key"
FF = "visual_transformer_blocks.0.feed_forward.in_layer"


def _kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _checkpoint(dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        f"{Q}.weight": torch.randn(32, 128, generator=g) * 0.05,
        f"{Q}.bias": torch.randn(32, generator=g),
        f"{K}.weight": torch.randn(32, 128, generator=g) * 0.05,
        f"{FF}.weight": torch.randn(16, 128, generator=g) * 0.05,
        "visual_transformer_blocks.0.visual_modulation.out_layer.weight": torch.randn(8, 4, generator=g),
        "time_embeddings.in_layer.weight": torch.randn(4, 8, generator=g),
    }
    return {k: v.to(dtype) for k, v in sd.items()}


def _lora(paths, rank=4, alpha=2.0, seed=1, std=0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (out_dim, in_dim) in paths.items():
        n = _kohya(path)
        sd[f"{n}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * std
        sd[f"{n}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * std
        sd[f"{n}.alpha"] = torch.tensor(alpha)
    return sd


def _loha(paths, rank=2, alpha=1.0, seed=2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (out_dim, in_dim) in paths.items():
        n = _kohya(path)
        for w in ("w1", "w2"):
            sd[f"{n}.hada_{w}_a"] = torch.randn(out_dim, rank, generator=g) * 0.4
            sd[f"{n}.hada_{w}_b"] = torch.randn(rank, in_dim, generator=g) * 0.4
        sd[f"{n}.alpha"] = torch.tensor(alpha)
    return sd


def _lora_delta(sd, path) -> torch.Tensor:
    n = _kohya(path)
    down, up = sd[f"{n}.lora_down.weight"].float(), sd[f"{n}.lora_up.weight"].float()
    return up @ down * float(sd[f"{n}.alpha"]) / down.shape[0]


def _loha_delta(sd, path) -> torch.Tensor:
    n = _kohya(path)
    w1 = sd[f"{n}.hada_w1_a"] @ sd[f"{n}.hada_w1_b"]
    w2 = sd[f"{n}.hada_w2_a"] @ sd[f"{n}.hada_w2_b"]
    return w1 * w2 * float(sd[f"{n}.alpha"]) / sd[f"{n}.hada_w1_b"].shape[0]


@pytest.fixture
def files(tmp_path):
    base = _checkpoint()
    save_file(base, tmp_path / "dit.safetensors", metadata={"format": "pt"})
    a = _lora({Q: (32, 128), K: (32, 128)}, seed=1)
    b = _lora({Q: (32, 128), FF: (16, 128)}, rank=8, alpha=8.0, seed=2)
    c = _loha({FF: (16, 128)})
    for name, sd in (("a", a), ("b", b), ("c", c)):
        save_file(sd, tmp_path / f"{name}.safetensors", metadata={"ss_base_model_version": "kandinsky5"})
    return tmp_path, base, a, b, c


def test_merge_cli_two_loras_with_multipliers(files):
    d, base, a, b, _ = files
    out = d / "merged.safetensors"
    cmd = [sys.executable, str(ROOT / "merge_lora.py"), "--dit", str(d / "dit.safetensors"), "--lora_weight", str(d / "a.safetensors"),
           str(d / "b.safetensors"), "--lora_multiplier", "1.0", "0.5", "--save_merged_model", str(out), "--no_progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    merged = load_file(out)
    assert set(merged) == set(base)
    torch.testing.assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"] + _lora_delta(a, Q) + 0.5 * _lora_delta(b, Q))
    torch.testing.assert_close(merged[f"{K}.weight"], base[f"{K}.weight"] + _lora_delta(a, K))
    torch.testing.assert_close(merged[f"{FF}.weight"], base[f"{FF}.weight"] + 0.5 * _lora_delta(b, FF))
    for key in (f"{Q}.bias", "time_embeddings.in_layer.weight", "visual_transformer_blocks.0.visual_modulation.out_layer.weight"):
        assert torch.equal(merged[key], base[key])
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["modelspec.merged_from"] == "a.safetensors:1, b.safetensors:0.5" and md["format"] == "pt"


def test_merge_into_bf16_and_save_precision(files):
    d, base, a, _, c = files
    bf = {k: v.to(torch.bfloat16) for k, v in base.items()}
    save_file(bf, d / "dit_bf16.safetensors")
    report = merge_lora_files(
        d / "dit_bf16.safetensors", [d / "a.safetensors", d / "c.safetensors"], d / "m.safetensors", [0.7], progress=False
    )
    assert report.merged_keys == 3
    merged = load_file(d / "m.safetensors")
    assert merged[f"{Q}.weight"].dtype == torch.bfloat16
    expected = (bf[f"{Q}.weight"].float() + 0.7 * _lora_delta(a, Q)).to(torch.bfloat16)
    torch.testing.assert_close(merged[f"{Q}.weight"], expected, rtol=0, atol=0)
    expected_ff = (bf[f"{FF}.weight"].float() + _loha_delta(c, FF)).to(torch.bfloat16)  # LoHa, multiplier padded to 1.0
    torch.testing.assert_close(merged[f"{FF}.weight"], expected_ff, rtol=0, atol=0)
    merge_lora.main(["--dit", str(d / "dit.safetensors"), "--lora_weight", str(d / "a.safetensors"), "--save_merged_model",
                     str(d / "m16.safetensors"), "--save_precision", "fp16", "--no_progress"])  # fmt: skip
    m16 = load_file(d / "m16.safetensors")
    assert all(v.dtype == torch.float16 for v in m16.values())
    torch.testing.assert_close(m16[f"{K}.weight"], (base[f"{K}.weight"] + _lora_delta(a, K)).half())


@pytest.mark.parametrize("mode", ["block", "channel", "tensor"])
def test_merge_into_scaled_fp8_dequantises_and_requantises(files, mode):
    d, base, a, _, _ = files
    q, s = quantize_weight(base[f"{Q}.weight"], mode, 64)
    ckpt = {**base, f"{Q}.weight": q, f"{Q}.scale_weight": s}
    save_file(ckpt, d / "dit_fp8.safetensors")
    report = merge_lora_files(d / "dit_fp8.safetensors", [d / "a.safetensors"], d / "m8.safetensors", progress=False)
    assert report.fp8_requantized == 1
    out = load_file(d / "m8.safetensors")
    q2, s2 = out[f"{Q}.weight"], out[f"{Q}.scale_weight"]
    assert q2.dtype == torch.float8_e4m3fn and s2.shape == s.shape and s2.dtype == s.dtype
    delta = _lora_delta(a, Q)
    reference = dequantize_weight(q, s, torch.float32) + delta  # exact merge of the stored weight
    merged = dequantize_weight(q2, s2, torch.float32)
    step = dequantize_weight(torch.ones_like(q2, dtype=torch.float32).to(q2.dtype), s2, torch.float32)
    bound = reference.abs() * 2.0**-4 + step * 2.0**-9  # e4m3: half an ulp (3 mantissa bits) + subnormal step
    err = (merged - reference).abs()
    assert bool((err <= bound * 1.001).all())
    # The reference defect (adding ΔW to q, ignoring the scale) loses the LoRA almost entirely.
    naive = dequantize_weight((q.float() + delta).to(q.dtype), s, torch.float32)
    assert float((naive - reference).abs().max()) > 10 * float(bound.max())
    # in-memory variant gives the same tensors
    sd = merge_lora_into_state_dict(dict(ckpt), [load_adapter(d / "a.safetensors")])
    assert torch.equal(sd[f"{Q}.weight"].view(torch.uint8), q2.view(torch.uint8)) and torch.equal(sd[f"{Q}.scale_weight"], s2)


def test_unmatched_keys_fail_loudly(files, capsys):
    d, *_ = files
    save_file(_lora({"visual_transformer_blocks.7.cross_attention.to_key": (32, 128), Q: (32, 128)}), d / "bad.safetensors")
    with pytest.raises(UserError, match=r"1 of 2 LoRA modules match no weight.*visual_transformer_blocks_7_cross_attention_to_key"):
        merge_lora_files(d / "dit.safetensors", [d / "bad.safetensors"], d / "x.safetensors", progress=False)
    with pytest.raises(SystemExit) as e:
        merge_lora.main(
            [
                "--dit",
                str(d / "dit.safetensors"),
                "--lora_weight",
                str(d / "bad.safetensors"),
                "--save_merged_model",
                str(d / "x.safetensors"),
            ]
        )
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (d / "x.safetensors").exists()
    with pytest.raises(UserError, match="3 values for 1 LoRA"):
        merge_lora_files(d / "dit.safetensors", [d / "a.safetensors"], d / "x.safetensors", [1, 1, 1], progress=False)
    save_file(_lora({Q: (32, 64)}), d / "shape.safetensors")
    with pytest.raises(UserError, match="shape"):
        merge_lora_files(d / "dit.safetensors", [d / "shape.safetensors"], d / "x.safetensors", progress=False)


def test_lora_for_another_architecture_is_a_clear_error(files):
    d, _, a, _, _ = files
    save_file(
        {"blocks.0.self_attn.q.weight": torch.zeros(32, 128), "blocks.0.cross_attn.k.weight": torch.zeros(32, 128)},
        d / "wan.safetensors",
    )
    with pytest.raises(UserError, match="a.safetensors is a LoRA for kandinsky5, but .*wan.safetensors is a wan checkpoint"):
        merge_lora_files(d / "wan.safetensors", [d / "a.safetensors"], d / "x.safetensors", progress=False)
    with pytest.raises(UserError, match="not --architecture wan"):
        merge_lora_files(d / "dit.safetensors", [d / "a.safetensors"], d / "x.safetensors", architecture="wan", progress=False)


def test_convert_round_trip_is_lossless(files):
    d, _, a, _, c = files
    mixed = {**a, **c}
    other = to_other(mixed, "kandinsky5")
    assert f"diffusion_model.{Q}.lora_A.weight" in other and f"diffusion_model.{Q}.lora_B.weight" in other
    assert not any(k.endswith(".alpha") and "hada" not in k and ".lora_" in k for k in other)
    assert f"diffusion_model.{FF}.hada_w1_a" in other and f"diffusion_model.{FF}.alpha" in other
    # folded factors carry the scale: B @ A == up @ down * alpha / r
    torch.testing.assert_close(
        other[f"diffusion_model.{Q}.lora_B.weight"] @ other[f"diffusion_model.{Q}.lora_A.weight"], _lora_delta(a, Q)
    )
    back = to_default(other, "kandinsky5")
    assert set(back) == set(mixed)
    for path in (Q, K):
        torch.testing.assert_close(_lora_delta(back, path), _lora_delta(a, path))
        assert float(back[f"{_kohya(path)}.alpha"]) == 4.0  # alpha = rank after folding
    for k, v in c.items():
        assert torch.equal(back[k], v)
    # and default -> default is the identity
    assert all(torch.equal(v, to_default(mixed, "kandinsky5")[k]) for k, v in mixed.items())


def test_convert_cli_and_unknown_names(files, capsys):
    d, _, a, _, _ = files
    convert_lora.main(
        [
            "--input",
            str(d / "a.safetensors"),
            "--output",
            str(d / "o.safetensors"),
            "--target",
            "other",
            "--diffusers_prefix",
            "transformer",
        ]
    )
    other = load_file(d / "o.safetensors")
    assert f"transformer.{K}.lora_A.weight" in other
    convert_lora.main(["--input", str(d / "o.safetensors"), "--output", str(d / "k.safetensors"), "--target", "default"])
    back = load_file(d / "k.safetensors")
    torch.testing.assert_close(_lora_delta(back, K), _lora_delta(a, K))
    with safe_open(str(d / "k.safetensors"), "pt") as f:
        assert len(f.metadata()["sshs_model_hash"]) == 64
    bad = {**a, "lora_unet_visual_transformer_blocks_0_self_attention_to_quux.lora_down.weight": torch.zeros(4, 128),
           "lora_unet_visual_transformer_blocks_0_self_attention_to_quux.lora_up.weight": torch.zeros(32, 4)}  # fmt: skip
    with pytest.raises(UserError, match="not kandinsky5 modules.*to_quux"):
        to_other(bad, "kandinsky5")
    with pytest.raises(UserError, match="not LoRA/LoHa/LoKr tensors"):
        to_other({**a, "something.else": torch.zeros(1)}, "kandinsky5")
    save_file({"x.lora_A.weight": torch.zeros(2, 2), "x.lora_B.weight": torch.zeros(2, 2)}, d / "unk.safetensors")
    with pytest.raises(SystemExit) as e:
        convert_lora.main(["--input", str(d / "unk.safetensors"), "--output", str(d / "u.safetensors"), "--target", "default"])
    assert e.value.code == 2 and "--architecture" in capsys.readouterr().err


def test_merge_accepts_dotted_peft_layout(files):
    d, base, a, _, _ = files
    save_file(to_other(a, "kandinsky5"), d / "peft.safetensors")
    merge_lora_files(d / "dit.safetensors", [d / "peft.safetensors"], d / "mp.safetensors", [2.0], progress=False)
    merged = load_file(d / "mp.safetensors")
    torch.testing.assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"] + 2.0 * _lora_delta(a, Q))


def _real_k5_linear_paths(num_text=2, num_visual=3) -> list[str]:
    from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D

    cfg = dict(in_visual_dim=4, out_visual_dim=4, time_dim=32, model_dim=64, ff_dim=128)
    with torch.device("meta"):
        dit = DiffusionTransformer3D(
            **cfg, num_text_blocks=num_text, num_visual_blocks=num_visual, axes_dims=(8, 12, 12), in_text_dim=48, in_text_dim2=24
        )
    return [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]


def test_kandinsky5_name_table_is_exact_for_the_real_dit():
    """Every Linear of our K5 DiT maps kohya name -> dotted path through the table, and the table has nothing else."""
    from musubi_tuner.networks.convert import NAME_TABLES

    table = NAME_TABLES["kandinsky5"]
    paths = _real_k5_linear_paths()
    assert len(paths) == 2 * 7 + 3 * 11 + 7  # text 6 + modulation, visual 10 + modulation, 7 embedding/out layers
    for path in paths:
        assert table.to_dotted(_kohya(path)) == path and table.is_module(path), path
    listed = set(table.top_level) | {
        f"{block}.{i}.{member}" for block, members in table.blocks for i in range(2 if block.startswith("text") else 3)
        for member in members
    }  # fmt: skip
    assert listed == set(paths)
    # the names musubi-tuner's guessing converter gets wrong
    assert table.to_dotted("lora_unet_visual_transformer_blocks_2_cross_attention_to_query") == (
        "visual_transformer_blocks.2.cross_attention.to_query"
    )
    assert table.to_dotted("lora_unet_visual_transformer_blocks_2_cross_attention_to_quer") is None


def test_convert_round_trips_every_kandinsky5_module_lora_loha_lokr():
    g = torch.Generator().manual_seed(3)
    paths = _real_k5_linear_paths()
    sd: dict[str, torch.Tensor] = {}
    for i, path in enumerate(paths):
        n = _kohya(path)
        if i % 3 == 0:
            sd.update(_lora({path: (16, 32)}, rank=4, alpha=1.0 + i, seed=i))
        elif i % 3 == 1:
            sd.update(_loha({path: (16, 32)}, rank=2, alpha=0.5 * i, seed=i))
        else:  # LoKr: copied with its alpha both ways
            sd[f"{n}.lokr_w1"] = torch.randn(4, 4, generator=g)
            sd[f"{n}.lokr_w2_a"] = torch.randn(4, 2, generator=g)
            sd[f"{n}.lokr_w2_b"] = torch.randn(2, 8, generator=g)
            sd[f"{n}.alpha"] = torch.tensor(2.0)
    other = to_other(sd, "kandinsky5")
    back = to_default(other, "kandinsky5")
    assert set(back) == set(sd)
    for i, path in enumerate(paths):
        n = _kohya(path)
        if i % 3 == 0:  # alpha folded into the factors: the same ΔW, alpha becomes the rank
            torch.testing.assert_close(_lora_delta(back, path), _lora_delta(sd, path))
            assert float(back[f"{n}.alpha"]) == 4.0
        else:
            for k in [k for k in sd if k.startswith(n + ".")]:
                assert torch.equal(back[k], sd[k]), k
    # once alpha = rank, both directions are bit-exact
    assert all(torch.equal(v, to_other(back, "kandinsky5")[k]) for k, v in other.items())
    assert all(torch.equal(v, to_default(to_other(back, "kandinsky5"), "kandinsky5")[k]) for k, v in back.items())


def test_merge_reads_split_checkpoints(files):
    d, base, a, _, _ = files
    keys = list(base)
    (d / "split").mkdir()
    save_file({k: base[k] for k in keys[:3]}, d / "split" / "dit-00001-of-00002.safetensors")
    save_file({k: base[k] for k in keys[3:]}, d / "split" / "dit-00002-of-00002.safetensors")
    report = merge_lora_files(
        d / "split" / "dit-00002-of-00002.safetensors", [d / "a.safetensors"], d / "ms.safetensors", progress=False
    )
    merged = load_file(d / "ms.safetensors")  # one output file holding every tensor of both shards
    assert report.merged_keys == 2 and set(merged) == set(base)
    torch.testing.assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"] + _lora_delta(a, Q))
    torch.testing.assert_close(merged[f"{K}.weight"], base[f"{K}.weight"] + _lora_delta(a, K))
