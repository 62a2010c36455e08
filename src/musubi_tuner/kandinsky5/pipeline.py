"""The one Kandinsky 5 sampling path, shared by ``kandinsky5_generate_video.py`` and sampling during training.

specs/kandinsky5.md §8 (sampling), §9 (image conditioning), §14 defects 1–3, 7, 9, 12:

- one copy of the prompt tokens (``text_rope_pos = arange(L)``, one pooled vector), as in training (defect #1);
- the DiT input of every step is built by :func:`musubi_tuner.kandinsky5.conditioning.build_dit_input`, the function
  the trainer uses, so training and inference see the same I2V layout (defect #2): the clean image latent replaces
  frame 0 (and F−1 for first+last, defect #3) of the noisy stream, mask 1 there, ``visual_cond`` zero;
- after sampling the conditioned frames are restored to the clean latents and ``normalize_first_frame`` is applied
  (I2V, F ≥ 5 only, defect #12);
- Image Lite I2I (``instruct_type = "channel"``): ``concat(noisy, source latent, ones)``; TI2I: a T2I model started
  from an image at ``t₀`` of the shifted grid (``denoise_strength``).

This module never imports ``blissful_tuner``: guidance extras (CFG schedule, CFG-Zero*), other samplers (DPM++) and
previews are passed in as callables. Reference-image loading and resizing (§9) live here too.

Tensors are channels-last: latents ``(F, h, w, 16)`` with ``h, w`` = pixels / 8.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from musubi_tuner.kandinsky5.conditioning import build_dit_input, conditioned_frame_indices, normalize_first_frame
from musubi_tuner.kandinsky5.sampling import cfg_combine, euler_step, model_timestep, needs_uncond, timestep_grid
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.images import image_to_tensor, load_image, resize_cover  # noqa: F401  (re-exported)
from musubi_tuner.utils.log import get_logger

if TYPE_CHECKING:
    from musubi_tuner.kandinsky5.configs import TaskConfig
    from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D
    from musubi_tuner.kandinsky5.models.nabla import NablaParams
    from musubi_tuner.kandinsky5.vae import K5Vae

logger = get_logger(__name__)

LATENT_CHANNELS = 16
SPATIAL_COMPRESSION = 8

# Official default negative prompt of the video pipelines (specs/kandinsky5.md §8); the image pipelines use "".
VIDEO_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, walking backwards"
)
IMAGE_NEGATIVE_PROMPT = ""

# Reference-image size limits (§9): max area per task resolution, side divisibility (128 when NABLA attention runs).
REFERENCE_MAX_AREA = {512: 512 * 768, 1024: 1024 * 1024}
REFERENCE_DIVISIBILITY = 16
NABLA_DIVISIBILITY = 128
ADVANCED_I2VI_MAX_SIDE = 4096

# (velocity_fn, x (1, F, h, w, 16), grid (N+1,), step_callback(i, x, t_next)) -> x: an alternative integrator.
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
SamplerFn = Callable[[VelocityFn, torch.Tensor, torch.Tensor, Callable[[int, torch.Tensor, float], None]], torch.Tensor]


def default_negative_prompt(task: TaskConfig) -> str:
    """Official default negative for the task family: the video text for video tasks, ``""`` for Image Lite.

    (musubi-tuner / Blissful replaced an empty negative by ``low quality, bad quality``; we follow the official
    pipelines, specs/kandinsky5.md §8.)
    """
    return IMAGE_NEGATIVE_PROMPT if task.is_image else VIDEO_NEGATIVE_PROMPT


def template_mode_for_task(task: TaskConfig, num_latent_frames: int) -> str:
    """Qwen template of §8: ``image_edit`` for I2I, ``video`` when F > 1, else ``image``."""
    if task.is_i2i:
        return "image_edit"
    return "video" if num_latent_frames > 1 else "image"


def initial_noise(latent_shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``randn(F, h, w, 16)`` float32 drawn from ``generator`` on the generator's device (reproducible per device)."""
    f, h, w = latent_shape
    return torch.randn((f, h, w, LATENT_CHANNELS), generator=generator, device=generator.device, dtype=torch.float32)


def ti2i_step_count(num_steps: int, denoise_strength: float | None) -> int:
    """Steps that run for a TI2I start: the last ``int(N·p)`` of the shifted grid (``N`` without a strength)."""
    if denoise_strength is None:
        return num_steps
    if not 0.0 < denoise_strength <= 1.0:
        raise UserError(f"--ti2i_denoise_percent must be in (0, 1] (got {denoise_strength})")
    kept = int(num_steps * denoise_strength)
    if kept < 1:
        raise UserError(f"--ti2i_denoise_percent {denoise_strength} keeps no step of {num_steps}; raise it or the step count")
    return kept


def _image_frames(
    image_latents: torch.Tensor, i2v_mode: str, num_frames: int, hw: tuple[int, int]
) -> tuple[list[int], torch.Tensor]:
    """Conditioned frame indices and the clean frames ``(1, n, h, w, 16)`` from ``(16, 2, h, w)`` image latents."""
    if image_latents.dim() == 5:
        if image_latents.shape[0] != 1:
            raise ValueError(f"image_latents: one sample expected, got {tuple(image_latents.shape)}")
        image_latents = image_latents[0]
    if image_latents.dim() != 4 or image_latents.shape[0] != LATENT_CHANNELS or image_latents.shape[1] < 1:
        raise ValueError(f"image_latents must be (16, 2, h, w) (first, last), got {tuple(image_latents.shape)}")
    if tuple(image_latents.shape[-2:]) != tuple(hw):
        raise UserError(
            f"the reference image latent is {image_latents.shape[-1] * 8}x{image_latents.shape[-2] * 8} px but the video is "
            f"{hw[1] * 8}x{hw[0] * 8} px; resize the image (or the output) so they match"
        )
    if i2v_mode not in ("first", "first_last"):
        raise UserError(f"unknown I2V mode '{i2v_mode}' (--i2v_mode): use first or first_last")
    indices = conditioned_frame_indices(num_frames, i2v_mode)  # type: ignore[arg-type]
    frames = image_latents.permute(1, 2, 3, 0)  # (2, h, w, 16)
    if len(indices) == 2:
        if frames.shape[0] < 2:
            raise ValueError("first_last mode needs two image latents (first, last)")
        clean = frames[:2]
    else:
        clean = frames[:1]
    return indices, clean[None].float()


@torch.no_grad()
def sample_latents(
    dit: DiffusionTransformer3D,
    task: TaskConfig,
    *,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    latent_shape: tuple[int, int, int],
    num_steps: int,
    guidance_scale: float,
    scheduler_scale: float,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype,
    image_latents: torch.Tensor | None = None,
    i2v_mode: str = "first",
    sparse_params_fn: Callable[[tuple[int, int, int]], NablaParams | None] | None = None,
    guidance_fn: Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    uncond_needed_fn: Callable[[int], bool] | None = None,
    step_callback: Callable[[int, torch.Tensor, float], None] | None = None,
    noise: torch.Tensor | None = None,
    image_extra_noise: float = 0.0,
    normalize_first: bool = True,
    source_latents: torch.Tensor | None = None,
    init_latents: torch.Tensor | None = None,
    denoise_strength: float | None = None,
    sampler_fn: SamplerFn | None = None,
    autocast: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """Sample one latent with the official shifted-grid Euler sampler and classifier-free guidance.

    Args:
        dit: the DiT (already on ``device`` or block-swapping); called with batch 1.
        task: the task (RoPE scale factors, input width, I2I).
        cond / uncond: one item of ``Kandinsky5TextEncoder.encode()`` each: ``{"text_embeds": (L, D),
            "pooled_embed": (D2,)}``. ``uncond=None`` never runs the unconditional pass.
        latent_shape: ``(F, h, w)`` latent frames / height / width.
        num_steps / guidance_scale / scheduler_scale: steps, CFG scale, grid shift.
        generator: the noise generator; the noise is ``randn((F, h, w, 16))`` float32 on ``generator.device``.
        device / dtype: where the DiT runs and the dtype of its inputs.
        image_latents: ``(16, 2, h, w)`` from ``K5Vae.encode_image_condition(...)[0]`` (first, last) for I2V.
        i2v_mode: ``"first"`` or ``"first_last"`` (which of ``image_latents``' frames are applied, at 0 and F−1).
        sparse_params_fn: NABLA parameters for the latent shape (``None`` result = dense attention).
        guidance_fn: ``(step, v_cond, v_uncond) -> v``; called on *every* step, with ``v_uncond=None`` when the
            unconditional pass did not run (so CFG-Zero* zero-init can apply there too). Default: CFG when the
            unconditional prediction exists, else ``v_cond``.
        uncond_needed_fn: per-step "run the unconditional pass?" (CFG schedule); default ``needs_uncond(g)``.
        step_callback: ``(step, x_t (F, h, w, 16), t_next)`` after each step (previews; ``t_next`` = remaining noise).
        noise: explicit initial noise ``(F, h, w, 16)`` instead of drawing it from ``generator``.
        image_extra_noise: ``--i2vi_extra_noise``: ``x·ε`` added to the first conditioning latent (ε from
            ``generator``, drawn after the initial noise).
        normalize_first: apply ``normalize_first_frame`` after I2V sampling (official; skipped for F < 5).
        source_latents: Image Lite I2I source latent ``(1, h, w, 16)``; the input is ``concat(x, source, ones)``.
        init_latents: TI2I start image latent ``(F, h, w, 16)``; with ``denoise_strength`` p the last ``int(N·p)``
            steps run, starting from ``ε·t₀ + (1 − t₀)·x_img``. Step indices passed to the callables count the
            steps that run (0 = first step that runs).
        sampler_fn: another integrator ``(velocity_fn, x, grid, step_callback) -> x`` (e.g. DPM++); default Euler.
        autocast: run the DiT under ``torch.autocast(device.type, dtype)`` (training-time sampling with
            mixed-precision adapters); off by default because the DiT keeps its own float32 islands.
        progress: show a progress bar.

    Returns:
        Scaled latents ``(F, h, w, 16)`` float32 on ``device``, conditioned frames restored to the clean latents
        and ``normalize_first_frame`` applied (I2V, F ≥ 5).
    """
    device = torch.device(device)
    f, h, w = (int(v) for v in latent_shape)
    visual_cond = bool(getattr(dit, "in_channels", task.in_visual_channels) == 2 * LATENT_CHANNELS + 1)
    if task.is_i2i and source_latents is None:
        raise UserError(f"task {task.name} edits an image: give the source image (--image)")
    if source_latents is not None and not task.is_i2i:
        raise ValueError("source_latents are only for the Image Lite I2I task")
    if image_latents is not None and source_latents is not None:
        raise ValueError("image_latents (I2V) and source_latents (I2I) cannot be combined")
    if image_latents is not None and not visual_cond:
        raise UserError(
            f"task {task.name} has no image-conditioning input (16-channel model); image-to-video needs a video task "
            "(for an init image with a text-to-image model use --ti2i_denoise_percent)"
        )

    # -- conditioning frames -------------------------------------------------------------------------------------
    indices: list[int] = []
    clean: torch.Tensor | None = None
    if image_latents is not None:
        indices, clean = _image_frames(image_latents, i2v_mode, f, (h, w))
        clean = clean.to(device)

    # -- noise and start latent ----------------------------------------------------------------------------------
    if noise is None:
        noise = initial_noise((f, h, w), generator)
    elif tuple(noise.shape) != (f, h, w, LATENT_CHANNELS):
        raise ValueError(f"noise must be {(f, h, w, LATENT_CHANNELS)}, got {tuple(noise.shape)}")
    noise = noise.to(device=device, dtype=torch.float32)
    if clean is not None and image_extra_noise:
        eps = torch.randn(clean.shape[2:], generator=generator, device=generator.device, dtype=torch.float32).to(device)
        clean = clean.clone()
        clean[:, 0] = clean[:, 0] + float(image_extra_noise) * eps

    grid = timestep_grid(num_steps, scheduler_scale, device="cpu")
    x = noise[None]
    if init_latents is not None:
        kept = ti2i_step_count(num_steps, denoise_strength)
        grid = grid[num_steps - kept :]
        t0 = float(grid[0])
        img = init_latents.to(device=device, dtype=torch.float32)
        if img.dim() == 4:
            img = img[None]
        if tuple(img.shape[1:]) != (f, h, w, LATENT_CHANNELS):
            raise UserError(f"the init image latent {tuple(img.shape[1:4])} does not match the output latent {(f, h, w)} (--image)")
        x = noise[None] * t0 + (1.0 - t0) * img
    elif denoise_strength is not None:
        raise ValueError("denoise_strength needs init_latents")

    source = None
    if source_latents is not None:
        source = source_latents.to(device=device, dtype=torch.float32)
        if source.dim() == 4:
            source = source[None]
        if tuple(source.shape[2:4]) != (h, w):
            raise UserError(f"the source image latent {tuple(source.shape[2:4])} does not match the output latent {(h, w)}")
        source = source[:, :1].expand(1, f, h, w, LATENT_CHANNELS)

    # -- text ----------------------------------------------------------------------------------------------------
    def _text(item: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = item["text_embeds"]
        pooled = item["pooled_embed"]
        emb = emb if emb.dim() == 3 else emb[None]
        pooled = pooled if pooled.dim() == 2 else pooled[None]
        return emb.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    c_text, c_pooled = _text(cond)
    u_text = u_pooled = None
    if uncond is not None:
        u_text, u_pooled = _text(uncond)

    sparse = sparse_params_fn((f, h, w)) if sparse_params_fn is not None else None
    scale_factor = tuple(float(s) for s in task.rope_scale)
    steps_run = len(grid) - 1

    def dit_input(x_t: torch.Tensor) -> torch.Tensor:
        if source is not None:
            ones = torch.ones((*x_t.shape[:-1], 1), dtype=x_t.dtype, device=x_t.device)
            return torch.cat([x_t, source.to(x_t.dtype), ones], dim=-1)
        return build_dit_input(x_t, clean, indices, visual_cond)

    use_autocast = autocast and dtype in (torch.bfloat16, torch.float16)  # float32 autocast is a no-op (and warns on CPU)

    def forward(inp: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            out = dit(inp, text, pooled, t_model, scale_factor=scale_factor, sparse_params=sparse)
        return out.float()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps_run, desc="sampling", leave=False)

    def velocity_fn(x_t: torch.Tensor, t_model: torch.Tensor, i: int) -> torch.Tensor:
        inp = dit_input(x_t.to(dtype))
        t_model = t_model.to(device=device, dtype=torch.float32)
        v_cond = forward(inp, c_text, c_pooled, t_model)
        run_uncond = uncond is not None and (uncond_needed_fn(i) if uncond_needed_fn is not None else needs_uncond(guidance_scale))
        v_uncond = forward(inp, u_text, u_pooled, t_model) if run_uncond else None
        if guidance_fn is not None:
            v = guidance_fn(i, v_cond, v_uncond)
        elif v_uncond is not None:
            v = cfg_combine(v_cond, v_uncond, guidance_scale)
        else:
            v = v_cond
        if bar is not None:
            bar.update(1)
        return v.float()

    def after_step(i: int, x_t: torch.Tensor, t_next: float) -> None:
        if step_callback is not None:
            step_callback(i, x_t[0], float(t_next))

    try:
        if sampler_fn is not None:
            x = sampler_fn(velocity_fn, x, grid, after_step)
        else:
            for i in range(steps_run):
                t_model = model_timestep(grid[i], 1, device)
                x = euler_step(x, velocity_fn(x, t_model, i), grid[i], grid[i + 1])
                after_step(i, x, float(grid[i + 1]))
    finally:
        if bar is not None:
            bar.close()

    out = x[0].float()
    if clean is not None:
        out[indices] = clean[0].to(out.dtype)
        if normalize_first:
            out = normalize_first_frame(out)
    return out


@torch.no_grad()
def decode_latents(vae: K5Vae, latents: torch.Tensor) -> torch.Tensor:
    """(F, h, w, 16) scaled latents → video ``(3, F_pixels, H, W)`` float32 in [0, 1] (on CPU).

    HunyuanVideo: ``F_pixels = 4·(F − 1) + 1``; FLUX.1 (Image Lite): one image per latent frame.
    """
    if latents.dim() == 5 and latents.shape[0] == 1:
        latents = latents[0]
    if latents.dim() != 4 or latents.shape[-1] != LATENT_CHANNELS:
        raise ValueError(f"expected channels-last latents (F, h, w, 16), got {tuple(latents.shape)}")
    z = latents.permute(3, 0, 1, 2)[None]
    pixels = vae.decode_video(z)[0]
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Reference images (specs/kandinsky5.md §9)


def reference_max_area(task: TaskConfig, res_limit: int | None = None) -> int:
    """Largest pixel area of a reference image: 512·768 (512 tasks) / 1024² (1024 tasks), or ``res_limit²``."""
    if res_limit is not None:
        if res_limit < 16:
            raise UserError(f"--i2vi_res_limit must be >= 16 (got {res_limit})")
        return int(res_limit) ** 2
    return REFERENCE_MAX_AREA.get(task.resolution, task.resolution * task.resolution)


def reference_image_size(
    width: int, height: int, *, max_area: int, divisibility: int = REFERENCE_DIVISIBILITY, allow_upscale: bool = False
) -> tuple[int, int]:
    """``(W, H)`` for a ``width × height`` image: scaled by ``k = sqrt(max_area / area)`` (never above 1 unless
    ``allow_upscale``, musubi/Blissful behaviour), each side rounded to ``divisibility`` (at least one unit)."""
    if width < 1 or height < 1:
        raise ValueError(f"bad image size {width}x{height}")
    k = math.sqrt(max_area / (width * height))
    if not allow_upscale:
        k = min(1.0, k)
    w = max(divisibility, int(round(width * k / divisibility)) * divisibility)
    h = max(divisibility, int(round(height * k / divisibility)) * divisibility)
    return w, h


def prepare_reference_images(
    task: TaskConfig,
    first: str | os.PathLike | Any,
    last: str | os.PathLike | Any | None = None,
    *,
    target_size: tuple[int, int] | None = None,
    advanced: bool = False,
    nabla: bool = False,
    res_limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """Load and resize the reference image(s) for I2V / I2I / TI2I.

    Default (musubi/Blissful, §9): the first image is scaled down (never up) to the task's max area
    (``reference_max_area``) and rounded to multiples of 16 (128 with NABLA); the generation size is then the image
    size — a warning names the change when ``target_size`` (``--width/--height``) differs. ``advanced``
    (``--advanced_i2vi``): the image is resized and centre-cropped to ``target_size`` instead (multiples of 16, at
    most 4096² px, not with NABLA). The last image (first+last) is resized/cropped to the same size.

    Returns ``(first (1, 3, H, W), last (1, 3, H, W) | None, (W, H))`` in [-1, 1].
    """
    img = first if not isinstance(first, (str, os.PathLike)) else load_image(first, "--image")
    if advanced:
        if nabla:
            raise UserError("--advanced_i2vi cannot be combined with NABLA attention (sizes must stay 128-aligned)")
        if target_size is None:
            raise UserError("--advanced_i2vi needs --width and --height")
        w, h = target_size
        if w % REFERENCE_DIVISIBILITY or h % REFERENCE_DIVISIBILITY:
            raise UserError(f"--advanced_i2vi: --width/--height must be multiples of 16 (got {w}x{h})")
        limit = reference_max_area(task, res_limit) if res_limit is not None else ADVANCED_I2VI_MAX_SIDE**2
        if w * h > limit:
            raise UserError(f"--advanced_i2vi: {w}x{h} exceeds the maximum area of {limit} px")
    else:
        div = NABLA_DIVISIBILITY if nabla else REFERENCE_DIVISIBILITY
        w, h = reference_image_size(*img.size, max_area=reference_max_area(task, res_limit), divisibility=div)
        if target_size is not None and tuple(target_size) != (w, h):
            logger.warning(
                f"the output size follows the reference image: {w}x{h} instead of the requested "
                f"{target_size[0]}x{target_size[1]} (use --advanced_i2vi to resize the image to the requested size)"
            )
    first_t = image_to_tensor(resize_cover(img, w, h))
    last_t = None
    if last is not None:
        last_img = last if not isinstance(last, (str, os.PathLike)) else load_image(last, "--image_last")
        last_t = image_to_tensor(resize_cover(last_img, w, h))
    return first_t, last_t, (w, h)
