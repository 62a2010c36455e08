"""Generate videos and images with Kandinsky 5 (specs/kandinsky5.md §8, §9, §12.4–§12.6; specs/generation.md).

    python kandinsky5_generate_video.py --task k5-lite-t2v-5s-sd --dit dit.safetensors --vae hunyuan_vae/ \
        --text_encoder_qwen Qwen2.5-VL-7B-Instruct/ --text_encoder_clip clip-vit-large-patch14/ \
        --prompt "a cat in the snow" --width 768 --height 512 --video_length 121 --save_path outputs/

The command lines of musubi-tuner and blissful-tuner both work: the aliases of §12.6 are accepted (``--output`` file
or ``--save_path`` directory, ``--guidance``/``--guidance_scale``, ``--flow_shift``/``--scheduler_scale``,
``--i``/``--image``, ``--dtype``/``--dit_dtype``, ``--steps``/``--infer_steps``, ``--attn_mode``/attention flags);
two spellings of one option with different values are an error. ``--video_length`` counts pixel frames (rounded up
to 4n+1), ``--frames`` latent frames.

Memory-aware order: encode every prompt and negative (Qwen + CLIP), keep the embeddings on the CPU and free the
encoders; encode the reference images with the VAE; load the DiT once (LoRAs merged in float32, then fp8), block
swap or move it to the device; sample every job; free the DiT; decode and save. Batch files (``--from_file``) and
``--interactive`` use the shared loops of ``blissful_tuner.generation_loop``.
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blissful_tuner.blissful_core import add_blissful_generation_args, add_blissful_k5_args, parse_blissful_args
from blissful_tuner.flow_dpmpp import dpmpp_sample
from blissful_tuner.generation_loop import Job, interactive_jobs, load_jobs, run_interactive, run_jobs
from blissful_tuner.guidance import GuidancePlan
from blissful_tuner.latent_preview import FLUX1_RGB, HUNYUAN_VIDEO_RGB, LatentPreviewer, load_preview_decoder
from blissful_tuner.media_output import (
    check_output_type,
    decoded_latent_stem,
    load_latent_file,
    output_stem,
    save_generation,
    save_latent,
)
from blissful_tuner.metadata import prepare_metadata
from blissful_tuner.seeds import make_generator, seed_everything
from blissful_tuner.utils import apply_precision_flags, compile_kwargs, ring_bell
from musubi_tuner.kandinsky5.caching import resolve_device
from musubi_tuner.kandinsky5.configs import TaskConfig, get_task_config, task_names
from musubi_tuner.kandinsky5.models.loading import load_dit
from musubi_tuner.kandinsky5.models.nabla import build_sparse_params, check_nabla_geometry
from musubi_tuner.kandinsky5.pipeline import (
    decode_latents,
    default_negative_prompt,
    initial_noise,
    prepare_reference_images,
    sample_latents,
    template_mode_for_task,
    ti2i_step_count,
)
from musubi_tuner.kandinsky5.vae import HUNYUAN_TEMPORAL_COMPRESSION, K5Vae, load_k5_vae
from musubi_tuner.modules.attention import attention_mode_from_args
from musubi_tuner.modules.fp8_optimization import check_scaled_mm_supported
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

DEFAULT_TASK = "k5-pro-t2v-5s-sd"
DEFAULT_LATENT_FRAMES = 5  # musubi-tuner's default (--frames 5 = 17 pixel frames) when no length is given
SIZE_STEP = 16  # latent 2x2 patches of the x8 VAE
DTYPE_CHOICES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
OUTPUT_SUFFIXES = (".mp4", ".mkv", ".png")
# --attn_mode value → the attention flag it stands for (modules.attention validates availability).
ATTN_MODE_FLAGS = {
    "sdpa": "sdpa",
    "torch": "sdpa",
    "flash": "flash_attn",
    "flash2": "flash_attn",
    "flash3": "flash3",
    "sage": "sage_attn",
    "sageattn": "sage_attn",
    "xformers": "xformers",
}
ATTN_FLAGS = ("sdpa", "flash_attn", "flash3", "sage_attn", "xformers")
# Alias groups of §12.6: canonical attribute ← (attribute, flag) spellings. Every attribute ends up with the value.
ALIAS_GROUPS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("guidance_scale", "--guidance_scale"), ("guidance", "--guidance")),
    (("scheduler_scale", "--scheduler_scale"), ("flow_shift", "--flow_shift")),
    (("steps", "--steps"), ("infer_steps", "--infer_steps")),
    (("image", "--image"), ("i", "--i")),
    (("dit_dtype", "--dit_dtype"), ("dtype", "--dtype")),
)


def setup_parser() -> argparse.ArgumentParser:
    """The ``kandinsky5_generate_video.py`` command line (upstream + Blissful spellings, blissful extras)."""
    p = argparse.ArgumentParser(
        description="Generate videos and images with Kandinsky 5 (T2V, I2V, first+last, T2I, I2I, TI2I)", allow_abbrev=False
    )
    m = p.add_argument_group("model")
    m.add_argument("--task", type=str, default=DEFAULT_TASK, help=f"task key (default {DEFAULT_TASK}): {', '.join(task_names())}")
    m.add_argument("--dit", type=str, default=None, help="DiT: official .safetensors, shards or a diffusers transformer directory")
    m.add_argument("--vae", type=str, default=None, help="VAE: HunyuanVideo (video tasks) / FLUX.1 (image tasks) dir or file")
    m.add_argument("--text_encoder_qwen", type=str, default=None, help="Qwen2.5-VL-7B-Instruct directory or hub id")
    m.add_argument("--text_encoder_clip", type=str, default=None, help="CLIP ViT-L/14 directory or hub id")
    m.add_argument(
        "--dit_dtype", type=str, default=None, choices=DTYPE_CHOICES, help="DiT dtype of non-fp8 weights (default: file)"
    )
    m.add_argument("--dtype", type=str, default=None, choices=DTYPE_CHOICES, help="alias of --dit_dtype (musubi-tuner)")
    m.add_argument("--vae_dtype", type=str, default="bfloat16", choices=DTYPE_CHOICES, help="VAE dtype (default bfloat16)")
    m.add_argument("--device", type=str, default=None, help="device (default: cuda when available, else cpu)")
    m.add_argument("--fp8_base", action="store_true", help="fp8 DiT weights (always block-scaled for Kandinsky 5: = --fp8_scaled)")
    m.add_argument("--fp8_scaled", action="store_true", help="block-scaled fp8 DiT weights, quantised while loading")
    m.add_argument("--fp8_fast", action="store_true", help="fp8 matmuls with torch._scaled_mm (CUDA, compute capability >= 8.9)")
    m.add_argument("--blocks_to_swap", type=int, default=0, help="transformer blocks kept on the CPU and streamed in")
    m.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host memory for block swap")
    m.add_argument(
        "--offload_dit_during_sampling",
        action="store_true",
        help="keep the DiT in CPU memory while the text encoders and the VAE run (interactive mode keeps it loaded)",
    )
    m.add_argument("--disable_numpy_memmap", action="store_true", help="accepted: the streaming loader never memory-maps")
    m.add_argument("--disable_vae_workaround", action="store_true", help="accepted: the VAE always runs the exact diffusers path")
    m.add_argument("--vae_tiling", action=argparse.BooleanOptionalAction, default=True, help="tiled VAE encode/decode (default on)")
    for dest, flag, text in (
        ("sdpa", "--sdpa", "PyTorch scaled_dot_product_attention (default)"),
        ("flash_attn", "--flash_attn", "FlashAttention 2"),
        ("flash3", "--flash3", "FlashAttention 3"),
        ("sage_attn", "--sage_attn", "SageAttention"),
        ("xformers", "--xformers", "xformers"),
    ):
        m.add_argument(flag, dest=dest, action="store_true", help=text)
    m.add_argument("--attn_mode", type=str, default=None, choices=tuple(ATTN_MODE_FLAGS), help="attention kernel (Blissful)")
    m.add_argument("--lora_weight", type=str, nargs="+", default=None, help="LoRA files merged into the DiT while it loads")
    m.add_argument("--lora_multiplier", type=float, nargs="+", default=None, help="one multiplier per LoRA (missing: 1.0)")
    m.add_argument(
        "--optimized",
        action="store_true",
        help="preset: --sage_attn, --compile, --fp8_scaled (+ --fp8_fast on fp8 GPUs, else --fp16_fast for Pro), "
        "Qwen with device_map=auto unless --text_encoder_cpu",
    )

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", type=str, default=None, help="prompt (wildcards with --prompt_wildcards)")
    g.add_argument(
        "--negative_prompt", type=str, default=None, help="negative prompt (default: the official one of the task family)"
    )
    g.add_argument("--image", type=str, default=None, help="I2V first frame / I2I source / TI2I init image")
    g.add_argument("--i", type=str, default=None, help="alias of --image (musubi-tuner)")
    g.add_argument("--image_last", type=str, default=None, help="I2V last frame (first+last conditioning)")
    g.add_argument("--width", type=int, default=None, help="width in pixels (multiple of 16; default: task resolution)")
    g.add_argument("--height", type=int, default=None, help="height in pixels (multiple of 16; default: task resolution)")
    g.add_argument("--video_length", type=int, default=None, help="pixel frames, rounded up to 4n+1 (e.g. 121 = 5 s)")
    g.add_argument("--frames", type=int, default=None, help="LATENT frames (musubi-tuner); 31 = 121 pixel frames")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: task)")
    g.add_argument("--infer_steps", type=int, default=None, help="alias of --steps")
    g.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: task); 1.0 = no negative pass")
    g.add_argument("--guidance", type=float, default=None, help="alias of --guidance_scale (musubi-tuner)")
    g.add_argument("--scheduler_scale", type=float, default=None, help="time-grid shift (default: task)")
    g.add_argument("--flow_shift", type=float, default=None, help="alias of --scheduler_scale")
    g.add_argument("--seed", type=str, default=None, help="integer or any text (default: random; printed)")
    g.add_argument("--fps", type=int, default=24, help="output frame rate")
    g.add_argument(
        "--normalize_first_frame",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="I2V: renormalise the first latent frames after sampling (official; clips of 5+ latent frames)",
    )
    g.add_argument("--advanced_i2vi", action="store_true", help="resize the reference image to --width/--height instead")
    g.add_argument("--i2vi_extra_noise", type=float, default=0.0, help="noise added to the first I2V latent (about 0.05)")
    g.add_argument("--ti2i_denoise_percent", type=float, default=None, help="TI2I strength in (0, 1]: last N·p steps run")
    g.add_argument("--i2vi_res_limit", type=int, default=None, help="reference images: max area N² pixels")

    o = p.add_argument_group("output")
    o.add_argument("--save_path", type=str, default=None, help="output directory (created); names <time>_<seed>.<ext>")
    o.add_argument("--output", type=str, default=None, help="exact output file: .mp4/.mkv video (+ <stem>_first.png) or .png")

    add_blissful_generation_args(p)
    add_blissful_k5_args(p)
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Argument normalisation (before any model is loaded)


def _merge_aliases(args: argparse.Namespace) -> None:
    for group in ALIAS_GROUPS:
        given = [(attr, flag, getattr(args, attr)) for attr, flag in group if getattr(args, attr) is not None]
        values = {v for _, _, v in given}
        if len(values) > 1:
            shown = " and ".join(f"{flag} {v}" for _, flag, v in given)
            raise UserError(f"{shown} are the same option with different values; give one")
        value = given[0][2] if given else None
        for attr, _ in group:
            setattr(args, attr, value)


def _attention_mode(args: argparse.Namespace) -> str:
    flags = [f for f in ATTN_FLAGS if getattr(args, f)]
    if args.attn_mode is not None:
        wanted = ATTN_MODE_FLAGS[args.attn_mode]
        others = [f for f in flags if f != wanted]
        if others:
            raise UserError(f"--attn_mode {args.attn_mode} and --{others[0]} name different attention kernels; give one")
        for f in ATTN_FLAGS:
            setattr(args, f, f == wanted)
    return attention_mode_from_args(args)


def _apply_optimized(args: argparse.Namespace, task: TaskConfig, device: torch.device) -> None:
    """``--optimized``: sage attention, compile, scaled fp8, fp8_fast or fp16_fast, Qwen device_map=auto."""
    if args.attn_mode is None and not any(getattr(args, f) for f in ATTN_FLAGS):
        args.sage_attn = True
    args.compile = True
    args.fp8_scaled = True
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        args.fp8_fast = True
    elif task.family == "video_pro":
        args.fp16_fast = True
    if not (args.text_encoder_cpu or args.quantized_qwen):
        args.text_encoder_auto = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; every check that needs no model runs here (exit 2 on a user error)."""
    args = setup_parser().parse_args(argv)
    _merge_aliases(args)
    if args.perp_neg is not None:
        raise UserError("--perp_neg is not available for Kandinsky 5 (use --cfg_schedule / --cfgzerostar_scaling)")
    task = get_task_config(args.task)
    args.task_config = task
    args.device = str(resolve_device(args.device))
    device = torch.device(args.device)
    if args.optimized:
        _apply_optimized(args, task, device)
    args.attn = _attention_mode(args)
    if args.fp8_base:
        args.fp8_scaled = True  # Kandinsky 5: plain fp8 casts of the DiT are never used (docs/kandinsky5.md)
    if args.fp8_fast:
        check_scaled_mm_supported(device)
        args.fp8_scaled = True
    if args.blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap must be >= 0 (got {args.blocks_to_swap})")
    if args.lora_multiplier and not args.lora_weight:
        raise UserError("--lora_multiplier needs --lora_weight")
    if args.lora_weight and args.lora_multiplier and len(args.lora_multiplier) > len(args.lora_weight):
        raise UserError(f"--lora_multiplier has {len(args.lora_multiplier)} values for {len(args.lora_weight)} LoRA file(s)")
    if args.video_length is not None and args.frames is not None:
        raise UserError("--video_length (pixel frames) and --frames (latent frames) are exclusive; give one")
    if args.save_path and args.output:
        raise UserError("--save_path (directory) and --output (file) are exclusive; give one")
    check_output_type(args.output_type)
    if args.output and (args.from_file or args.interactive):
        raise UserError("--output names one file; with --from_file / --interactive use --save_path DIR")
    if args.disable_numpy_memmap:
        logger.info("--disable_numpy_memmap: nothing to do, the streaming loader never memory-maps")
    if args.disable_vae_workaround:
        logger.info("--disable_vae_workaround: nothing to do, the VAE always runs the exact diffusers path")

    if args.decode_from_latent:
        if args.output and len(args.decode_from_latent) > 1:
            raise UserError("--output names one file but several latents are decoded; use --save_path DIR")
        if not args.vae and args.output_type not in ("latent",):
            raise UserError("--decode_from_latent needs --vae")
        return parse_blissful_args(args)

    if args.steps is None:
        args.steps = args.infer_steps = task.steps
    if args.guidance_scale is None:
        args.guidance_scale = args.guidance = task.guidance
    if args.scheduler_scale is None:
        args.scheduler_scale = args.flow_shift = task.scheduler_scale
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")
    if args.scheduler_scale <= 0:
        raise UserError(f"--scheduler_scale must be > 0 (got {args.scheduler_scale})")
    missing = [f for f, v in (("--dit", args.dit), ("--text_encoder_qwen", args.text_encoder_qwen)) if not v]
    missing += [f for f, v in (("--text_encoder_clip", args.text_encoder_clip),) if not v]
    if args.output_type != "latent" and not args.vae:
        missing.append("--vae")
    if missing:
        raise UserError(f"missing {', '.join(missing)} (needed to generate)")
    if not (args.save_path or args.output):
        raise UserError("give --save_path DIR (names from time and seed) or --output FILE")
    if not (args.prompt or args.from_file or args.interactive):
        raise UserError("give --prompt (or --from_file / --interactive)")
    if args.output:
        suffix = Path(args.output).suffix.lower()
        allowed = (".safetensors",) if args.output_type == "latent" else OUTPUT_SUFFIXES
        if suffix not in allowed:
            raise UserError(f"--output {args.output}: the file must end with {' / '.join(allowed)}")
    if args.scheduler == "dpm++" and args.ti2i_denoise_percent is not None:
        raise UserError("--scheduler dpm++ cannot start part-way (--ti2i_denoise_percent); use --scheduler default")
    for name in ("i2vi_extra_noise",):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0")
    if args.image_last and not args.image:
        raise UserError("--image_last needs --image (first+last conditioning)")
    nabla = (task.uses_nabla or args.force_nabla_attn) and not args.force_traditional_attn
    if args.nabla_p is not None and not nabla:
        why = "--force_traditional_attn is given" if args.force_traditional_attn else f"task {task.name} uses dense attention"
        raise UserError(f"--nabla_p has no effect: {why} (add --force_nabla_attn to use NABLA)")
    return parse_blissful_args(args)


# ----------------------------------------------------------------------------------------------------------------------
# Per-job plan


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


def _to_uint8_image(t: torch.Tensor) -> torch.Tensor:
    return ((t[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _file_dtype(path: str) -> torch.dtype | None:
    """The dtype of the (never quantised) text-embedding norm in the checkpoint: the file's working dtype."""
    p = Path(path)
    if p.is_dir():
        p = p / "transformer" if (p / "transformer" / "config.json").is_file() else p
    try:
        with open_weights(p) as reader:
            key = "text_embeddings.norm.weight"
            return reader.get_dtype(key) if key in reader else None
    except UserError:
        return None


def _checkpoint_keys(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir() and (p / "transformer" / "config.json").is_file():
        p = p / "transformer"
    with open_weights(p) as reader:
        return list(reader.keys())


# ----------------------------------------------------------------------------------------------------------------------
# The session: models loaded lazily, once


class K5Generator:
    """Holds the models of one run and implements the stages of ``generation_loop`` (encode, generate, decode+save)."""

    def __init__(self, args: argparse.Namespace, *, interactive: bool = False) -> None:
        self.args = args
        self.task: TaskConfig = args.task_config
        self.device = torch.device(args.device)
        self.interactive = interactive
        self.te: Any = None
        self.dit: Any = None
        self.vae: K5Vae | None = None
        self.dit_on_device = False
        self.images: dict[int, dict[str, torch.Tensor]] = {}
        self.te_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae_dtype = parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype")

    # -- text ------------------------------------------------------------------------------------------------------

    def _text_encoder(self) -> Any:
        if self.te is None:
            from musubi_tuner.kandinsky5.text_encoders import Kandinsky5TextEncoder

            self.te = Kandinsky5TextEncoder.from_args(
                self.args, device=self.device, dtype=self.te_dtype, qwen_max_length=self.task.qwen_max_length
            )
        elif self.interactive and not self.args.text_encoder_cpu:
            self.te.to(self.device)
        return self.te

    def encode(self, job: Job) -> dict[str, Any]:
        """Prompt and negative embeddings (CPU), with the job's template (video / image / image_edit)."""
        plan: JobPlan = job.args.k5_plan
        if self.interactive:
            self._dit_to_cpu()
        te = self._text_encoder()
        images = None
        if plan.kind == "i2i":
            src = _to_uint8_image(plan.first)
            images = [[src], [src]]
        cond, uncond = te.encode([job.prompt, plan.negative], mode=plan.template, images=images)
        if self.interactive and not self.args.text_encoder_cpu:
            te.to("cpu")  # interactive: the encoders wait in CPU memory (specs/generation.md §8.3)
        return {"cond": cond, "uncond": uncond}

    def cache_key(self, job: Job) -> Any:
        plan: JobPlan = job.args.k5_plan
        image = (str(job.args.image), plan.width, plan.height) if plan.kind == "i2i" else None
        return (job.prompt, plan.negative, plan.template, image)

    def free_text_encoder(self) -> None:
        self.te = None
        _free()

    # -- VAE -------------------------------------------------------------------------------------------------------

    def _get_vae(self) -> K5Vae:
        if self.vae is None:
            self.vae = load_k5_vae(self.args.vae, self.task.vae, self.vae_dtype, self.device, tiling=self.args.vae_tiling)
        else:
            self.vae.to(self.device)
        return self.vae

    def _park_vae(self) -> None:
        if self.vae is not None and self.device.type != "cpu":
            self.vae.to("cpu")
            _free()

    def encode_images(self, job: Job) -> None:
        """VAE latents of the job's reference image(s) (I2V frames, I2I source, TI2I init), once per job."""
        plan: JobPlan = job.args.k5_plan
        if plan.first is None or job.index in self.images:
            return
        vae = self._get_vae()
        gen = torch.Generator(device=vae.device).manual_seed(job.seed & (2**64 - 1))
        if plan.kind == "i2v":
            z = vae.encode_image_condition(plan.first, plan.last, generator=gen)[0].cpu()  # (16, 2, h, w)
            self.images[job.index] = {"image_latents": z}
        else:
            z = vae.encode_video(plan.first[:, :, None], generator=gen)  # (1, 16, 1, h, w)
            key = "source_latents" if plan.kind == "i2i" else "init_latents"
            self.images[job.index] = {key: z[0].permute(1, 2, 3, 0).cpu()}  # (1, h, w, 16)

    def encode_all_images(self, jobs: list[Job]) -> None:
        """After the text stage: encode every job's images with one temporary VAE, then park the VAE on the CPU."""
        if self.te is not None:
            self.free_text_encoder()
        for job in jobs:
            if job.args.k5_plan.first is not None:
                try:
                    self.encode_images(job)
                except UserError as e:
                    logger.error(f"{job.location}: cannot encode the reference image: {e}")
        self._park_vae()

    # -- DiT -------------------------------------------------------------------------------------------------------

    def _load_dit(self) -> Any:
        from musubi_tuner.modules.offloading import BlockSwapConfig
        from musubi_tuner.networks.merge import build_lora_delta_hook

        a = self.args
        dtype = parse_dtype(a.dit_dtype, None, flag="--dit_dtype") if a.dit_dtype else _file_dtype(a.dit)
        if dtype is None or dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.bfloat16
        hook = None
        if a.lora_weight:
            hook = build_lora_delta_hook(a.lora_weight, a.lora_multiplier, _checkpoint_keys(a.dit), target_name=str(a.dit))
        swap = a.blocks_to_swap > 0
        load_device = "cpu" if (swap or a.offload_dit_during_sampling) else self.device
        dit = load_dit(
            self.task,
            a.dit,
            device=load_device,
            dtype=dtype,
            fp8_scaled=a.fp8_scaled,
            fp8_fast=a.fp8_fast,
            attn_mode=a.attn,
            lora_deltas=hook,
        )
        if swap:
            dit.enable_block_swap(
                a.blocks_to_swap,
                BlockSwapConfig(self.device, supports_backward=False, use_pinned_memory=a.use_pinned_memory_for_block_swap),
            )
        kw = compile_kwargs(a)
        if kw is not None:
            for blocks in dit._block_lists():
                for block in blocks:
                    block.compile(**kw)
        self.dit = dit
        self.dit_on_device = False
        return dit

    def _dit_to_device(self) -> Any:
        dit = self.dit if self.dit is not None else self._load_dit()
        if not self.dit_on_device:
            if self.args.blocks_to_swap > 0:
                if dit.offloaders is None:
                    from musubi_tuner.modules.offloading import BlockSwapConfig

                    dit.enable_block_swap(
                        self.args.blocks_to_swap,
                        BlockSwapConfig(
                            self.device, supports_backward=False, use_pinned_memory=self.args.use_pinned_memory_for_block_swap
                        ),
                    )
                dit.move_to_device_except_swap_blocks(self.device)
                dit.switch_block_swap_for_inference()
            else:
                dit.to(self.device)
            self.dit_on_device = True
        return dit

    def _dit_to_cpu(self) -> None:
        if self.dit is None or not self.dit_on_device or not self.args.offload_dit_during_sampling or self.device.type == "cpu":
            return
        if self.args.blocks_to_swap > 0:
            self.dit.disable_block_swap()
        self.dit.to("cpu")
        self.dit_on_device = False
        _free()

    def free_dit(self) -> None:
        if self.dit is not None and getattr(self.dit, "offloaders", None):
            self.dit.disable_block_swap()
        self.dit = None
        self.dit_on_device = False
        _free()

    # -- generation ------------------------------------------------------------------------------------------------

    def _output_dir(self) -> Path:
        a = self.args
        return Path(a.save_path) if a.save_path else Path(a.output).parent

    def generate(self, job: Job, encoded: dict[str, Any]) -> torch.Tensor:
        """Sample one job's latent ``(F, h, w, 16)`` (on the CPU)."""
        a, plan, task = job.args, job.args.k5_plan, self.task
        if plan.first is not None and job.index not in self.images:
            self._dit_to_cpu()
            self.encode_images(job)
            self._park_vae()
        if plan.first is not None and job.index not in self.images:
            raise UserError(f"{job.location}: the reference image could not be encoded")
        dit = self._dit_to_device()
        logger.info(
            f"seed {job.seed}: {plan.kind} {plan.width}x{plan.height}, {plan.pixel_frames} frame(s) "
            f"({plan.latent_frames} latent), {plan.steps} steps, guidance {plan.guidance:g}, shift {plan.shift:g}"
        )
        seed_everything(job.seed)
        generator = make_generator(job.seed, self.device)
        steps_run = ti2i_step_count(plan.steps, plan.denoise)
        gplan = GuidancePlan.from_args(a, steps_run, plan.guidance)
        needs_uncond = any(gplan.needs_uncond(i) for i in range(steps_run))
        logger.info(gplan.describe())
        shape = plan.latent_shape
        noise = initial_noise(shape, generator)
        previewer = None
        if a.preview_latent_every:
            decoder = load_preview_decoder(a.preview_vae, self.device) if a.preview_vae else None
            previewer = LatentPreviewer(
                self._output_dir(),
                a.preview_latent_every,
                noise,
                table=FLUX1_RGB if task.is_image else HUNYUAN_VIDEO_RGB,
                decoder=decoder,
                channels_last=True,
                fps=a.fps,
            )
        sampler_fn = None
        if a.scheduler == "dpm++":
            shift = plan.shift

            def sampler_fn(velocity_fn, x, grid, callback):  # noqa: ANN001 - the pipeline's SamplerFn
                return dpmpp_sample(velocity_fn, x, len(grid) - 1, shift, step_callback=callback)

        sparse_fn = None
        if plan.nabla:

            def sparse_fn(latent_shape):  # noqa: ANN001
                return build_sparse_params(
                    task, latent_shape, force_nabla=True, nabla_p=a.nabla_p, device=self.device, patch_size=dit.patch_size
                )

        imgs = self.images.get(job.index, {})
        latent = sample_latents(
            dit,
            task,
            cond=encoded["cond"],
            uncond=encoded["uncond"] if needs_uncond else None,
            latent_shape=shape,
            num_steps=plan.steps,
            guidance_scale=plan.guidance,
            scheduler_scale=plan.shift,
            generator=generator,
            device=self.device,
            dtype=dit.compute_dtype,
            image_latents=imgs.get("image_latents"),
            i2v_mode="first_last" if plan.last is not None else "first",
            sparse_params_fn=sparse_fn,
            guidance_fn=gplan.combine,
            uncond_needed_fn=gplan.needs_uncond,
            step_callback=previewer,
            noise=noise,
            image_extra_noise=a.i2vi_extra_noise,
            normalize_first=a.normalize_first_frame,
            source_latents=imgs.get("source_latents"),
            init_latents=imgs.get("init_latents"),
            denoise_strength=plan.denoise,
            sampler_fn=sampler_fn,
        )
        self.images.pop(job.index, None)
        return latent.cpu()

    # -- decode and save -------------------------------------------------------------------------------------------

    def metadata(self, job: Job) -> dict[str, str] | None:
        if self.args.no_metadata:
            return None
        a, plan = job.args, job.args.k5_plan
        extra: dict[str, Any] = {
            "bt_task": self.task.name,
            "bt_width": plan.width,
            "bt_height": plan.height,
            "bt_video_length": plan.pixel_frames,
            "bt_latent_frames": plan.latent_frames,
            "bt_infer_steps": plan.steps,
            "bt_guidance_scale": plan.guidance,
            "bt_flow_shift": plan.shift,
            "bt_scheduler": a.scheduler,
            "bt_image": Path(a.image).name if a.image else None,
            "bt_image_last": Path(a.image_last).name if a.image_last else None,
            "bt_ti2i_denoise_percent": plan.denoise,
            "bt_i2vi_extra_noise": a.i2vi_extra_noise or None,
            "bt_nabla": "true" if plan.nabla else None,
        }
        return prepare_metadata(
            a,
            model_type=model_type(self.task),
            seeds=job.seed,
            prompt=job.prompt,
            negative_prompt=plan.negative,
            raw_prompt=job.raw_prompt,
            extra=extra,
        )

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent → ``(3, F, H, W)`` in [0, 1] with the task's VAE (the DiT is parked first when offloading)."""
        self._dit_to_cpu()
        video = decode_latents(self._get_vae(), latent)
        if self.interactive:
            self._park_vae()
        return video

    def decode_save(self, job: Job, latent: torch.Tensor) -> list[Path]:
        """Decode (unless only the latent is wanted) and write the job's files."""
        a = job.args
        md = self.metadata(job)
        video = None if a.output_type == "latent" else self.decode(latent)
        written = write_outputs(a, latent, video, md, stem=output_stem(job.seed), fps=a.fps)
        for p in written:
            logger.info(f"saved {p}")
        return written


def model_type(task: TaskConfig) -> str:
    """``bt_model_type``: ``Kandinsky 5 Pro`` / ``Kandinsky 5 Lite``."""
    return "Kandinsky 5 Pro" if task.family == "video_pro" else "Kandinsky 5 Lite"


def write_outputs(
    a: argparse.Namespace,
    latent: torch.Tensor,
    video: torch.Tensor | None,
    metadata: dict[str, str] | None,
    *,
    stem: str,
    fps: float,
) -> list[Path]:
    """Save to ``--save_path DIR`` (``<stem>.<ext>``, never overwriting unless ``--overwrite``) or to ``--output FILE``
    (exactly that file; ``<stem>_first.png`` / ``_last.png`` / ``_latent.safetensors`` beside it)."""
    common = dict(
        codec=a.codec,
        fps=fps,
        metadata=metadata,
        save_first_frame=a.save_first_frame,
        save_last_frame=a.save_last_frame,
        crf=a.crf,
        bitrate=a.video_bitrate,
    )
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if a.output_type == "latent":
            return [save_latent(latent, out, metadata)]
        container = out.suffix.lower().lstrip(".") if out.suffix.lower() in (".mp4", ".mkv") else a.container
        if video is not None and video.shape[1] == 1 and out.suffix.lower() != ".png":
            logger.warning(f"--output {out}: a single frame is saved as {out.with_suffix('.png').name}")
        return save_generation(
            save_path=out.parent,
            stem=out.stem,
            video=video,
            latent=latent,
            output_type=a.output_type,
            container=container,
            overwrite=True,
            **common,
        )
    return save_generation(
        save_path=a.save_path,
        stem=stem,
        video=video,
        latent=latent,
        output_type=a.output_type,
        container=a.container,
        overwrite=a.overwrite,
        **common,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Modes


def decode_saved_latents(args: argparse.Namespace) -> list[Path]:
    """``--decode_from_latent F…``: decode each saved latent with its own metadata; outputs named after the latent."""
    written: list[Path] = []
    vaes: dict[str, K5Vae] = {}
    device = torch.device(args.device)
    vae_dtype = parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype")
    for path in args.decode_from_latent:
        latent, md = load_latent_file(path)
        if latent.dim() == 5 and latent.shape[0] == 1:
            latent = latent[0]
        if latent.dim() != 4 or latent.shape[-1] != 16:
            raise UserError(f"{path}: expected a Kandinsky 5 latent (F, h, w, 16), got {tuple(latent.shape)}")
        task = get_task_config(md.get("bt_task", args.task))
        if task.vae not in vaes:
            vaes[task.vae] = load_k5_vae(args.vae, task.vae, vae_dtype, device, tiling=args.vae_tiling)
        video = decode_latents(vaes[task.vae], latent.float())
        fps = float(md["bt_fps"]) if "bt_fps" in md else float(args.fps)
        metadata = None if args.no_metadata else {k: v for k, v in md.items() if k.startswith("bt_")}
        decode_args = argparse.Namespace(**vars(args))
        decode_args.output_type = "images" if args.output_type in ("images", "latent_images") else "video"
        if not args.output:
            decode_args.save_path = args.save_path or str(Path(path).parent)
        files = write_outputs(decode_args, latent, video, metadata, stem=decoded_latent_stem(path), fps=fps)
        for p in files:
            logger.info(f"saved {p}")
        written.extend(files)
    return written


def run(args: argparse.Namespace, *, read_line: Callable[[str], str] | None = None) -> list[Path]:
    """Run a parsed command line (single job, ``--from_file`` batch or ``--interactive``); returns the files written.

    ``read_line`` replaces the console input of ``--interactive`` (raise ``EOFError`` to end the session).
    """
    apply_precision_flags(args)
    if args.decode_from_latent:
        return decode_saved_latents(args)
    if args.interactive:
        gen = K5Generator(args, interactive=True)
        jobs = interactive_jobs(args, read_line, validate=validate_job)
        results = run_interactive(jobs, gen.encode, gen.generate, gen.decode_save, cache_key=gen.cache_key, bell=args.bell)
        return [p for r in results for p in r.outputs]

    jobs = load_jobs(args, validate=validate_job)
    gen = K5Generator(args)
    if not args.from_file:
        job = jobs[0]
        encoded = gen.encode(job)
        gen.encode_all_images(jobs)
        latent = gen.generate(job, encoded)
        gen.free_dit()
        files = gen.decode_save(job, latent)
        if args.bell:
            ring_bell()
        return files

    results = run_jobs(
        jobs,
        gen.encode,
        gen.generate,
        gen.decode_save,
        cache_key=gen.cache_key,
        after_encode=lambda: gen.encode_all_images(jobs),
        after_generate=gen.free_dit,
        bell=args.bell,
    )
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "\n  ".join(f"{r.job.location}: {r.error}" for r in failed)
        raise UserError(f"{len(failed)} of {len(results)} job(s) failed:\n  {lines}")
    return [p for r in results for p in r.outputs]


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``kandinsky5_generate_video.py``."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
