"""LoRA networks: math, forward patching, selection/naming, save/load, dropout, LoRA+, max-norm (specs/networks.md)."""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from musubi_tuner.networks import lora, lora_kandinsky
from musubi_tuner.utils.errors import UserError

D, FF, TD = 8, 16, 4


# --- a tiny module tree with the official Kandinsky 5 module paths and block class names ---------------------------


class Modulation(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.out_layer = nn.Linear(TD, n * D)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_query, self.to_key, self.to_value, self.out_layer = (nn.Linear(D, D) for _ in range(4))
        self.query_norm = nn.RMSNorm(4)


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_layer = nn.Linear(D, FF, bias=False)
        self.out_layer = nn.Linear(FF, D, bias=False)

    def forward(self, x):
        return self.out_layer(torch.nn.functional.gelu(self.in_layer(x)))


class TransformerEncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_modulation = Modulation(6)
        self.self_attention = Attention()
        self.feed_forward = FeedForward()

    def forward(self, x):
        a = self.self_attention
        x = x + a.out_layer(a.to_query(x) * torch.sigmoid(a.to_key(x)) + a.to_value(x))
        return x + self.feed_forward(x)


class TransformerDecoderBlock(TransformerEncoderBlock):
    def __init__(self):
        super().__init__()
        del self.text_modulation
        self.visual_modulation = Modulation(9)
        self.cross_attention = Attention()

    def forward(self, x):
        x = super().forward(x)
        c = self.cross_attention
        return x + c.out_layer(c.to_query(x) + c.to_value(x) * c.to_key(x).tanh())


class OutLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.modulation = Modulation(2)
        self.out_layer = nn.Linear(D, 4)


class TinyK5(nn.Module):
    def __init__(self, n_text: int = 1, n_visual: int = 2):
        super().__init__()
        self.time_embeddings = nn.Module()
        self.time_embeddings.in_layer = nn.Linear(D, TD)
        self.text_transformer_blocks = nn.ModuleList(TransformerEncoderBlock() for _ in range(n_text))
        self.visual_transformer_blocks = nn.ModuleList(TransformerDecoderBlock() for _ in range(n_visual))
        self.out_layer = OutLayer()

    def forward(self, x):
        for b in [*self.text_transformer_blocks, *self.visual_transformer_blocks]:
            x = b(x)
        return self.out_layer.out_layer(x)


TEXT_MEMBERS = [f"self_attention_{n}" for n in ("to_query", "to_key", "to_value", "out_layer")] + [
    "feed_forward_in_layer",
    "feed_forward_out_layer",
]
VISUAL_MEMBERS = (
    TEXT_MEMBERS[:4] + [f"cross_attention_{n}" for n in ("to_query", "to_key", "to_value", "out_layer")] + TEXT_MEMBERS[4:]
)
EXPECTED_K5 = [f"lora_unet_text_transformer_blocks_0_{m}" for m in TEXT_MEMBERS] + [
    f"lora_unet_visual_transformer_blocks_{i}_{m}" for i in range(2) for m in VISUAL_MEMBERS
]


def _randomize(network: lora.LoRANetwork, std: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _k5_network(model: nn.Module, **kwargs) -> lora.LoRANetwork:
    return lora_kandinsky.create_arch_network(1.0, 4, 2.0, None, None, model, **kwargs)


def test_kandinsky_selection_is_pinned():
    net = _k5_network(TinyK5())
    assert sorted(net.module_paths) == sorted(EXPECTED_K5)
    assert len(net.unet_loras) == 1 * 6 + 2 * 10
    assert (
        net.module_paths["lora_unet_visual_transformer_blocks_1_cross_attention_to_key"]
        == "visual_transformer_blocks.1.cross_attention.to_key"
    )


def test_generic_lora_resolves_kandinsky_targets_from_the_real_dit():
    from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D

    cfg = dict(in_visual_dim=4, out_visual_dim=4, time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2)
    with torch.device("meta"):
        dit = DiffusionTransformer3D(**cfg, axes_dims=(8, 12, 12), in_text_dim=48, in_text_dim2=24)
    net = lora.create_arch_network(1.0, 4, 4, None, None, dit)
    assert sorted(net.module_paths) == sorted(EXPECTED_K5)


def test_unknown_model_adapts_every_linear():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)), nn.LayerNorm(8))
    net = lora.create_arch_network(1.0, 2, 1, None, None, model)
    assert sorted(net.module_paths) == ["lora_unet_0", "lora_unet_2_0"]


def test_include_exclude_match_dotted_paths():
    only_cross = _k5_network(TinyK5(), exclude_patterns="[r'.*']", include_patterns="[r'.*\\.cross_attention\\..*']")
    assert sorted(only_cross.module_paths.values()) == sorted(
        f"visual_transformer_blocks.{i}.cross_attention.{n}"
        for i in range(2)
        for n in ("to_query", "to_key", "to_value", "out_layer")
    )
    # An underscore pattern written against kohya names does not match a dotted path, so it excludes nothing.
    assert len(_k5_network(TinyK5(), exclude_patterns="[r'.*self_attention_to_query.*']").unet_loras) == 26
    assert len(_k5_network(TinyK5(), exclude_patterns="[r'.*self_attention\\.to_query']").unet_loras) == 23
    # The modulation exclude is always appended; an include rescues it.
    rescued = _k5_network(TinyK5(), include_patterns="[r'.*modulation.*']")
    assert "lora_unet_visual_transformer_blocks_0_visual_modulation_out_layer" in rescued.module_paths


def test_unknown_network_arg_is_an_error_listing_valid_keys():
    with pytest.raises(UserError, match="not_a_key.*valid: conv_dim"):
        _k5_network(TinyK5(), not_a_key="1")
    with pytest.raises(UserError, match="exclude_mod"):
        _k5_network(TinyK5(), exclude_mod="False")


def test_forward_equals_merged_weight_forward():
    torch.manual_seed(0)
    model = TinyK5()
    merged = copy.deepcopy(model)
    net = _k5_network(model)
    _randomize(net)
    net.apply_to(None, model)
    net.eval()
    x = torch.randn(3, 5, D)
    y = model(x)
    # independent merge: W + m * (alpha/r) * up @ down
    for name, path in net.module_paths.items():
        mod = getattr(net, name)
        w = merged.get_submodule(path).weight
        with torch.no_grad():
            w += 1.0 * (2.0 / 4) * (mod.lora_up.weight @ mod.lora_down.weight)
    torch.testing.assert_close(y, merged(x), rtol=1e-5, atol=1e-5)
    net.set_enabled(False)
    assert not torch.allclose(model(x), y)
    net.set_multiplier(0.5)
    net.set_enabled(True)
    assert not torch.allclose(model(x), y)


def test_zero_init_and_base_state_dict_unchanged():
    model = TinyK5()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, D)
    y0 = model(x)
    net = _k5_network(model)
    net.apply_to(None, model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), y0)
    assert all(k.startswith("lora_unet_") for k in net.state_dict())


def test_conv_lora_needs_conv_dim_and_matches_merge():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1))
    assert sorted(lora.create_arch_network(1.0, 2, 1, None, None, model).module_paths) == ["lora_unet_1"]
    net = lora.create_arch_network(1.0, 2, 1, None, None, model, conv_dim="3", conv_alpha="1.5")
    _randomize(net)
    merged = copy.deepcopy(model)
    net.apply_to(None, model)
    x = torch.randn(2, 3, 5, 5)
    y = model(x)
    for name, path in net.module_paths.items():
        m = getattr(net, name)
        delta = m.get_weight()
        with torch.no_grad():
            merged.get_submodule(path).weight += delta
    torch.testing.assert_close(y, merged(x), rtol=1e-5, atol=1e-5)
    assert net.lora_unet_0.scale == pytest.approx(0.5)


def test_dtype_bridging_rounds_the_sum_once():
    torch.manual_seed(2)
    base = nn.Linear(8, 8).to(torch.bfloat16)
    model = nn.Sequential(base)
    net = lora.create_arch_network(1.0, 4, 4, None, None, model)
    _randomize(net)
    net.apply_to(None, model)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    m = net.lora_unet_0
    org = nn.functional.linear(x, base.weight, base.bias)
    branch = x.float() @ m.lora_down.weight.T @ m.lora_up.weight.T
    torch.testing.assert_close(y, (org + branch).to(torch.bfloat16), rtol=0, atol=0)


def test_dropouts_only_in_training():
    torch.manual_seed(3)
    model = TinyK5()
    net = _k5_network(model, rank_dropout="0.5", module_dropout="0.5")
    net.lora_unet_text_transformer_blocks_0_feed_forward_in_layer.dropout = 0.5
    for m in net.unet_loras:
        m.dropout = 0.5
    _randomize(net)
    net.apply_to(None, model)
    x = torch.randn(2, 3, D)
    net.eval()
    assert torch.equal(model(x), model(x))
    net.on_epoch_start(model)
    outs = [model(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_rank_dropout_mask_and_rescale():
    model = nn.Sequential(nn.Linear(6, 6))
    net = lora.create_arch_network(1.0, 64, 64, None, None, model, rank_dropout="0.25")
    _randomize(net)
    m = net.lora_unet_0
    m.train()
    x = torch.randn(4, 3, 6)
    torch.manual_seed(5)
    branch, scale = m.lora_branch(x)
    torch.manual_seed(5)
    mask = (torch.rand(4, 64) > 0.25).float().view(4, 1, 64)
    expected = m.lora_up(m.lora_down(x) * mask)
    torch.testing.assert_close(branch, expected)
    assert scale == pytest.approx(1.0 / 0.75)


def test_loraplus_param_groups():
    net = _k5_network(TinyK5(), loraplus_lr_ratio="4")
    groups, names = net.prepare_optimizer_params(unet_lr=1e-4)
    assert names == ["unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(4e-4)]
    ups = {id(m.lora_up.weight) for m in net.unet_loras}
    assert {id(p) for p in groups[1]["params"]} == ups
    assert not ups & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) == len(net.unet_loras)
    plain_groups, plain_names = _k5_network(TinyK5()).prepare_optimizer_params(unet_lr=1e-4)
    assert plain_names == ["unet"] and len(plain_groups) == 1


def test_max_norm_regularization():
    net = _k5_network(TinyK5())
    _randomize(net, std=1.0)
    norms = [float((m.lora_up.weight @ m.lora_down.weight).detach().norm() * m.scale) for m in net.unet_loras]
    limit = sorted(norms)[len(norms) // 2]
    scaled, mean_norm, max_norm = net.apply_max_norm_regularization(limit, "cpu")
    assert scaled == sum(n > limit for n in norms)
    after = [float((m.lora_up.weight @ m.lora_down.weight).detach().norm() * m.scale) for m in net.unet_loras]
    assert max(after) == pytest.approx(limit, rel=1e-5) and max_norm == pytest.approx(limit, rel=1e-5)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-5)
    for before, a in zip(norms, after, strict=True):
        assert a == pytest.approx(min(before, limit), rel=1e-5)


def test_save_load_round_trip_with_hashes(tmp_path):
    model = TinyK5()
    net = _k5_network(model)
    _randomize(net)
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path), torch.bfloat16, {"ss_network_dim": "4", "modelspec.title": "t"})
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        md = f.metadata()
        assert f.get_tensor("lora_unet_visual_transformer_blocks_0_self_attention_to_query.alpha").item() == 2.0
        assert (
            f.get_tensor("lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight").dtype == torch.bfloat16
        )
    assert keys == {f"{n}.{s}" for n in EXPECTED_K5 for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + header :]).hexdigest()
    assert len(md["sshs_legacy_hash"]) == 8 and md["modelspec.title"] == "t"
    assert not list(tmp_path.glob(".*tmp"))

    from safetensors.torch import load_file

    sd = load_file(str(path))
    loaded = lora_kandinsky.create_arch_network_from_weights(1.0, sd, unet=TinyK5())
    assert sorted(loaded.module_paths) == sorted(EXPECTED_K5)
    m = loaded.lora_unet_text_transformer_blocks_0_feed_forward_out_layer
    assert m.lora_dim == 4 and m.scale == pytest.approx(0.5)
    fresh = _k5_network(TinyK5())
    fresh.load_weights(str(path))
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v.to(torch.bfloat16), sd[k])


def test_load_weights_refuses_foreign_modules(tmp_path):
    net = _k5_network(TinyK5())
    with pytest.raises(UserError, match="match no module"):
        net.load_weights({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, D)})


def test_inference_module_merge_to_matches_forward():
    torch.manual_seed(7)
    model = TinyK5()
    net = _k5_network(model)
    _randomize(net)
    sd = net.state_dict_for_save()
    x = torch.randn(2, 3, D)
    patched = copy.deepcopy(model)
    inf = lora.create_arch_network_from_weights(0.7, sd, unet=patched, for_inference=True)
    assert isinstance(inf.unet_loras[0], lora.LoRAInfModule)
    inf.apply_to(None, patched)
    y = patched(x)
    merger = lora.create_arch_network_from_weights(0.7, sd, unet=model, for_inference=True)
    merger.merge_to(None, model, sd, torch.float32, "cpu")
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_backup_pre_calculation_restore():
    torch.manual_seed(8)
    model = TinyK5()
    net = _k5_network(model)
    _randomize(net)
    net.apply_to(None, model)
    x = torch.randn(2, 3, D)
    y_lora = model(x)
    net.backup_weights()
    net.pre_calculation()
    torch.testing.assert_close(model(x), y_lora, rtol=1e-5, atol=1e-5)
    net.restore_weights()
    torch.testing.assert_close(model(x), y_lora, rtol=1e-6, atol=1e-6)
    net.set_enabled(False)
    net.set_enabled(True)
    assert math.isfinite(float(model(x).detach().sum()))


def test_network_dropout_from_the_factory_drops_down_outputs_in_training_only():
    """``--network_dropout`` reaches every module and acts on ``lora_down(x)`` (neuron dropout), training only."""
    net = _k5_network(TinyK5(), neuron_dropout=0.5)
    assert all(m.dropout == 0.5 for m in net.unet_loras)
    _randomize(net)
    m = net.lora_unet_visual_transformer_blocks_0_feed_forward_in_layer
    x = torch.randn(3, 5, D)
    m.train()
    torch.manual_seed(11)
    branch, scale = m.lora_branch(x)
    torch.manual_seed(11)
    h = m.lora_down(x)
    dropped = torch.nn.functional.dropout(h, p=0.5, training=True)  # the same draw from the same seed
    kept = dropped != 0
    assert 0 < int(kept.sum()) < kept.numel() and torch.equal(dropped[kept], h[kept] * 2)
    torch.testing.assert_close(branch, m.lora_up(dropped))
    assert scale == pytest.approx(2.0 / 4)
    m.eval()
    torch.testing.assert_close(m.lora_branch(x)[0], m.lora_up(m.lora_down(x)))


def test_module_dropout_skips_the_whole_module():
    torch.manual_seed(4)
    base = nn.Linear(6, 6)
    model = nn.Sequential(base)
    net = lora.create_arch_network(1.0, 4, 4, None, None, model, module_dropout="0.5")
    _randomize(net)
    net.apply_to(None, model)
    m = net.lora_unet_0
    x = torch.randn(2, 6)
    with torch.no_grad():
        org = nn.functional.linear(x, base.weight, base.bias)
        full = org + m.lora_up(m.lora_down(x))
        net.on_epoch_start(model)
        outs = [model(x) for _ in range(40)]
        skipped = sum(torch.equal(o, org) for o in outs)
        applied = sum(torch.allclose(o, full, rtol=1e-6, atol=1e-6) for o in outs)
        assert skipped + applied == 40 and skipped > 0 and applied > 0  # all or nothing per step, both happen
        net.eval()
        assert all(torch.allclose(model(x), full, rtol=1e-6, atol=1e-6) for _ in range(10))


def test_verbose_logs_every_selected_module_with_rank_and_alpha():
    import logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger(lora.__name__)
    logger.addHandler(handler)
    try:
        _k5_network(TinyK5(), verbose="True")
        verbose_lines = [r for r in records if "rank 4, alpha 2.0" in r]
        records.clear()
        _k5_network(TinyK5())
        quiet_lines = [r for r in records if "rank 4, alpha 2.0" in r]
    finally:
        logger.removeHandler(handler)
    assert sorted(line.split(":")[0] for line in verbose_lines) == sorted(EXPECTED_K5)
    assert quiet_lines == []


def test_merge_to_scaled_fp8_model_dequantises_adds_and_requantises(tmp_path):
    """Generator path of reference defect #4: merging into a model loaded with --fp8_scaled must use the scale."""
    from musubi_tuner.modules.fp8_optimization import Fp8Config, dequantize_weight
    from musubi_tuner.utils.atomic import save_safetensors_atomic
    from musubi_tuner.utils.model_loading import load_weights_into_model

    torch.manual_seed(9)
    ref = TinyK5()
    path = tmp_path / "k5.safetensors"
    save_safetensors_atomic(ref.state_dict(), path)
    with torch.device("meta"):
        model = TinyK5()
    load_weights_into_model(model, path, fp8=Fp8Config(mode="block", block_size=4, excludes=("modulation",)), progress=False)
    target = model.visual_transformer_blocks[0].self_attention.to_query
    assert target.weight.dtype == torch.float8_e4m3fn and target.scale_weight.shape == (D, 2, 1)
    q0, s0 = target.weight.detach().clone(), target.scale_weight.clone()

    net = _k5_network(TinyK5())
    _randomize(net, std=0.5)
    sd = net.state_dict_for_save()
    merger = lora_kandinsky.create_arch_network_from_weights(0.8, sd, unet=model, for_inference=True)
    merger.backup_weights()
    merger.merge_to(None, model, sd, torch.float32, "cpu")

    name = "lora_unet_visual_transformer_blocks_0_self_attention_to_query"
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    delta = 0.8 * (2.0 / 4) * (up @ down)  # multiplier · alpha/r · up @ down
    exact = dequantize_weight(q0, s0, torch.float32) + delta  # the stored weight plus ΔW
    got = dequantize_weight(target.weight, target.scale_weight, torch.float32)
    s_full = target.scale_weight.expand(D, 2, 4).reshape(D, D)
    bound = exact.abs() * 2.0**-4 + s_full * 2.0**-9  # e4m3 re-quantisation: half an ulp, or the subnormal step
    assert bool(((got - exact).abs() <= bound * 1.001).all())
    assert target.scale_weight.shape == s0.shape and not torch.equal(target.scale_weight, s0)  # a fresh scale
    naive = dequantize_weight((q0.float() + delta).to(q0.dtype), s0, torch.float32)  # ΔW added to q, scale ignored
    assert float((naive - exact).abs().max()) > 10 * float(bound.max())
    # the patched forward uses the merged weight and its new scale
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        torch.testing.assert_close(target(x), nn.functional.linear(x, got, target.bias), rtol=1e-5, atol=1e-5)
    # restore_weights brings back the exact fp8 weight and scale
    merger.restore_weights()
    assert torch.equal(target.weight.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(target.scale_weight, s0)
