"""Gradient checkpointing (with and without activation CPU offload) gives the gradients of a plain run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from musubi_tuner.modules.checkpointing import GradientCheckpointingMixin, checkpoint_block, record_saved_activation_devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.calls = 0

    def forward(self, x, scale, *, shift=None):
        self.calls += 1
        h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))) * scale
        if shift is not None:
            h = h + shift
        return x + h, h.mean()


class TinyModel(GradientCheckpointingMixin, nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        aux = 0.0
        for block in self.blocks:
            x, a = self._checkpointed(block, x, 0.5, shift=self.shift)
            aux = aux + a
        return x, aux


def _run(model: TinyModel, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out, aux = model(x)
    loss = out.square().mean() + aux
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_equal_with_and_without_checkpointing_and_offload(device):
    torch.manual_seed(0)
    model = TinyModel().to(device)
    with torch.no_grad():
        model.shift.normal_()
    x = torch.randn(2, 5, 8, device=device)
    ref_out, ref_grads = _run(model, x)
    assert all(b.calls == 1 for b in model.blocks)

    for offload in (False, True):
        for b in model.blocks:
            b.calls = 0
        model.enable_gradient_checkpointing(activation_cpu_offloading=offload)
        assert model.gradient_checkpointing and model.activation_cpu_offloading == offload
        with record_saved_activation_devices() as seen:
            out, grads = _run(model, x)
        assert out.device.type == torch.device(device).type  # block outputs stay on the compute device
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
        assert all(b.calls == 2 for b in model.blocks)  # every block was recomputed in backward
        if offload:
            # one kept activation per block, read in the forward and again by the recomputation: all on the host
            assert len(seen) == 2 * len(model.blocks)
            assert all(d.type == "cpu" for d in seen)
        else:
            assert seen == []

    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing and not model.activation_cpu_offloading
    for b in model.blocks:
        b.calls = 0
    _run(model, x)
    assert all(b.calls == 1 for b in model.blocks)


def test_checkpoint_block_without_grad_runs_plainly():
    block = Block(4)
    x = torch.randn(1, 3, 4)
    with torch.no_grad(), record_saved_activation_devices() as seen:
        out, _ = checkpoint_block(block, x, 1.0, enabled=True, cpu_offload=True)
    assert block.calls == 1 and seen == [] and out.shape == x.shape


def test_offload_keeps_inputs_that_do_not_require_grad_and_nested_args():
    torch.manual_seed(1)
    lin = nn.Linear(4, 4)

    def fn(pair, *, bias):
        a, b = pair
        return lin(a) * b + bias

    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4)
    bias = torch.randn(4)
    ref = fn((a, b), bias=bias)
    (ga_ref,) = torch.autograd.grad(ref.sum(), a)
    out = checkpoint_block(fn, (a, b), enabled=True, cpu_offload=True, bias=bias)
    (ga,) = torch.autograd.grad(out.sum(), a)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ga, ga_ref)
