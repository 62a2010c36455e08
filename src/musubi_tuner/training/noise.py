"""Training-noise extras of blissful-tuner (specs/training.md §19): noise offset and multi-resolution (pyramid) noise.

Both modify ``ε`` before ``x_t`` is built, so the velocity target ``ε − x0`` uses the modified noise too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    offset: float,
    *,
    random_strength: bool = False,
    adaptive_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``noise + o·N(0, 1)`` with one normal draw per (batch, channel), broadcast over the other dimensions.

    ``o`` is ``offset`` (uniform in ``[0, offset)`` with ``random_strength``), plus ``adaptive_scale·|mean(latent)|``
    per (batch, channel) with ``adaptive_scale``, clamped at 0.
    """
    b, c = latents.shape[:2]
    reduce_dims = tuple(range(2, latents.ndim))
    o: torch.Tensor | float = offset
    if random_strength:
        o = float(torch.rand(1, generator=generator)) * offset
    if adaptive_scale is not None:
        mean = latents.float().mean(dim=reduce_dims, keepdim=True).abs()
        o = torch.clamp(o + adaptive_scale * mean, min=0.0)
    draw = torch.randn((b, c) + (1,) * len(reduce_dims), generator=generator, dtype=torch.float32)
    return noise + (o * draw.to(latents.device)).to(noise.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution noise: for ``i < iterations`` add bilinearly upsampled noise of ``1/r^i`` the size (``r`` uniform
    in ``[2, 4)``) weighted ``discount^i``, stopping when a side reaches 1; divided by the global std. 5-D latents
    ``(B, C, F, H, W)`` fold the frames into the batch."""
    shape = noise.shape
    x = noise.float()
    if x.ndim == 5:
        x = x.permute(0, 2, 1, 3, 4).reshape(shape[0] * shape[2], shape[1], shape[3], shape[4])
    b, c, h, w = x.shape
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=generator, dtype=torch.float32).to(x.device)
        x = x + F.interpolate(low, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    x = x / x.std()
    if noise.ndim == 5:
        x = x.reshape(shape[0], shape[2], shape[1], shape[3], shape[4]).permute(0, 2, 1, 3, 4)
    return x.to(noise.dtype)


def apply_noise_options(args: Any, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``--noise_offset`` then ``--multires_noise_iterations`` (the kohya order) on freshly drawn training noise;
    identity when neither is set."""
    if args.noise_offset:
        noise = apply_noise_offset(
            latents,
            noise,
            args.noise_offset,
            random_strength=args.noise_offset_random_strength,
            adaptive_scale=args.adaptive_noise_scale,
        )
    if args.multires_noise_iterations:
        noise = pyramid_noise(noise, args.multires_noise_iterations, args.multires_noise_discount)
    return noise
