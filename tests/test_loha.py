"""LoHa: ΔW math vs an independent computation, forward vs merged weights, backward, save/load, detection."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from musubi_tuner.networks import loha, lora
from musubi_tuner.networks.formats import detect_network_types
from musubi_tuner.utils.errors import UserError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 10)
        self.o = nn.Linear(10, 6, bias=False)
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return x + self.o(torch.tanh(self.q(x)))


def _model() -> nn.Sequential:
    return nn.Sequential(Block(), Block())


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_delta_matches_independent_hadamard_formula():
    net = loha.create_arch_network(1.0, 3, 1.5, None, None, _model())
    assert sorted(net.module_paths.values()) == ["0.o", "0.q", "1.o", "1.q"]  # Linear only: the conv is skipped
    _randomize(net)
    m = net.lora_unet_0_q
    w1a, w1b, w2a, w2b = (getattr(m, f"hada_{n}").detach() for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    expected = (w1a @ w1b) * (w2a @ w2b) * 1.5 / 3
    torch.testing.assert_close(m.get_weight(), expected)
    torch.testing.assert_close(m.get_weight(0.5), expected * 0.5)


def test_init_is_zero_delta():
    net = loha.create_arch_network(1.0, 4, 4, None, None, _model())
    assert all(float(m.get_weight().abs().max()) == 0.0 for m in net.unet_loras)


def test_forward_equals_merged_forward():
    torch.manual_seed(0)
    model = _model()
    merged = copy.deepcopy(model)
    net = loha.create_arch_network(0.8, 3, 6, None, None, model)
    _randomize(net)
    net.apply_to(None, model)
    net.eval()
    x = torch.randn(4, 6)
    y = model(x)
    for name, path in net.module_paths.items():
        with torch.no_grad():
            merged.get_submodule(path).weight += getattr(net, name).get_weight()
    torch.testing.assert_close(y, merged(x), rtol=1e-5, atol=1e-5)


def test_custom_backward_matches_autograd():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 3), (3, 7), (5, 3), (3, 7))]
    grad = torch.randn(5, 7, generator=g, dtype=torch.float64)
    out = loha.HadaWeight.apply(*ws, 0.7)
    got = torch.autograd.grad(out, ws, grad)
    ref = torch.autograd.grad((ws[0] @ ws[1]) * (ws[2] @ ws[3]) * 0.7, ws, grad)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_save_load_round_trip_and_detection(tmp_path):
    net = loha.create_arch_network(1.0, 3, 1.0, None, None, _model())
    _randomize(net)
    path = tmp_path / "loha.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "networks.loha"})
    sd = load_file(str(path))
    assert set(sd) == {
        f"lora_unet_{i}_{n}.{s}"
        for i in (0, 1)
        for n in ("q", "o")
        for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")
    }
    assert sd["lora_unet_0_q.hada_w1_a"].shape == (10, 3) and sd["lora_unet_0_q.hada_w1_b"].shape == (3, 6)
    assert detect_network_types(sd) == {"loha"}
    # networks.lora accepts LoHa files by their hada_* keys
    loaded = lora.create_arch_network_from_weights(1.0, sd, unet=_model(), for_inference=True)
    assert all(isinstance(m, loha.LoHaInfModule) for m in loaded.unet_loras)
    for m in loaded.unet_loras:
        torch.testing.assert_close(m.get_weight(), getattr(net, m.lora_name).get_weight())


def test_mixed_lora_and_loha_file_merges_every_module():
    torch.manual_seed(2)
    model = _model()
    ha = loha.create_arch_network(1.0, 2, 2, None, None, model, include_patterns="[r'.*q']", exclude_patterns="[r'.*']")
    lo = lora.create_arch_network(1.0, 2, 2, None, None, model, include_patterns="[r'.*o']", exclude_patterns="[r'.*']")
    _randomize(ha, 3)
    _randomize(lo, 4)
    sd = {**ha.state_dict_for_save(), **lo.state_dict_for_save()}
    assert detect_network_types(sd) == {"lora", "loha"}
    expected = {
        p: model.get_submodule(p).weight.detach() + 0.5 * n.get_weight()
        for net in (ha, lo)
        for n, p in ((getattr(net, k), v) for k, v in net.module_paths.items())
    }
    merger = loha.create_arch_network_from_weights(0.5, sd, unet=model, for_inference=True)
    merger.merge_to(None, model, sd, torch.float32, "cpu")
    for path, w in expected.items():
        torch.testing.assert_close(model.get_submodule(path).weight.detach(), w)


def test_loha_rejects_lora_only_args():
    with pytest.raises(UserError, match="loraplus_lr_ratio.*networks.loha"):
        loha.create_arch_network(1.0, 2, 2, None, None, _model(), loraplus_lr_ratio="4")


def test_rank_dropout_and_module_dropout_only_in_training():
    torch.manual_seed(5)
    model = _model()
    net = loha.create_arch_network(1.0, 3, 3, None, None, model, rank_dropout="0.5", module_dropout="0.3")
    _randomize(net)
    net.apply_to(None, model)
    x = torch.randn(3, 6)
    net.eval()
    assert torch.equal(model(x), model(x))
    net.train()
    outs = [model(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    groups, names = net.prepare_optimizer_params(1e-3)
    assert names == ["unet"] and len(groups[0]["params"]) == 16


def test_max_norm_scales_loha():
    net = loha.create_arch_network(1.0, 3, 3, None, None, _model())
    _randomize(net)
    before = [float(m.get_weight().norm()) for m in net.unet_loras]
    limit = min(before) / 2
    scaled, _, max_norm = net.apply_max_norm_regularization(limit, "cpu")
    assert scaled == 4 and max_norm == pytest.approx(limit, rel=1e-5)
    assert all(float(m.get_weight().norm()) == pytest.approx(limit, rel=1e-5) for m in net.unet_loras)
