"""Wan sampling loop shared by ``wan_generate_video.py`` and the trainer's samples (specs/wan.md §7, §8).

One or two DiTs (Wan 2.2 A14B: the high-noise expert while ``t ≥ boundary``, then the low-noise expert, each with
its own CFG scale), the UniPC / DPM++ / Euler solvers of ``wan.sampling``, I2V / FLF2V / Fun-Control condition
channels (``y``), CLIP tokens, TI2V-5B first-frame replacement with per-token timesteps, and V2V starts
(``init_latents`` + ``denoise_strength``). Blissful features come in as callables (``guidance_fn``,
``uncond_needed_fn``, ``skip_blocks_fn``, ``step_callback``); this module never imports ``blissful_tuner``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tqdm import tqdm

from musubi_tuner.wan.conditioning import ti2v_replace_first, ti2v_token_timesteps
from musubi_tuner.wan.configs import TaskConfig
from musubi_tuner.wan.models.dit import WanModel
from musubi_tuner.wan.sampling import cfg_combine, denoise_start_index, expert_for, make_sampler, needs_uncond

GuidanceFn = Callable[[int, torch.Tensor, torch.Tensor | None, float, torch.Tensor | None], torch.Tensor]


def _grid(model: WanModel, shape: tuple[int, int, int, int]) -> tuple[int, int, int]:
    pt, ph, pw = model.patch_size
    return shape[1] // pt, shape[2] // ph, shape[3] // pw


def sample_latents(
    dits: WanModel | Mapping[str, WanModel],
    task: TaskConfig,
    *,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    latent_shape: tuple[int, int, int, int],
    num_steps: int,
    guidance_scale: float,
    shift: float,
    generator: torch.Generator,
    device: torch.device | str,
    solver: str = "unipc",
    guidance_scale_high: float | None = None,
    boundary: float | None = None,
    y: torch.Tensor | None = None,
    clip_fea: torch.Tensor | None = None,
    ti2v_image_latent: torch.Tensor | None = None,
    init_latents: torch.Tensor | None = None,
    denoise_strength: float | None = None,
    noise: torch.Tensor | None = None,
    nocond: torch.Tensor | None = None,
    guidance_fn: GuidanceFn | None = None,
    uncond_needed_fn: Callable[[int], bool] | None = None,
    skip_blocks_fn: Callable[[int, str], list[int] | None] | None = None,
    slg_fn: Callable[[int], tuple[list[int], float] | None] | None = None,
    on_expert: Callable[[str | None], None] | None = None,
    step_callback: Callable[[int, torch.Tensor, float], None] | None = None,
    riflex_index: int = 0,
    nag: tuple[torch.Tensor, float, float, float] | None = None,
    frame_indices: tuple[int, ...] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample one latent ``(C, F', h, w)`` (float32, CPU).

    Args:
        dits: one DiT, or ``{"high": ..., "low": ...}`` for two-expert tasks (routing at ``boundary``).
        cond / uncond: T5 states ``(L, 4096)`` of the prompt / negative prompt (``uncond=None``: no CFG pass).
        latent_shape: ``(C, F', h, w)``.
        guidance_scale / guidance_scale_high: CFG scale (of the low-noise expert) / of the high-noise expert.
        y: condition channels ``(C_y, F', h, w)`` (I2V mask + image latent, Fun-Control ...).
        clip_fea: ``(N, 257, 1280)`` CLIP tokens (2.1 I2V: N = 1; FLF2V: 2).
        ti2v_image_latent: TI2V-5B first-frame latent ``(48, 1, h, w)``: frame 0 stays clean, its tokens get t = 0.
        init_latents / denoise_strength: V2V: start at step ``N − round(N·p)`` from ``(1 − σ)·x0 + σ·ε``.
        nocond: T5 states of the empty prompt (perpendicular negative guidance): a third pass on every step that runs
            the unconditional one, handed to ``guidance_fn`` as ``v_nocond``.
        guidance_fn: ``(step, v_cond, v_uncond or None, scale, v_nocond or None) -> v`` (blissful CFG variants);
            default CFG.
        uncond_needed_fn: per-step "run the unconditional pass?" (cfg_skip, CFG schedules).
        skip_blocks_fn: ``(step, "cond"|"uncond") -> block indices to skip`` (skip-layer guidance, ``uncond`` mode).
        slg_fn: ``step -> (blocks, scale)`` for skip-layer guidance ``original`` mode: a third pass with the prompt
            and those blocks skipped; ``v += scale·(v_cond − v_skip)``.
        on_expert: called with the expert about to run when it changes (offload the inactive one).
        step_callback: ``(step, x, sigma_next)`` after each step (previews).
        nag: ``(negative T5 states (L, 4096), scale, tau, alpha)``: NAG in the prompt pass's cross-attention.
        frame_indices: one-frame mode: the RoPE time index of each latent frame (``wan.one_frame``).
    """
    experts = dict(dits) if isinstance(dits, Mapping) else {None: dits}
    if boundary is not None and set(experts) != {"high", "low"}:
        raise ValueError("two-expert sampling needs {'high': dit, 'low': dit}")
    first = next(iter(experts.values()))
    dtype = first.compute_dtype
    sampler = make_sampler(solver, num_steps, shift, generator=generator)
    if noise is None:
        noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32, device=generator.device)
    x = noise.float().to(device)
    start = 0
    if init_latents is not None:
        start = denoise_start_index(num_steps, 1.0 if denoise_strength is None else denoise_strength)
        sigma0 = float(sampler.sigmas[start])
        x = (1 - sigma0) * init_latents.float().to(device) + sigma0 * x
        sampler.start_at(start)
    if ti2v_image_latent is not None:
        x = ti2v_replace_first(x[None], ti2v_image_latent[None].to(device))[0]
    ctx_c = [cond.to(device=device, dtype=dtype)]
    ctx_u = [uncond.to(device=device, dtype=dtype)] if uncond is not None else None
    ctx_n = [nocond.to(device=device, dtype=dtype)] if nocond is not None else None
    y_in = y[None].to(device=device, dtype=dtype) if y is not None else None
    clip_in = clip_fea.to(device) if clip_fea is not None else None
    grid = _grid(first, latent_shape)
    nag_in = ([nag[0].to(device=device, dtype=dtype)], nag[1], nag[2], nag[3]) if nag is not None else None
    fi = {"frame_indices": frame_indices} if frame_indices is not None else {}
    active: object = object()
    steps = range(start, num_steps)
    for n, i in enumerate(tqdm(steps, desc="sampling", leave=False, disable=not progress)):
        sigma = float(sampler.sigmas[i])
        expert = expert_for(sigma, boundary)
        if expert != active:
            active = expert
            if on_expert is not None:
                on_expert(expert)
        dit = experts[expert]
        scale = guidance_scale_high if (expert == "high" and guidance_scale_high is not None) else guidance_scale
        t = torch.tensor([sigma * 1000.0], device=device)
        if task.ti2v:
            t = ti2v_token_timesteps(t, grid, first_frame_clean=ti2v_image_latent is not None)
        xin = x[None].to(dtype)
        skip_c = skip_blocks_fn(n, "cond") if skip_blocks_fn else None
        v_c = dit(xin, t, ctx_c, clip_in, y_in, skip_block_indices=skip_c, riflex_index=riflex_index, nag=nag_in, **fi).float()
        run_u = ctx_u is not None and (uncond_needed_fn(n) if uncond_needed_fn else needs_uncond(scale))
        v_u = v_n = None
        if run_u:
            skip_u = skip_blocks_fn(n, "uncond") if skip_blocks_fn else None
            v_u = dit(xin, t, ctx_u, clip_in, y_in, skip_block_indices=skip_u, riflex_index=riflex_index, **fi).float()
            if ctx_n is not None:
                v_n = dit(xin, t, ctx_n, clip_in, y_in, riflex_index=riflex_index, **fi).float()
        if guidance_fn is not None:
            v = guidance_fn(n, v_c, v_u, scale, v_n)
        else:
            v = cfg_combine(v_c, v_u, scale) if v_u is not None else v_c
        slg = slg_fn(n) if slg_fn is not None else None
        if slg is not None:
            v_s = dit(xin, t, ctx_c, clip_in, y_in, skip_block_indices=slg[0], riflex_index=riflex_index, **fi).float()
            v = v + slg[1] * (v_c - v_s)
        x = sampler.step(v[0], i, x)
        if ti2v_image_latent is not None:
            x = ti2v_replace_first(x[None], ti2v_image_latent[None].to(device))[0]
        if step_callback is not None:
            step_callback(n, x, float(sampler.sigmas[i + 1]))
    return x.cpu()


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """``(C, F', h, w)`` normalised latents → ``(3, F, H, W)`` in [0, 1]."""
    video = vae.decode(latents[None])[0]
    return (video.float() + 1.0) / 2.0
