"""fp8 quantisation math, the patched Linear forward and fp8 loading (training.md §16, networks.md §5.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from musubi_tuner.modules import fp8_optimization
from musubi_tuner.modules.fp8_optimization import (
    Fp8Config,
    apply_fp8_monkey_patch,
    cast_to_fp8_base,
    check_scaled_mm_supported,
    dequantize_weight,
    is_fp8_target,
    quantize_state_dict,
    quantize_weight,
    scaled_mm_unsupported_reason,
)
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.model_loading import load_weights_into_model

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (fp8 max, mantissa bits, smallest subnormal step) from the formats' definitions, not from the code under test.
FORMATS = {E4M3: (448.0, 3, 2.0**-9), E5M2: (57344.0, 2, 2.0**-16)}


def _rounding_bound(w: torch.Tensor, scale_full: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Max error of round-to-nearest into fp8 of w/scale, mapped back: half a step at that magnitude, times scale."""
    _, mant, sub_step = FORMATS[fp8_dtype]
    v = (w / scale_full).abs()
    return scale_full * torch.maximum(v * 2.0 ** -(mant + 1), torch.full_like(v, sub_step / 2)) * 1.0001


def _expected_scale(w: torch.Tensor, mode: str, bs: int, fp8_max: float) -> torch.Tensor:
    a = w.abs()
    if mode == "tensor":
        s = a.max().reshape(1)
    elif mode == "channel":
        s = torch.stack([row.max() for row in a]).reshape(-1, 1)
    else:
        out, inp = w.shape
        s = torch.stack([torch.stack([a[o, b * bs : (b + 1) * bs].max() for b in range(inp // bs)]) for o in range(out)])
        s = s.reshape(out, inp // bs, 1)
    return torch.clamp(s / fp8_max, min=1e-8)


@pytest.mark.parametrize("chunk", [1 << 22, 256])  # one chunk, and row chunks of 2 rows
@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("mode", ["block", "channel", "tensor"])
def test_quantize_dequantize_error_bound_and_scale(mode, fp8_dtype, chunk, monkeypatch):
    monkeypatch.setattr(fp8_optimization, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    w = torch.randn(8, 128) * torch.logspace(-3, 1, 8).unsqueeze(1)  # rows of very different magnitudes
    q, scale = quantize_weight(w, mode, 32, fp8_dtype)
    fp8_max = FORMATS[fp8_dtype][0]
    assert q.dtype == fp8_dtype and q.shape == w.shape and scale.dtype == torch.float32
    torch.testing.assert_close(scale, _expected_scale(w, mode, 32, fp8_max), rtol=1e-6, atol=0)
    deq = dequantize_weight(q, scale, torch.float32)
    scale_full = scale.expand(8, 4, 32).reshape(8, 128) if mode == "block" else scale.expand(8, 128)
    assert ((deq - w).abs() <= _rounding_bound(w, scale_full, fp8_dtype)).all()
    assert q.float().abs().max() == fp8_max  # the largest magnitude maps onto the format's maximum


def test_relative_error_in_normal_range_e4m3():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    q, scale = quantize_weight(w, "block", 64)
    v = (w / scale.reshape(16, 1)).abs()
    normal = v >= 2.0**-6  # e4m3 smallest normal
    rel = ((dequantize_weight(q, scale, torch.float32) - w).abs() / w.abs())[normal]
    assert rel.max() <= 2.0**-4 + 1e-6 and rel.max() > 0


def test_scale_shapes_and_dtype_and_fallbacks():
    w = torch.randn(6, 128, dtype=torch.bfloat16)
    assert quantize_weight(w, "block", 64)[1].shape == (6, 2, 1)
    assert quantize_weight(w, "block", 64)[1].dtype == torch.bfloat16
    assert quantize_weight(w, "channel")[1].shape == (6, 1)
    assert quantize_weight(w, "tensor")[1].shape == (1,)
    # in_features % block_size != 0 -> channel mode
    q, s = quantize_weight(torch.randn(6, 100), "block", 64)
    assert s.shape == (6, 1)
    # non-2-D weights -> tensor mode
    assert quantize_weight(torch.randn(4, 3, 8), "block", 8)[1].shape == (1,)
    assert quantize_weight(torch.randn(10), "channel")[1].shape == (1,)


def test_bf16_scale_rounding_keeps_values_in_range():
    w = torch.randn(4, 64, dtype=torch.bfloat16) * 3
    q, scale = quantize_weight(w, "channel")
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= 448
    deq = dequantize_weight(q, scale, torch.float32)
    assert ((deq - w.float()).abs() <= _rounding_bound(w.float(), scale.float().expand(4, 64), E4M3) + 1e-2 * scale.float()).all()


def test_nan_becomes_zero_and_does_not_poison_the_block():
    w = torch.randn(2, 64)
    w[0, 5] = float("nan")
    q, scale = quantize_weight(w, "block", 32)
    assert torch.isfinite(scale).all()
    assert q[0, 5].float() == 0
    torch.testing.assert_close(scale[0, 0, 0], w[0, :32].nan_to_num(0).abs().max() / 448)
    assert (q[0, :32].float() != 0).sum() >= 30  # the other weights of that block are still quantised


def test_all_zero_weight_uses_minimum_scale():
    q, scale = quantize_weight(torch.zeros(3, 64), "channel")
    assert torch.equal(scale, torch.full((3, 1), 1e-8)) and (q.float() == 0).all()


def test_is_fp8_target():
    cfg = Fp8Config(targets=("blocks",), excludes=("norm", "modulation"))
    assert is_fp8_target("blocks.0.attn.to_q.weight", cfg)
    assert not is_fp8_target("blocks.0.attn.to_q.bias", cfg)
    assert not is_fp8_target("blocks.0.norm1.weight", cfg)
    assert not is_fp8_target("blocks.0.modulation.out.weight", cfg)
    assert not is_fp8_target("head.weight", cfg)
    assert is_fp8_target("anything.weight", Fp8Config())


class Tiny(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(2)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 8, bias=False)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.norm_out(x))


def _tiny_checkpoint(tmp_path, dtype=torch.bfloat16):
    torch.manual_seed(0)
    ref = Tiny().to(dtype)
    path = tmp_path / "tiny.safetensors"
    save_safetensors_atomic(ref.state_dict(), path)
    return ref, path


def _meta_tiny() -> Tiny:
    with torch.device("meta"):
        return Tiny()


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode", ["block", "channel", "tensor"])
def test_fp8_scaled_model_close_to_bf16(tmp_path, mode):
    ref, path = _tiny_checkpoint(tmp_path)
    model = _meta_tiny()
    cfg = Fp8Config(mode=mode, block_size=32, targets=("blocks",), excludes=("norm",))
    res = load_weights_into_model(model, path, fp8=cfg, progress=False)
    assert sorted(res.quantized) == ["blocks.0.1.weight", "blocks.0.3.weight", "blocks.1.1.weight", "blocks.1.3.weight"]
    assert model.blocks[0][1].weight.dtype == E4M3 and model.inp.weight.dtype == torch.bfloat16
    assert isinstance(model.blocks[0][1], nn.Linear)  # class kept: adapters still find the layer
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out, expected = model(x), ref(x)
    assert out.dtype == torch.bfloat16
    # e4m3 keeps 3 mantissa bits: per-weight relative error <= 2^-4 (RMS ~2^-4/sqrt(3) = 3.6 %); errors of independent
    # weights average out in the matmuls, so the output is within 3 % (measured ~1.5 %).
    assert _rel_err(out, expected) < 0.03


def test_patched_forward_equals_linear_with_dequantised_weight():
    lin = nn.Linear(64, 16)
    q, scale = quantize_weight(lin.weight.detach(), "block", 16)
    expected_w = dequantize_weight(q, scale, torch.float32)
    lin.weight = nn.Parameter(q, requires_grad=False)
    apply_fp8_monkey_patch(lin_holder := nn.Sequential(lin), {"0.scale_weight": scale})
    x = torch.randn(4, 64)
    torch.testing.assert_close(lin_holder(x), x @ expected_w.T + lin.bias, rtol=1e-5, atol=1e-5)


def test_prequantized_round_trip_identical_outputs(tmp_path):
    _, path = _tiny_checkpoint(tmp_path)
    first = _meta_tiny()
    load_weights_into_model(first, path, fp8=Fp8Config(block_size=32, excludes=("norm",)), progress=False)
    sd = first.state_dict()
    assert sd["blocks.0.1.scale_weight"].shape == (128, 2, 1) and sd["blocks.0.1.scale_weight"].dtype == torch.bfloat16
    qpath = tmp_path / "tiny_fp8.safetensors"
    save_safetensors_atomic(sd, qpath)

    second = _meta_tiny()
    res = load_weights_into_model(second, qpath, progress=False)  # detected as pre-quantised, no fp8 config needed
    assert res.prequantized and not res.quantized
    for k, v in second.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype == E4M3 else v, sd[k].view(torch.uint8) if v.dtype == E4M3 else sd[k]), k
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_quantize_state_dict_matches_streaming_quantisation(tmp_path):
    ref, path = _tiny_checkpoint(tmp_path)
    cfg = Fp8Config(mode="channel", targets=("blocks",), excludes=("norm",))
    linear_keys = [f"{n}.weight" for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    offline = quantize_state_dict(ref.state_dict(), cfg, linear_keys)
    streamed = _meta_tiny()
    load_weights_into_model(streamed, path, fp8=cfg, progress=False)
    sd = streamed.state_dict()
    assert set(offline) == set(sd)
    for k in offline:
        assert torch.equal(offline[k].float(), sd[k].float()), k


def test_unscaled_fp8_checkpoint_refused_for_scaled_unless_allowed(tmp_path):
    ref, _ = _tiny_checkpoint(tmp_path)
    sd = {k: (v.to(E4M3) if k == "blocks.0.1.weight" else v) for k, v in ref.state_dict().items()}
    path = tmp_path / "precast.safetensors"
    save_safetensors_atomic(sd, path)
    with pytest.raises(UserError, match=r"precast\.safetensors.*blocks\.0\.1\.weight.*without a scale_weight"):
        load_weights_into_model(_meta_tiny(), path, fp8=Fp8Config(), progress=False)
    model = _meta_tiny()
    load_weights_into_model(model, path, fp8=Fp8Config(allow_unscaled_fp8=True), progress=False)
    assert torch.equal(model.blocks[0][1].scale_weight, torch.ones(1, dtype=torch.bfloat16))
    assert torch.equal(model.blocks[0][1].weight.view(torch.uint8), sd["blocks.0.1.weight"].view(torch.uint8))
    # plain --fp8_base takes the pre-cast file as it is
    plain = _meta_tiny()
    load_weights_into_model(plain, path, fp8=Fp8Config(scaled=False, targets=("blocks.0.1",)), progress=False)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = nn.functional.linear(x, sd["blocks.0.1.weight"].to(torch.bfloat16), sd["blocks.0.1.bias"])
        assert torch.equal(plain.blocks[0][1](x), expected)


def test_fp8_base_upcasts_at_compute_time(tmp_path):
    ref, path = _tiny_checkpoint(tmp_path, dtype=torch.float32)
    model = _meta_tiny()
    load_weights_into_model(model, path, fp8=Fp8Config(scaled=False, excludes=("norm", "head")), progress=False)
    lin = model.blocks[1][3]
    assert lin.weight.dtype == E4M3 and not hasattr(lin, "scale_weight") and model.head.weight.dtype == torch.float32
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ ref.blocks[1][3].weight.to(E4M3).float().T + ref.blocks[1][3].bias)
        x = torch.randn(2, 64)
        # unscaled fp8: small weights fall into e4m3's subnormal range, so plain casting is coarser than scaled fp8
        assert _rel_err(model(x), ref(x)) < 0.06
    # out-of-range values saturate instead of turning into NaN
    big = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        big[0].weight.fill_(1000.0)
    cast_to_fp8_base(big)
    assert big[0].weight.float().max() == 448


def test_merge_on_load_before_quantisation_and_into_prequantised(tmp_path):
    ref, path = _tiny_checkpoint(tmp_path, dtype=torch.float32)
    delta = torch.randn(128, 64) * 0.05

    def hook(key, w):
        return w + delta.to(w.dtype) if key == "blocks.0.1.weight" else w

    cfg = Fp8Config(mode="block", block_size=32, excludes=("norm",))
    merged = _meta_tiny()
    load_weights_into_model(merged, path, fp8=cfg, lora_deltas=hook, progress=False)
    expected_w = ref.blocks[0][1].weight.detach() + delta
    q, s = quantize_weight(expected_w, "block", 32)
    got = merged.blocks[0][1]
    assert torch.equal(got.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got.scale_weight, s)

    # into an already-quantised file: dequantise, add, re-quantise with a fresh scale (not delta added to q)
    plain = _meta_tiny()
    load_weights_into_model(plain, path, fp8=cfg, progress=False)
    qpath = tmp_path / "q.safetensors"
    save_safetensors_atomic(plain.state_dict(), qpath)
    again = _meta_tiny()
    load_weights_into_model(again, qpath, lora_deltas=hook, progress=False)
    w_again = dequantize_weight(again.blocks[0][1].weight, again.blocks[0][1].scale_weight, torch.float32)

    def full(scale):
        return scale.float().expand(128, 2, 32).reshape(128, 64)

    # two roundings: the original quantisation of W0 (scale s0) and the re-quantisation of deq(q0)+delta (fresh scale)
    s0, s_new = plain.blocks[0][1].scale_weight, again.blocks[0][1].scale_weight
    w_pre = dequantize_weight(plain.blocks[0][1].weight, s0, torch.float32) + delta
    bound = _rounding_bound(ref.blocks[0][1].weight.detach(), full(s0), E4M3) + _rounding_bound(w_pre, full(s_new), E4M3)
    assert ((w_again - expected_w).abs() <= bound).all()
    assert not torch.equal(s_new, s0)  # a fresh scale, not the old one
    untouched = again.blocks[1][1]
    assert torch.equal(untouched.weight.view(torch.uint8), plain.blocks[1][1].weight.view(torch.uint8))


def test_scaled_mm_capability_check():
    assert scaled_mm_unsupported_reason("cuda", (8, 9)) is None
    assert scaled_mm_unsupported_reason("cuda", (9, 0)) is None
    assert "8.9" in scaled_mm_unsupported_reason("cuda", (8, 6))
    assert "CUDA" in scaled_mm_unsupported_reason("cpu")
    with pytest.raises(UserError, match="--fp8_fast"):
        check_scaled_mm_supported("cpu")


def test_fp8_fast_config_checks(tmp_path):
    with pytest.raises(UserError, match="--fp8_scaled"):
        Fp8Config(mode="tensor", use_scaled_mm=True, scaled=False)
    # torch._scaled_mm takes per-tensor scales only: an architecture's default block mode becomes tensor mode
    # (the generators have no option to pick the mode, so refusing would make --fp8_fast unusable)
    assert Fp8Config(mode="block", use_scaled_mm=True).mode == "tensor"
    assert Fp8Config(mode="block").mode == "block"
    _, path = _tiny_checkpoint(tmp_path)
    with pytest.raises(UserError, match="--fp8_fast"):
        load_weights_into_model(_meta_tiny(), path, fp8=Fp8Config(mode="tensor", use_scaled_mm=True), progress=False)
    # a layer with per-channel scales (e.g. a pre-quantised file) cannot use scaled_mm: it dequantises instead
    lin = nn.Sequential(nn.Linear(32, 16))
    q, s = quantize_weight(lin[0].weight.detach(), "channel")
    lin[0].weight = nn.Parameter(q, requires_grad=False)
    apply_fp8_monkey_patch(lin, {"0.scale_weight": s}, use_scaled_mm=True)
    assert lin[0].fp8_use_scaled_mm is False
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), x @ dequantize_weight(q, s, torch.float32).T + lin[0].bias, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# fp8 Linear backward: no dequantised copy kept for backward (specs/memory_estimator.md §3.4)


def _fp8_linear_layer(mode: str | None, dtype: torch.dtype, bias_grad: bool = False) -> tuple[nn.Linear, torch.Tensor]:
    """A Linear with an fp8 weight, patched like a loaded one; returns it and its high-precision reference weight."""
    torch.manual_seed(3)
    lin = nn.Linear(128, 64).to(dtype)
    holder = nn.Sequential(lin)
    if mode is None:  # plain --fp8_base
        cast_to_fp8_base(holder)
        ref = lin.weight.detach()
    else:
        q, scale = quantize_weight(lin.weight.detach(), mode, 32)
        lin.weight = nn.Parameter(q, requires_grad=False)
        apply_fp8_monkey_patch(holder, {"0.scale_weight": scale})
        ref = q
    lin.bias.requires_grad_(bias_grad)
    return lin, ref


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["block", "channel", "tensor", None])
def test_fp8_linear_gradients_equal_dequantise_then_linear(mode, x_dtype, autocast):
    lin, q = _fp8_linear_layer(mode, torch.bfloat16, bias_grad=True)
    x = torch.randn(3, 5, 128, dtype=x_dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = lin.bias.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = lin(x)
        w = dequantize_weight(q, lin.scale_weight, x_dtype) if mode else q.to(x_dtype)
        y_ref = nn.functional.linear(x_ref, w, bias_ref.to(x_dtype))
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    y.backward(g.to(y.dtype))
    y_ref.backward(g.to(y_ref.dtype))
    assert x.grad.dtype == x_dtype and torch.equal(x.grad, x_ref.grad)
    assert torch.equal(lin.bias.grad, bias_ref.grad)


@pytest.mark.parametrize("mode", ["block", None])
def test_fp8_linear_saves_no_high_precision_weight_for_backward(mode):
    lin, q = _fp8_linear_layer(mode, torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    # only the fp8 weight (and its scale) are kept: no dequantised weight, and not the input (the weight is frozen)
    assert [(tuple(t.shape), t.dtype) for t in saved if t.numel() >= q.numel()] == [(tuple(q.shape), q.dtype)]
    assert not any(t.shape == x.shape for t in saved)
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is None


def test_fp8_linear_backward_with_lora_and_loha(tmp_path):
    """Adapters on fp8 Linears train: their parameters get the gradients of the same layer run in high precision."""
    from musubi_tuner.networks import loha, lora

    _, path = _tiny_checkpoint(tmp_path, dtype=torch.float32)
    for factory in (lora.create_arch_network, loha.create_arch_network):
        grads = []
        for fp8 in (False, True):
            torch.manual_seed(0)
            model = _meta_tiny()
            cfg = Fp8Config(mode="block", block_size=32, targets=("blocks",), excludes=("norm",)) if fp8 else None
            load_weights_into_model(model, path, fp8=cfg, progress=False)
            model.requires_grad_(False)
            net = factory(1.0, 4, 4, None, None, model)
            net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
            for p in net.parameters():
                if p.ndim == 2:
                    nn.init.normal_(p, std=0.05)  # non-zero up/down so every adapter parameter gets a gradient
            model(torch.randn(2, 64, generator=torch.Generator().manual_seed(1))).square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        assert grads[1].abs().sum() > 0
        assert _rel_err(grads[1], grads[0]) < 0.05  # fp8 rounding of the frozen weights only
