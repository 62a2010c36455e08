"""Argument groups shared by the generate scripts, and their validation.

``add_blissful_generation_args(parser)`` adds the architecture-independent options (guidance extras, previews,
wildcards, batch/interactive modes, outputs, metadata, compile and precision switches);
``add_blissful_k5_args(parser)`` adds the Kandinsky 5 extras. Each option is defined here exactly once — a script
defines its own model options (``--task``, ``--dit``, ``--prompt``, ``--seed``, ``--save_path``, ``--fps``, step count,
guidance scale, LoRAs ...) and never repeats these. ``parse_blissful_args(args)`` validates combinations before
any model is loaded and raises ``UserError`` with a clear message.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from blissful_tuner.blissful_logger import get_logger
from blissful_tuner.media_output import CODECS, CONTAINERS, OUTPUT_TYPES, check_output_location, resolve_container
from musubi_tuner.utils.errors import UserError

logger = get_logger(__name__)

# Samplers that inject fresh noise every step: the "x_t − σ·ε" preview estimate is meaningless for them.
SDE_SAMPLERS = frozenset({"sde", "dpm++sde", "dpm++_sde", "sde-dpmsolver++", "euler_ancestral", "euler_a"})
TEXT_ENCODER_PLACEMENT = ("text_encoder_cpu", "text_encoder_auto", "quantized_qwen")
K5_SCHEDULERS = ("default", "dpm++")


def add_blissful_generation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the shared generation options (see docs/generation.md for each one)."""
    g = parser.add_argument_group("guidance (blissful)")
    g.add_argument("--cfg_schedule", type=str, default=None, help="steps that run CFG, e.g. '1-10, e~2:6.0, !1' (1-based)")
    g.add_argument("--cfg_skip_last_step", action="store_true", help="run the last step without CFG")
    g.add_argument("--cfgzerostar_scaling", action="store_true", help="CFG-Zero* projection of the unconditional prediction")
    g.add_argument("--cfgzerostar_init_steps", type=int, default=-1, help="CFG-Zero* zero-init: scale the first N steps (-1 = off)")
    g.add_argument("--cfgzerostar_multiplier", type=float, default=0.0, help="CFG-Zero* zero-init multiplier (0 = do not move)")
    g.add_argument("--perp_neg", type=float, default=None, help="perpendicular negative guidance strength (about 1.5-2)")

    p = parser.add_argument_group("previews (blissful)")
    p.add_argument("--preview_latent_every", type=int, default=None, help="write latent_preview.png/mp4 every N steps")
    p.add_argument("--preview_vae", type=str, default=None, help="tiny decoder (diffusers AutoencoderTiny directory) for previews")

    b = parser.add_argument_group("prompts, batch and interactive modes (blissful)")
    b.add_argument("--prompt_wildcards", type=str, default=None, help="directory of wildcard files for __name__ tokens")
    b.add_argument("--from_file", type=str, default=None, help="batch file: one prompt line per job (.txt, .toml or .json)")
    b.add_argument("--interactive", action="store_true", help="read prompt lines from the console")
    b.add_argument("--strict_prompts", action="store_true", help="unknown per-line options are errors instead of warnings")
    b.add_argument("--bell", action="store_true", help="ring the terminal bell after each job (interactive) or at the end")

    o = parser.add_argument_group("outputs (blissful)")
    o.add_argument("--output_type", type=str, default="video", choices=OUTPUT_TYPES, help="what to save")
    o.add_argument("--codec", type=str, default="h264", choices=tuple(CODECS), help="video codec")
    o.add_argument("--container", type=str, default="mp4", choices=CONTAINERS, help="video container")
    o.add_argument("--crf", type=int, default=None, help="h264/h265 constant rate factor (default 12)")
    o.add_argument("--video_bitrate", type=int, default=None, help="h264/h265 bitrate in bits/s instead of a CRF")
    o.add_argument(
        "--save_first_frame", action=argparse.BooleanOptionalAction, default=False, help="also save <name>_first.png for videos"
    )
    o.add_argument("--save_last_frame", action="store_true", help="also save <name>_last.png for videos")
    o.add_argument("--overwrite", action="store_true", help="replace existing files instead of choosing a free name")
    o.add_argument("--no_metadata", "--no-metadata", dest="no_metadata", action="store_true", help="do not embed metadata")
    o.add_argument(
        "--decode_from_latent",
        "--latent_path",
        dest="decode_from_latent",
        type=str,
        nargs="+",
        default=None,
        help="decode saved latent file(s) instead of generating; each output is named after its latent",
    )

    c = parser.add_argument_group("compile and precision (blissful)")
    c.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    c.add_argument("--compile_backend", type=str, default="inductor", help="torch.compile backend")
    c.add_argument(
        "--compile_mode",
        type=str,
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode",
    )
    c.add_argument(
        "--compile_dynamic",
        type=str,
        default="auto",
        choices=("auto", "true", "false"),
        help="dynamic shapes (auto = torch decides)",
    )
    c.add_argument("--compile_fullgraph", action="store_true", help="torch.compile fullgraph=True")
    c.add_argument("--tf32_mode", action="store_true", help="allow TF32 matmuls and cuDNN convolutions")
    c.add_argument("--fp16_fast", action="store_true", help="fp16 accumulation in matmuls (faster, less precise)")
    return parser


def add_blissful_k5_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Kandinsky 5 extras (sampler, attention forcing, text-encoder placement); video defaults to
    saving ``<name>_first.png``."""
    k = parser.add_argument_group("Kandinsky 5 (blissful)")
    k.add_argument("--scheduler", type=str, default="default", choices=K5_SCHEDULERS, help="Euler (default) or DPM++ multistep")
    k.add_argument("--force_traditional_attn", action="store_true", help="dense attention even where the task uses NABLA")
    k.add_argument(
        "--force_nabla_attn", "--use_nabla_attn", dest="force_nabla_attn", action="store_true", help="NABLA sparse attention"
    )
    k.add_argument(
        "--nabla_p", type=float, default=None, help="NABLA cumulative-mass threshold in (0, 1] (default: the task's P, else 0.9)"
    )
    k.add_argument("--text_encoder_cpu", action="store_true", help="run the text encoders on the CPU")
    k.add_argument("--text_encoder_auto", action="store_true", help="place Qwen2.5-VL with device_map='auto'")
    k.add_argument("--quantized_qwen", action="store_true", help="load Qwen2.5-VL in NF4 (needs bitsandbytes)")
    parser.set_defaults(save_first_frame=True)
    return parser


def _first_attr(args: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            return v
    return None


def parse_blissful_args(args: argparse.Namespace, *, num_steps: int | None = None) -> argparse.Namespace:
    """Validate the blissful options (and their combination with the script's own); returns ``args``.

    Normalises ``--container`` (ProRes → mkv) and ``--compile_dynamic`` (``auto`` → ``None``). ``num_steps`` (or the
    ``infer_steps``/``steps`` attribute) lets the CFG schedule be checked now, before any model is loaded.
    """
    if getattr(args, "from_file", None) and getattr(args, "interactive", False):
        raise UserError("--from_file and --interactive cannot be combined")
    if getattr(args, "decode_from_latent", None) and (getattr(args, "from_file", None) or getattr(args, "interactive", False)):
        raise UserError("--decode_from_latent cannot be combined with --from_file or --interactive")
    if getattr(args, "from_file", None) and not Path(args.from_file).is_file():
        raise UserError(f"--from_file: file not found: {args.from_file}")
    if getattr(args, "prompt_wildcards", None) and not Path(args.prompt_wildcards).is_dir():
        raise UserError(f"--prompt_wildcards: directory not found: {args.prompt_wildcards}")

    every = getattr(args, "preview_latent_every", None)
    if every is not None:
        if every < 1:
            raise UserError(f"--preview_latent_every must be >= 1 (got {every})")
        sampler = _first_attr(args, ("scheduler", "sample_solver"))
        if sampler is not None and str(sampler).lower() in SDE_SAMPLERS:
            raise UserError(
                f"--preview_latent_every does not work with the SDE sampler {sampler!r} (it adds fresh noise each step)"
            )
    if getattr(args, "preview_vae", None):
        if every is None:
            raise UserError("--preview_vae needs --preview_latent_every N")
        if not Path(args.preview_vae).exists():
            raise UserError(f"--preview_vae: not found: {args.preview_vae}")

    if getattr(args, "cfgzerostar_scaling", False) and getattr(args, "perp_neg", None) is not None:
        raise UserError("--cfgzerostar_scaling and --perp_neg cannot be combined")
    if getattr(args, "perp_neg", None) is not None and args.perp_neg < 0:
        raise UserError(f"--perp_neg must be >= 0 (got {args.perp_neg})")
    init_steps = getattr(args, "cfgzerostar_init_steps", -1)
    if init_steps is not None and init_steps < -1:
        raise UserError(f"--cfgzerostar_init_steps must be -1 (off) or >= 0 (got {init_steps})")
    schedule = getattr(args, "cfg_schedule", None)
    steps = num_steps if num_steps is not None else _first_attr(args, ("infer_steps", "steps", "sample_steps"))
    if schedule is not None and steps is not None:
        from blissful_tuner.guidance import parse_cfg_schedule_map

        parse_cfg_schedule_map(schedule, int(steps), 1.5)  # syntax and ranges; the scale value is irrelevant here

    placement = [n for n in TEXT_ENCODER_PLACEMENT if getattr(args, n, False)]
    if len(placement) > 1:
        raise UserError(f"{' and '.join('--' + n for n in placement)} cannot be combined (choose one text-encoder placement)")
    if getattr(args, "force_traditional_attn", False) and getattr(args, "force_nabla_attn", False):
        raise UserError("--force_traditional_attn and --force_nabla_attn cannot be combined")
    nabla_p = getattr(args, "nabla_p", None)
    if nabla_p is not None and not 0 < nabla_p <= 1:
        raise UserError(f"--nabla_p must be in (0, 1] (got {nabla_p})")

    if hasattr(args, "overwrite"):
        check_output_location(getattr(args, "save_path", None), getattr(args, "output", None), overwrite=args.overwrite)
    if hasattr(args, "codec"):
        args.container = resolve_container(args.codec, getattr(args, "container", None))
    if getattr(args, "strict_prompts", False) and not (getattr(args, "from_file", None) or getattr(args, "interactive", False)):
        raise UserError("--strict_prompts applies to prompt lines; add --from_file or --interactive, or drop it")
    output_type = getattr(args, "output_type", "video")
    if output_type not in ("video", "both"):  # no video file is written: the video options would do nothing
        for flag, attr in (("--crf", "crf"), ("--video_bitrate", "video_bitrate"), ("--save_last_frame", "save_last_frame")):
            if getattr(args, attr, None) not in (None, False):
                raise UserError(f"{flag} only affects video files; --output_type {output_type} writes none")
    if getattr(args, "crf", None) is not None and getattr(args, "video_bitrate", None) is not None:
        raise UserError("--crf and --video_bitrate cannot be combined")
    if getattr(args, "crf", None) is not None and not 0 <= args.crf <= 51:
        raise UserError(f"--crf must be in 0..51 (got {args.crf})")
    if getattr(args, "video_bitrate", None) is not None and args.video_bitrate <= 0:
        raise UserError(f"--video_bitrate must be > 0 bits/s (got {args.video_bitrate})")
    if getattr(args, "codec", None) == "prores":
        for flag, attr in (("--crf", "crf"), ("--video_bitrate", "video_bitrate")):
            if getattr(args, attr, None) is not None:
                raise UserError(f"{flag} is for h264/h265; --codec prores always writes ProRes 422 HQ")
    if hasattr(args, "compile_dynamic") and isinstance(args.compile_dynamic, str):
        args.compile_dynamic = {"auto": None, "true": True, "false": False}[args.compile_dynamic]
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Command-line pieces every generate script repeats: attention flags and alias groups

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


def add_attention_args(group: Any) -> None:
    """``--sdpa/--flash_attn/--flash3/--sage_attn/--xformers`` and ``--attn_mode`` (musubi/Blissful spellings)."""
    for dest, flag, text in (
        ("sdpa", "--sdpa", "PyTorch scaled_dot_product_attention (default)"),
        ("flash_attn", "--flash_attn", "FlashAttention 2"),
        ("flash3", "--flash3", "FlashAttention 3"),
        ("sage_attn", "--sage_attn", "SageAttention"),
        ("xformers", "--xformers", "xformers"),
    ):
        group.add_argument(flag, dest=dest, action="store_true", help=text)
    group.add_argument("--attn_mode", type=str, default=None, choices=tuple(ATTN_MODE_FLAGS), help="attention kernel")


def resolve_attention_mode(args: argparse.Namespace) -> str:
    """The attention backend from ``--attn_mode`` or the attention flags (which must not contradict each other)."""
    from musubi_tuner.modules.attention import attention_mode_from_args

    flags = [f for f in ATTN_FLAGS if getattr(args, f)]
    if args.attn_mode is not None:
        wanted = ATTN_MODE_FLAGS[args.attn_mode]
        others = [f for f in flags if f != wanted]
        if others:
            raise UserError(f"--attn_mode {args.attn_mode} and --{others[0]} name different attention kernels; give one")
        for f in ATTN_FLAGS:
            setattr(args, f, f == wanted)
    return attention_mode_from_args(args)


def merge_aliases(args: argparse.Namespace, groups: tuple[tuple[tuple[str, str], ...], ...]) -> None:
    """Give every spelling of an alias group (``((attr, flag), ...)``) the one value given; two spellings with
    different values are a ``UserError``."""
    for group in groups:
        given = [(attr, flag, getattr(args, attr)) for attr, flag in group if getattr(args, attr) is not None]
        values = {v for _, _, v in given}
        if len(values) > 1:
            shown = " and ".join(f"{flag} {v}" for _, flag, v in given)
            raise UserError(f"{shown} are the same option with different values; give one")
        value = given[0][2] if given else None
        for attr, _ in group:
            setattr(args, attr, value)
