"""Job planning for ``kandinsky5_generate_video.py``: resolve one job's kind, size, frames, images and guidance.

``validate_job`` is the hook ``blissful_tuner.generation_loop`` calls on every job (command line, ``--from_file``
line, ``--interactive`` input) before any model is loaded; errors name the job's line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from blissful_tuner.generation_loop import Job
from musubi_tuner.kandinsky5.configs import TaskConfig
from musubi_tuner.kandinsky5.models.nabla import check_nabla_geometry
from musubi_tuner.kandinsky5.pipeline import default_negative_prompt, prepare_reference_images, template_mode_for_task
from musubi_tuner.kandinsky5.vae import HUNYUAN_TEMPORAL_COMPRESSION
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

DEFAULT_LATENT_FRAMES = 5  # musubi-tuner's default (--frames 5 = 17 pixel frames) when no length is given
SIZE_STEP = 16  # latent 2x2 patches of the x8 VAE


@dataclass
class JobPlan:
    """Everything a job needs, resolved before any model is loaded."""

    kind: str  # t2v | i2v | t2i | ti2i | i2i
    width: int
    height: int
    latent_frames: int
    pixel_frames: int
    steps: int
    guidance: float
    shift: float
    negative: str
    template: str
    nabla: bool
    first: torch.Tensor | None = None  # (1, 3, H, W) in [-1, 1]
    last: torch.Tensor | None = None
    denoise: float | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_frames, self.height // 8, self.width // 8


def _floor_size(value: int, name: str, where: str) -> int:
    """``--width`` / ``--height`` floored to a multiple of ``SIZE_STEP`` (with a warning when it changes)."""
    if value < SIZE_STEP:
        raise UserError(f"{where}: --{name} {value} is too small (at least {SIZE_STEP})")
    floored = value // SIZE_STEP * SIZE_STEP
    if floored != value:
        logger.warning(f"{where}: --{name} {value} floored to {floored} (multiple of {SIZE_STEP})")
    return floored


def _frames(args: argparse.Namespace, task: TaskConfig, where: str) -> tuple[int, int]:
    """(latent frames, pixel frames) from --video_length / --frames / the default."""
    if task.is_image:
        for flag, v in (("--video_length", args.video_length), ("--frames", args.frames)):
            if v not in (None, 1):
                raise UserError(f"{where}: task {task.name} generates one image; drop {flag} {v}")
        return 1, 1
    if args.frames is not None:
        if args.frames < 1:
            raise UserError(f"{where}: --frames must be >= 1 (got {args.frames})")
        return args.frames, HUNYUAN_TEMPORAL_COMPRESSION * (args.frames - 1) + 1
    if args.video_length is not None:
        n = int(args.video_length)
        if n < 1:
            raise UserError(f"{where}: --video_length must be >= 1 (got {n})")
        rounded = (n - 1 + 3) // 4 * 4 + 1
        if rounded != n:
            logger.warning(f"{where}: --video_length {n} rounded up to {rounded} (the video VAE needs 4n+1 frames)")
        return (rounded - 1) // 4 + 1, rounded
    return DEFAULT_LATENT_FRAMES, HUNYUAN_TEMPORAL_COMPRESSION * (DEFAULT_LATENT_FRAMES - 1) + 1


def plan_job(job: Job) -> JobPlan:
    """Resolve sizes, frames, images and guidance of one job (errors name the job's line)."""
    a = job.args
    task: TaskConfig = a.task_config
    where = job.location
    if job.spec is not None and job.spec.frame_count is not None:
        a.frames = None  # a line's --f (pixel frames) replaces the command line's --frames
    latent_frames, pixel_frames = _frames(a, task, where)
    nabla = (task.uses_nabla or a.force_nabla_attn) and not a.force_traditional_attn
    steps, guidance, shift = int(a.steps), float(a.guidance_scale), float(a.scheduler_scale)
    if steps < 1:
        raise UserError(f"{where}: steps must be >= 1 (got {steps})")
    width = _floor_size(a.width, "width", where) if a.width is not None else None
    height = _floor_size(a.height, "height", where) if a.height is not None else None

    image, last = a.image, a.image_last
    if task.is_i2i:
        kind = "i2i"
        if not image:
            raise UserError(f"{where}: task {task.name} edits an image: give --image")
    elif task.is_image:
        kind = "ti2i" if image else "t2i"
        if image and a.ti2i_denoise_percent is None:
            raise UserError(f"{where}: an init image with {task.name} needs --ti2i_denoise_percent (0, 1]")
    else:
        kind = "i2v" if image else "t2v"
        if task.is_i2v and not image:
            raise UserError(f"{where}: task {task.name} is image-to-video: give --image")
        if image and not task.is_i2v:
            logger.warning(f"{where}: {task.name} is a text-to-video model; image conditioning works best with an i2v task")
    if last and kind != "i2v":
        raise UserError(f"{where}: --image_last is for image-to-video tasks")
    if last and latent_frames < 2:
        raise UserError(f"{where}: first+last conditioning needs at least 2 latent frames (5 pixel frames)")
    if a.ti2i_denoise_percent is not None and kind != "ti2i":
        raise UserError(f"{where}: --ti2i_denoise_percent is for an init image with a text-to-image task")
    if a.i2vi_extra_noise and kind != "i2v":
        raise UserError(f"{where}: --i2vi_extra_noise is for image-to-video")
    if a.advanced_i2vi and not image:
        raise UserError(f"{where}: --advanced_i2vi needs --image")

    first_t = last_t = None
    if image:
        target = (width, height) if width is not None and height is not None else None
        first_t, last_t, (width, height) = prepare_reference_images(
            task, image, last, target_size=target, advanced=a.advanced_i2vi, nabla=nabla, res_limit=a.i2vi_res_limit
        )
    default_side = task.resolution
    width = width if width is not None else default_side
    height = height if height is not None else default_side
    shape = (latent_frames, height // 8, width // 8)
    if nabla:
        check_nabla_geometry(shape)
    if max(shape[1], shape[2]) // 2 > 128 or latent_frames > 128:
        raise UserError(
            f"{where}: {width}x{height}, {latent_frames} latent frames exceeds the Kandinsky 5 RoPE limit (128 per axis)"
        )
    if a.output and a.output_type in ("video", "both"):
        suffix = Path(a.output).suffix.lower()
        if pixel_frames > 1 and suffix == ".png":
            raise UserError(f"--output {a.output}: the result has {pixel_frames} frames; use .mp4 or .mkv")
    negative = job.negative_prompt if job.negative_prompt is not None else default_negative_prompt(task)
    return JobPlan(
        kind=kind,
        width=width,
        height=height,
        latent_frames=latent_frames,
        pixel_frames=pixel_frames,
        steps=steps,
        guidance=guidance,
        shift=shift,
        negative=negative,
        template=template_mode_for_task(task, latent_frames),
        nabla=nabla,
        first=first_t,
        last=last_t,
        denoise=a.ti2i_denoise_percent if kind == "ti2i" else None,
    )


def validate_job(job: Job) -> None:
    """``load_jobs``/``interactive_jobs`` validation hook: build and attach the job's plan."""
    plan = plan_job(job)
    job.args.k5_plan = plan
    # Record the resolved values (metadata, logs).
    job.args.width, job.args.height = plan.width, plan.height
    job.args.negative_prompt = plan.negative
