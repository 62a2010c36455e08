"""Block swap: same outputs and LoRA gradients as without swapping, the §15.2 schedule, weights back in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.modules.checkpointing import GradientCheckpointingMixin
from musubi_tuner.modules.offloading import BlockSwapConfig, BlockSwapMixin, ModelOffloader
from musubi_tuner.utils.errors import UserError

# The first text block's input needs no gradient, so torch notes that its backward hook fires on output gradients.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DIM = 8
N_TEXT, N_VISUAL = 4, 6


class Block(nn.Module):
    def __init__(self, dim: int, odd: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.ff_in = nn.Linear(dim, 2 * dim)
        # one Linear whose shape differs between blocks: it cannot be exchanged and moves on its own
        self.ff_out = nn.Linear(2 * dim, dim, bias=odd)
        self.register_buffer("gate", torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x)) * self.gate
        return x + self.ff_out(F.gelu(self.ff_in(x)))


class TinyDiT(BlockSwapMixin, GradientCheckpointingMixin, nn.Module):
    """Two block lists like Kandinsky 5 (text blocks, then visual blocks conditioned on the text)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.text_blocks = nn.ModuleList(Block(DIM) for _ in range(N_TEXT))
        self.visual_blocks = nn.ModuleList(Block(DIM, odd=i % 2 == 1) for i in range(N_VISUAL))
        self.out = nn.Linear(DIM, 4)

    def _block_lists(self):
        return [self.text_blocks, self.visual_blocks]

    def _split_blocks_to_swap(self, n, training=False):
        text = max(0, min(len(self.text_blocks) // 2, n // 4))
        visual = min(max(1, n - text), len(self.visual_blocks) - 2)
        return [text, visual]

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        self.prepare_block_swap_before_forward()
        for i, block in enumerate(self.text_blocks):
            self._before_block(0, i)
            ctx = self._checkpointed(block, ctx)
            self._after_block(0, i)
        x = self.embed(x) + ctx.mean(dim=1, keepdim=True)
        for i, block in enumerate(self.visual_blocks):
            self._before_block(1, i)
            x = self._checkpointed(block, x)
            self._after_block(1, i)
        return self.out(x)


class LoRA(nn.Module):
    """A LoRA adapter living outside the block tree (like networks/lora.py), patched into a Linear's forward."""

    def __init__(self, org: nn.Linear, rank: int = 2):
        super().__init__()
        self.down = nn.Linear(org.in_features, rank, bias=False)
        self.up = nn.Linear(rank, org.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.3)
        self.org_forward = org.forward
        org.forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.up(self.down(x))


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyDiT()
    model.requires_grad_(False)
    network = nn.ModuleList(LoRA(b.attn) for b in [*model.text_blocks, *model.visual_blocks])
    return model, network


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, DIM, generator=g)


def train_step(model, network, x, ctx):
    network.zero_grad(set_to_none=True)
    out = model(x, ctx)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in network.parameters()]


def expected_training_events(n: int, s: int) -> list[tuple]:
    """specs/training.md §15.2, written out independently of the implementation."""
    events: list[tuple] = []
    for i in range(n):  # forward
        events.append(("wait", i))
        if i < s:
            events.append(("swap", i, n - s + i))
    for i in reversed(range(n)):  # backward: pre-hook check, then the full backward hook of block i
        events.append(("backward", i))
        p = n - i - 1
        if 0 < p <= s:
            events.append(("swap", i + 1, s - p))
        if 0 < i <= s:
            events.append(("wait", i - 1))
    return events


def expected_inference_events(n: int, s: int) -> list[tuple]:
    events: list[tuple] = []
    for i in range(n):
        events.append(("wait", i))
        if s >= n / 2:
            events.append(("swap", i, (n - s + i) % n))
        elif i < s:
            events.append(("swap", i, n - s + i))
    return events


def assert_weights_equal(model, reference):
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("num_swap", [1, 2, 5, 8])  # (text, visual) swapped: (0,1) (0,2) (1,4) (2,4)
def test_training_outputs_gradients_schedule(num_swap):
    ref_model, ref_net = make_model()
    x, ctx = inputs()
    ref_steps = [train_step(ref_model, ref_net, x, ctx) for _ in range(2)]

    model, network = make_model()
    model.enable_block_swap(num_swap, BlockSwapConfig("cpu", supports_backward=True, debug=True))
    model.move_to_device_except_swap_blocks("cpu")
    model.switch_block_swap_for_training()
    counts = model._split_blocks_to_swap(num_swap)
    for step in range(2):
        for off in model.offloaders:
            if off is not None:
                off.events.clear()
        out, grads = train_step(model, network, x, ctx)
        torch.testing.assert_close(out, ref_steps[step][0], rtol=0, atol=0)
        for g, rg in zip(grads, ref_steps[step][1]):
            torch.testing.assert_close(g, rg, rtol=0, atol=0)
        for list_idx, (blocks, s) in enumerate(zip(model._block_lists(), counts)):
            off = model.offloaders[list_idx]
            if s == 0:
                assert off is None
                continue
            n = len(blocks)
            expected = expected_training_events(n, s)  # layout already set by switch_block_swap_for_training
            assert off.events == expected
            # forward + backward restore the initial layout: first N-S resident, last S offloaded
            assert off.resident == [i < n - s for i in range(n)]
    assert_weights_equal(model, ref_model)  # every weight followed its own module through all exchanges


def test_training_with_gradient_checkpointing_and_offload():
    ref_model, ref_net = make_model()
    x, ctx = inputs()
    ref_out, ref_grads = train_step(ref_model, ref_net, x, ctx)
    model, network = make_model()
    model.enable_gradient_checkpointing(activation_cpu_offloading=True)
    model.enable_block_swap(4, BlockSwapConfig("cpu", supports_backward=True, debug=True))
    model.switch_block_swap_for_training()
    out, grads = train_step(model, network, x, ctx)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    off = model.offloaders[1]
    assert off.events[1:] == expected_training_events(N_VISUAL, 3)
    assert off.resident == [i < N_VISUAL - 3 for i in range(N_VISUAL)]


@pytest.mark.parametrize("num_swap", [1, 2, 3, 8])  # (text, visual) swapped: (0,1) (0,2) (0,3) (2,4)
def test_inference_with_and_without_wrap_around(num_swap):
    ref_model, _ = make_model()
    x, ctx = inputs()
    with torch.no_grad():
        ref = ref_model(x, ctx)
    model, _ = make_model()
    model.enable_block_swap(num_swap, BlockSwapConfig("cpu", supports_backward=False, debug=True))
    model.switch_block_swap_for_inference()
    counts = model._split_blocks_to_swap(num_swap)
    for step in range(3):
        for off in model.offloaders:
            if off is not None:
                off.events.clear()
        with torch.no_grad():
            out = model(x, ctx)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        for off, blocks, s in zip(model.offloaders, model._block_lists(), counts):
            if s == 0:
                assert off is None
                continue
            n = len(blocks)
            wrap = s >= n / 2
            # no wrap-around: blocks S..N-1 end up resident, so every forward re-lays out (except the first, laid
            # out by switch_block_swap_for_inference); the wrap-around returns to the initial layout by itself
            relayout = [("prepare",)] if (step > 0 and not wrap) else []
            assert off.events == relayout + expected_inference_events(n, s)
            final = [i < n - s for i in range(n)] if wrap else [i >= s for i in range(n)]
            assert off.resident == final
    assert_weights_equal(model, ref_model)


def test_switch_between_inference_and_training():
    ref_model, ref_net = make_model()
    x, ctx = inputs()
    ref_out, ref_grads = train_step(ref_model, ref_net, x, ctx)
    model, network = make_model()
    model.enable_block_swap(2, BlockSwapConfig("cpu", supports_backward=True))
    model.switch_block_swap_for_inference()  # e.g. sampling during training
    with torch.no_grad():
        torch.testing.assert_close(model(x, ctx), ref_out, rtol=0, atol=0)
    model.switch_block_swap_for_training()
    out, grads = train_step(model, network, x, ctx)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=0, atol=0)


def test_swapped_linears_hidden_from_dynamo_unless_allowed():
    model, _ = make_model()
    model.enable_block_swap(2, BlockSwapConfig("cpu", supports_backward=True))
    assert model.offloaders[0] is None
    assert all(getattr(b.attn.forward, "_torchdynamo_disable", False) for b in model.visual_blocks)
    assert not any(getattr(b.attn.forward, "_torchdynamo_disable", False) for b in model.text_blocks)
    model2, _ = make_model()
    model2.enable_block_swap(2, BlockSwapConfig("cpu", supports_backward=True, allow_linear_compile=True))
    assert not any(getattr(b.attn.forward, "_torchdynamo_disable", False) for b in model2.visual_blocks)


def test_invalid_configurations():
    model, _ = make_model()
    with pytest.raises(UserError, match="--blocks_to_swap"):
        ModelOffloader(model.visual_blocks, N_VISUAL - 1, BlockSwapConfig("cpu", supports_backward=True))
    ModelOffloader(model.visual_blocks, N_VISUAL - 1, BlockSwapConfig("cpu", supports_backward=False)).close()
    with pytest.raises(UserError, match="--blocks_to_swap"):
        model.enable_block_swap(-1, BlockSwapConfig("cpu", supports_backward=True))
    with pytest.raises(ValueError, match="meta"):
        BlockSwapConfig("cpu", supports_backward=True, offload_device="meta")
    with pytest.raises(UserError, match="--block_swap_h2d_only"):
        BlockSwapConfig("cuda", supports_backward=True, h2d_only=True)
    with pytest.raises(UserError, match="--block_swap_ring_size"):
        BlockSwapConfig("cuda", supports_backward=True, ring_size=0)
    off = ModelOffloader(model.visual_blocks, 2, BlockSwapConfig("cpu", supports_backward=False))
    with pytest.raises(RuntimeError, match="prepare_block_swap_before_forward"):
        off.wait_for_block(0)
    off.prepare_block_devices_before_forward(model.visual_blocks)
    with pytest.raises(RuntimeError, match="not on cpu"):
        off.wait_for_block(N_VISUAL - 1)  # offloaded and never scheduled in: the schedule check fires
    off.close()


def test_debug_env_var_enables_recording(monkeypatch):
    monkeypatch.setenv("MUSUBI_TUNER_OFFLOADER_DEBUG", "1")
    assert BlockSwapConfig("cpu", supports_backward=False).debug
    monkeypatch.setenv("MUSUBI_TUNER_OFFLOADER_DEBUG", "0")
    assert not BlockSwapConfig("cpu", supports_backward=False).debug


def _weight_ptrs(blocks, resident, want):
    return {b.weight.data_ptr() for i, blk in enumerate(blocks) if resident[i] == want for b in (blk.attn, blk.ff_in, blk.ff_out)}


def test_swaps_reuse_the_device_buffers():
    """Incoming weights land in the outgoing block's device storage: the set of device buffers never changes (no
    allocation per swap on the accelerator), and offloaded blocks never share storage with resident ones."""
    model, network = make_model()
    x, ctx = inputs()
    model.enable_block_swap(5, BlockSwapConfig("cpu", supports_backward=True))
    model.switch_block_swap_for_training()
    off = model.offloaders[1]
    device_buffers = _weight_ptrs(model.visual_blocks, off.resident, True)
    assert len(device_buffers) == 3 * (N_VISUAL - 4)
    for _ in range(2):
        train_step(model, network, x, ctx)
        assert _weight_ptrs(model.visual_blocks, off.resident, True) == device_buffers
        assert not _weight_ptrs(model.visual_blocks, off.resident, False) & device_buffers
    model.switch_block_swap_for_inference()  # 4 of 6: the wrap-around schedule
    for _ in range(2):
        with torch.no_grad():
            model(x, ctx)
        assert _weight_ptrs(model.visual_blocks, off.resident, True) == device_buffers
