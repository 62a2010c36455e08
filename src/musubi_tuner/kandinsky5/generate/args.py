"""The command line of ``kandinsky5_generate_video.py``: parser, alias merging and every check that needs no model.

The aliases of specs/kandinsky5.md §12.6 are accepted (musubi-tuner and blissful-tuner spellings); two spellings of
one option with different values are an error. ``parse_args`` fills the task defaults and returns a namespace ready
for job planning (``plan.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blissful_tuner.blissful_core import (
    ATTN_FLAGS,
    add_attention_args,
    add_blissful_generation_args,
    add_blissful_k5_args,
    merge_aliases,
    parse_blissful_args,
    resolve_attention_mode,
)
from blissful_tuner.media_output import check_output_type
from musubi_tuner.kandinsky5.caching import resolve_device
from musubi_tuner.kandinsky5.configs import TaskConfig, get_task_config, task_names
from musubi_tuner.memory.options import add_memory_args, check_memory_args
from musubi_tuner.modules.fp8_optimization import check_scaled_mm_supported
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

DEFAULT_TASK = "k5-pro-t2v-5s-sd"
DTYPE_CHOICES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
OUTPUT_SUFFIXES = (".mp4", ".mkv", ".png")
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
    add_attention_args(m)
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
    add_memory_args(p)
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Normalisation and validation (before any model is loaded)


def _merge_aliases(args: argparse.Namespace) -> None:
    merge_aliases(args, ALIAS_GROUPS)


_attention_mode = resolve_attention_mode


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
    check_memory_args(args)
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
        if not args.vae and args.output_type != "latent":
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
    models = (("--dit", args.dit), ("--text_encoder_qwen", args.text_encoder_qwen), ("--text_encoder_clip", args.text_encoder_clip))
    missing = [flag for flag, value in models if not value]
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
    if args.i2vi_extra_noise < 0:
        raise UserError("--i2vi_extra_noise must be >= 0")
    if args.image_last and not args.image:
        raise UserError("--image_last needs --image (first+last conditioning)")
    nabla = (task.uses_nabla or args.force_nabla_attn) and not args.force_traditional_attn
    if args.nabla_p is not None and not nabla:
        why = "--force_traditional_attn is given" if args.force_traditional_attn else f"task {task.name} uses dense attention"
        raise UserError(f"--nabla_p has no effect: {why} (add --force_nabla_attn to use NABLA)")
    return parse_blissful_args(args)
