"""Qwen-Image sampling (specs/qwen_image.md §6, §7): the release's sigma grid, Euler steps, true CFG with the per-token
norm rescale, edit controls appended after the target tokens, Layered frames. Shared by the generator and the
trainer's samples; blissful features come in as callables (``guidance_fn``, ``step_callback``), never as imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from musubi_tuner.qwen_image.configs import LATENT_CHANNELS, ModelVersion, dynamic_shift_mu, layered_shift_mu, sampling_sigmas
from musubi_tuner.qwen_image.packing import img_shapes_for, pack, unpack


@dataclass
class TextCond:
    """Padded text embeddings ``(B, L, D)`` and their bool mask ``(B, L)``."""

    embeds: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_list(cls, embeds: Sequence[torch.Tensor]) -> TextCond:
        from musubi_tuner.dataset.batching import pad_varlen

        padded, mask = pad_varlen(list(embeds))
        return cls(padded, mask)


def true_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """``neg + s·(pos − neg)``, rescaled per token to ``‖pos‖`` (L2 over channels; always on in the releases)."""
    return norm_rescale(neg + scale * (pos - neg), pos)


def norm_rescale(comb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``comb · ‖pos‖ / ‖comb‖`` per token (L2 over the last axis)."""
    pos_norm = torch.linalg.vector_norm(pos.float(), dim=-1, keepdim=True)
    comb_norm = torch.linalg.vector_norm(comb.float(), dim=-1, keepdim=True)
    return (comb.float() * (pos_norm / comb_norm.clamp_min(1e-12))).to(pos.dtype)


def sigmas_for(version: ModelVersion, steps: int, target_hw: tuple[int, int], control_hws: Sequence[tuple[int, int]], flow_shift):
    """The grid for this request: static ``flow_shift`` when given, else the dynamic μ (Layered: from the control)."""
    if flow_shift is not None:
        return sampling_sigmas(steps, flow_shift=float(flow_shift))
    if version.is_layered and control_hws:
        h, w = control_hws[0]
        return sampling_sigmas(steps, mu=layered_shift_mu((h // 2) * (w // 2)))
    h, w = target_hw
    return sampling_sigmas(steps, mu=dynamic_shift_mu((h // 2) * (w // 2)))


@torch.no_grad()
def sample_latents(
    dit: torch.nn.Module,
    version: ModelVersion,
    *,
    cond: TextCond,
    uncond: TextCond | None,
    latent_hw: tuple[int, int],
    frames: int = 1,
    controls: Sequence[torch.Tensor] = (),
    num_steps: int,
    guidance_scale: float,
    flow_shift: float | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    guidance_fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    uncond_needed_fn: Callable[[int], bool] | None = None,
    step_callback: Callable[[int, torch.Tensor, float], object] | None = None,
    latent_blend_fn: Callable[[int, float, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise and return latents ``(B, 16, F, h, w)`` float32 on the CPU (F = 1, or layers + 1 for Layered).

    ``controls``: clean control latents ``(B, 16, hc, wc)`` appended after the target tokens. True CFG runs when
    ``guidance_scale > 1`` and ``uncond`` is given (``uncond_needed_fn(step)`` decides per step);
    ``guidance_fn(step, pos, neg)`` replaces ``neg + s·(pos − neg)`` (blissful CFG schedules / CFG-Zero*); the
    per-token norm rescale to ``‖pos‖`` follows either way. ``step_callback(step, x, sigma_next)`` sees each result. ``latent_blend_fn(step, sigma_next, x)`` may edit the latents after each step
    (inpainting masks, RCM). Noise comes from a CPU generator (reproducible across devices).
    """
    device = torch.device(device)
    b = cond.embeds.shape[0]
    h, w = latent_hw
    if noise is None:
        noise = torch.randn((b, LATENT_CHANNELS, frames, h, w), generator=generator, dtype=torch.float32)
    x = noise.float()
    control_hws = [tuple(c.shape[-2:]) for c in controls]
    shapes = img_shapes_for((h, w), frames, control_hws)
    control_tokens = [pack(c.to(device=device, dtype=dtype)) for c in controls]
    sigmas = sigmas_for(version, num_steps, (h, w), control_hws, flow_shift)
    t_cond = torch.zeros(b, dtype=torch.long, device=device) if version.is_layered else None
    use_cfg = uncond is not None and guidance_scale > 1.0
    needs_uncond = uncond_needed_fn if uncond_needed_fn is not None else (lambda _i: use_cfg)

    def run(text: TextCond, tokens: torch.Tensor, sigma: float) -> torch.Tensor:
        inp = torch.cat([tokens, *control_tokens], dim=1)
        t = torch.full((b,), sigma, device=device)
        out = dit(inp, text.embeds.to(device, dtype), text.mask.to(device), t, shapes, additional_t_cond=t_cond)
        return out[:, : tokens.shape[1]].float()

    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        tokens = pack(x).to(device=device, dtype=dtype)
        v = run(cond, tokens, sigma)
        if uncond is not None and needs_uncond(i):
            v_neg = run(uncond, tokens, sigma)
            comb = guidance_fn(i, v, v_neg) if guidance_fn is not None else v_neg + guidance_scale * (v - v_neg)
            v = norm_rescale(comb, v)
        elif guidance_fn is not None:
            v = guidance_fn(i, v, None)  # CFG-Zero* zero-init steps scale the plain prediction too
        x = x + (sigma_next - sigma) * unpack(v, frames, h, w).cpu()
        if latent_blend_fn is not None:
            x = latent_blend_fn(i, sigma_next, x)
        if step_callback is not None:
            step_callback(i, x, sigma_next)
    return x
