"""Qwen-Image DiT with the shared block swap (``BlockSwapMixin`` over ``transformer_blocks``): a LoRA training step with
blocks swapped and gradient checkpointing (activations offloaded) equals the plain step (on CPU the swap moves
nothing between devices: this pins the swap hooks' ordering in forward and backward, not the transfers)."""

from __future__ import annotations

import torch

from musubi_tuner.demo.qwen_image_bundle import randomize_
from musubi_tuner.modules.offloading import BlockSwapConfig
from musubi_tuner.networks.lora_qwen_image import create_arch_network
from musubi_tuner.qwen_image.models.dit import QwenImageTransformer

TINY = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 4, "attention_head_dim": 16,
        "num_attention_heads": 4, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4)}  # fmt: skip
SHAPES = [(1, 2, 3)]  # one 4x6-latent image: 6 tokens


def tiny() -> QwenImageTransformer:
    model = QwenImageTransformer(**TINY)
    randomize_(model, 0)
    return model.requires_grad_(False)


def lora_step(model: QwenImageTransformer) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Forward + backward of a fresh LoRA (non-zero up weights); the gradient of every LoRA parameter (None where the
    output does not depend on it: the last block's text stream)."""
    torch.manual_seed(5)
    net = create_arch_network(1.0, 4, 4, None, None, model)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    for name, p in net.named_parameters():
        if "lora_up" in name:
            torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(2)
    x, txt = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the padded text of a batch of two
    out = model(x, txt, mask, torch.tensor([0.6, 0.3]), SHAPES)
    out.square().mean().backward()
    return out.detach(), [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def test_block_lists_are_the_transformer_blocks():
    model = tiny()
    assert [list(b) for b in model._block_lists()] == [list(model.transformer_blocks)]
    assert model._split_blocks_to_swap(2, training=True) == [2]


def test_block_swap_and_checkpointing_match_the_plain_step():
    ref_out, ref_grads = lora_step(tiny())
    model = tiny()
    model.enable_gradient_checkpointing(activation_cpu_offloading=True)
    model.enable_block_swap(2, BlockSwapConfig("cpu", supports_backward=True))
    model.switch_block_swap_for_training()
    assert model.offloaders and model.blocks_to_swap == 2
    out, grads = lora_step(model)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    assert [g is None for g in grads] == [g is None for g in ref_grads]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    for g, rg in zip(grads, ref_grads):
        if g is not None:
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
