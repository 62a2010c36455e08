"""LoHa (Hadamard-product adapter, LyCORIS key layout) on Linear layers (specs/networks.md §4.1).

``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank``; forward ``org(x) + F.linear(x, ΔW) · multiplier``. Selection,
naming, saving, loading, merging and the trainer methods are those of ``networks.lora`` (same ``LoRANetwork``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.networks import lora
from musubi_tuner.utils.errors import UserError

LOHA_NETWORK_ARGS = ("rank_dropout", "module_dropout", "exclude_patterns", "include_patterns", "exclude_mod", "verbose")


class HadaWeight(torch.autograd.Function):
    """ΔW of LoHa; the backward recomputes the two rank-r products instead of keeping them alive."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale):  # noqa: D102
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad_out = grad_out * ctx.scale
        temp = grad_out * (w2a @ w2b)
        grad_w1a, grad_w1b = temp @ w1b.T, w1a.T @ temp
        temp = grad_out * (w1a @ w1b)
        grad_w2a, grad_w2b = temp @ w2b.T, w2a.T @ temp
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


class LoHaModule(lora.LoRAModule):
    """LoHa for one Linear layer. Shares patching, merging and saving with ``LoRAModule``."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        **kwargs: Any,
    ):
        nn.Module.__init__(self)
        if not isinstance(org_module, nn.Linear):
            raise ValueError(f"{lora_name}: LoHa supports Linear layers only, not {type(org_module).__name__}")
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.split_dims = None
        out_dim, in_dim = org_module.out_features, org_module.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, lora_dim))
        self.hada_w1_b = nn.Parameter(torch.empty(lora_dim, in_dim))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, lora_dim))
        self.hada_w2_b = nn.Parameter(torch.empty(lora_dim, in_dim))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        alpha = lora._alpha_value(alpha, lora_dim)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        self.is_conv = False
        self.org_module_ref = [org_module]
        self.org_forward = None

    def delta_weight(self) -> torch.Tensor:
        """ΔW (scale included, multiplier not) in the parameters' dtype, differentiable."""
        return HadaWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus ``F.linear(x, ΔW) · multiplier``, rounded once to the base output dtype."""
        org = self.org_forward(x, *args, **kwargs)
        if not self.enabled or self.multiplier == 0:
            return org
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return org
        if x.dtype != self.hada_w1_a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.hada_w1_a.dtype)
        delta = self.delta_weight()
        scale = 1.0
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            delta = delta * keep[:, None]
            scale = 1.0 / (1.0 - self.rank_dropout)
        out = F.linear(x, delta)
        if self.training and self.dropout:
            out = F.dropout(out, p=self.dropout, training=True)
        return (org + out * (self.multiplier * scale)).to(org.dtype)

    def scale_parameters(self, factor: float) -> None:
        """Multiply ΔW by ``factor`` (``w1_a`` and ``w2_a`` by its square root each)."""
        root = math.sqrt(factor)
        with torch.no_grad():
            self.hada_w1_a.mul_(root)
            self.hada_w2_a.mul_(root)

    def up_parameters(self) -> list[nn.Parameter]:
        """LoRA+ does not apply to LoHa."""
        return []


class LoHaInfModule(LoHaModule):
    """Inference LoHa: no dropout; mergeable (``merge_to`` of ``LoRAModule``)."""

    def __init__(
        self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4, alpha: Any = 1, **kwargs: Any
    ):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha)


# What makes lora.create_network build LoHa modules: the module class, its network_args, its name, Linear only.
_LOHA_FACTORY_OPTIONS: dict[str, Any] = {
    "module_class": LoHaModule,
    "valid_args": LOHA_NETWORK_ARGS,
    "module_name": "networks.loha",
    "conv_ok": False,
}


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module,
    *,
    target_replace_modules: Any,
    default_excludes: tuple[str, ...] | list[str] = (),
    default_includes: tuple[str, ...] | list[str] = (),
    targets: Any = None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> lora.LoRANetwork:
    """Generic LoHa factory (architecture modules pass their targets); Linear layers only."""
    return lora.create_network(
        multiplier,
        network_dim,
        network_alpha,
        vae,
        text_encoders,
        unet,
        target_replace_modules=target_replace_modules,
        default_excludes=default_excludes,
        default_includes=default_includes,
        targets=targets,
        neuron_dropout=neuron_dropout,
        **_LOHA_FACTORY_OPTIONS,
        **kwargs,
    )


def create_arch_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> lora.LoRANetwork:
    """``--network_module networks.loha``: the architecture targets of ``unet`` (``arch_targets``), else every Linear."""
    return lora.create_arch_network(
        multiplier, network_dim, network_alpha, vae, text_encoders, unet, neuron_dropout, **_LOHA_FACTORY_OPTIONS, **kwargs
    )


def create_arch_network_from_weights(
    multiplier: float,
    weights_sd: dict[str, torch.Tensor],
    text_encoders: Any = None,
    unet: nn.Module | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> lora.LoRANetwork:
    """Network from a state dict; LoHa and LoRA modules are recognised per module by their keys (§4.4)."""
    return lora.create_arch_network_from_weights(
        multiplier,
        weights_sd,
        text_encoders,
        unet,
        for_inference,
        valid_args=LOHA_NETWORK_ARGS,
        module_name="networks.loha",
        **kwargs,
    )


def check_save_format(lora_format: str, network_args: dict[str, Any] | None = None) -> None:
    """Trainer start-up check of ``--lora_format``: a LoHa has no ``lora_A``/``lora_B`` factors, and no runtime loads
    LoHa tensors under diffusers' ``transformer.`` names (diffusers' ``load_lora_adapter`` fails on them), so
    ``diffusers`` is refused; ``kohya`` and ``comfyui`` (ComfyUI loads LyCORIS LoHa) are fine."""
    if lora_format == "diffusers":
        raise UserError(
            "--network_module networks.loha with --lora_format diffusers: diffusers/PEFT cannot load LoHa weights, so "
            "that file would be unusable; save with --lora_format kohya (or comfyui)"
        )
