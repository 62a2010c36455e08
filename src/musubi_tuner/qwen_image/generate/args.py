"""The command line of ``qwen_image_generate_image.py``: one parser built once from the shared groups, and every check
that needs no model (specs/qwen_image.md §9, §9.1).

The flags of musubi-tuner / blissful-tuner's generator keep their names and meanings; the blissful shared groups
(guidance, previews, batch/interactive, outputs, compile) come from ``blissful_tuner.blissful_core`` exactly once, so
``--compile`` is defined once (blissful-tuner crashed at start-up with a duplicate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blissful_tuner.blissful_core import add_blissful_generation_args, parse_blissful_args
from blissful_tuner.media_output import check_output_type
from musubi_tuner.memory.options import add_memory_args, check_memory_args
from musubi_tuner.qwen_image.configs import PIXEL_STEP, add_model_version_args, resolve_model_version
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

OUTPUT_TYPES = ("images", "latent", "latent_images")
ATTN_MODES = {"torch": "sdpa", "sdpa": "sdpa", "flash": "flash", "sageattn": "sage", "xformers": "xformers"}
AUTO_CAPTION_PROMPT = "<auto caption>"  # placeholder prompt of Layered jobs captioned from their control image
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def setup_parser() -> argparse.ArgumentParser:
    """The ``qwen_image_generate_image.py`` command line (upstream names + the shared blissful groups)."""
    p = argparse.ArgumentParser(
        description="Generate images with Qwen-Image (T2I, Edit, Edit-2509/2511, Layered)", allow_abbrev=False
    )
    m = p.add_argument_group("model")
    add_model_version_args(m)
    m.add_argument(
        "--dit", type=str, default=None, help="DiT: ComfyUI single file (qwen_image_bf16.safetensors ...) or diffusers dir"
    )
    m.add_argument("--num_layers", type=int, default=None, help="load only the first N transformer blocks")
    m.add_argument("--disable_numpy_memmap", action="store_true", help="accepted: the streaming loader never memory-maps")
    m.add_argument(
        "--vae", type=str, default=None, help="VAE: qwen_image_vae.safetensors (Layered: the RGBA VAE) or a diffusers dir"
    )
    m.add_argument("--vae_enable_tiling", action="store_true", help="tiled VAE decoding (less memory)")
    m.add_argument("--vae_dtype", type=str, default="bfloat16", choices=DTYPE_CHOICES, help="VAE dtype (bfloat16)")
    m.add_argument(
        "--text_encoder",
        type=str,
        required=True,
        help="Qwen2.5-VL-7B-Instruct: ComfyUI single file, or local HF / diffusers directory",
    )
    m.add_argument(
        "--vl_processor", type=str, default=None, help="local Qwen2.5-VL processor dir (default: next to --text_encoder)"
    )
    m.add_argument("--fp8_vl", action="store_true", help="Qwen2.5-VL with fp8 Linear weights")
    m.add_argument("--fp8", action="store_true", help="fp8 DiT weights (plain cast)")
    m.add_argument("--fp8_scaled", action="store_true", help="block-scaled fp8 DiT weights, quantised while loading")
    m.add_argument("--text_encoder_cpu", action="store_true", help="run Qwen2.5-VL on the CPU")
    m.add_argument("--device", type=str, default=None, help="device (default: cuda when available, else cpu)")
    m.add_argument(
        "--dit_dtype",
        type=str,
        default=None,
        choices=DTYPE_CHOICES,
        help="DiT dtype of non-fp8 weights (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    m.add_argument("--attn_mode", type=str, default="torch", choices=tuple(ATTN_MODES), help="attention kernel (torch = sdpa)")
    m.add_argument("--blocks_to_swap", type=int, default=0, help="transformer blocks kept on the CPU and streamed in")
    m.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host memory for block swap")
    m.add_argument("--lora_weight", type=str, nargs="*", default=None, help="LoRA files merged into the DiT while it loads")
    m.add_argument("--lora_multiplier", type=float, nargs="*", default=None, help="one multiplier per LoRA (default 1.0)")
    m.add_argument(
        "--include_patterns",
        type=str,
        nargs="*",
        default=None,
        help="per LoRA: a regex; only its modules whose name it finds apply",
    )
    m.add_argument(
        "--exclude_patterns",
        type=str,
        nargs="*",
        default=None,
        help="per LoRA: a regex; its modules whose name it finds are skipped",
    )
    m.add_argument("--save_merged_model", type=str, default=None, help="write the DiT with the LoRAs merged to this file and exit")
    m.add_argument("--lycoris", action="store_true", help="accepted: LoHa/LoKr files are recognised without the LyCORIS package")

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", type=str, default=None, help="prompt (wildcards with --prompt_wildcards)")
    g.add_argument("--negative_prompt", type=str, default=None, help='negative prompt for true CFG (default " ")')
    g.add_argument("--guidance_scale", type=float, default=4.0, help="true-CFG scale (> 1 runs the negative pass; default 4.0)")
    g.add_argument("--embedded_cfg_scale", type=float, default=None, help="no effect: Qwen-Image has no embedded guidance")
    g.add_argument("--image_size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="height width (multiples of 16)")
    g.add_argument("--infer_steps", type=int, default=25, help="sampling steps (default 25)")
    g.add_argument("--flow_shift", type=float, default=None, help="static shift instead of the release's dynamic shift")
    g.add_argument("--seed", type=str, default=None, help="integer or any text (default: random; printed)")
    g.add_argument("--control_image_path", type=str, nargs="*", default=None, help="edit control image(s); Layered: the input")
    g.add_argument("--mask_path", type=str, default=None, help="inpainting mask (white = regenerate) for the first control image")
    g.add_argument("--resize_control_to_image_size", action="store_true", help="resize control images to the output size")
    g.add_argument(
        "--resize_control_to_official_size", action="store_true", help="resize control images to the release's ~1024² area"
    )
    g.add_argument("--output_layers", type=int, default=4, help="Layered: number of output layers (default 4)")
    g.add_argument(
        "--automatic_prompt_lang_for_layered",
        type=str,
        default=None,
        choices=("en", "cn"),
        help="Layered without a prompt: caption the control image with Qwen2.5-VL in this language",
    )
    g.add_argument("--caption_max_new_tokens", type=int, default=256, help="Layered auto-caption length limit (tokens)")
    r = p.add_argument_group("reference consistency mask (edit)")
    r.add_argument("--rcm_threshold", type=float, default=None, help="enable RCM: latent-difference threshold")
    r.add_argument("--rcm_relative_threshold", action="store_true", help="threshold relative to the step's largest difference")
    r.add_argument("--rcm_kernel_size", type=int, default=3, help="Gaussian blur kernel of the difference (odd; 1 = none)")
    r.add_argument("--rcm_dilate_size", type=int, default=0, help="max-pool dilation of the changed region (latent pixels)")
    r.add_argument("--rcm_debug_save", action="store_true", help="save the per-step RCM masks as PNGs")

    o = p.add_argument_group("output")
    o.add_argument("--save_path", type=str, required=True, help="output directory (created)")
    o.add_argument("--append_original_name", action="store_true", help="append the control image's (or latent's) name")

    add_blissful_generation_args(p)
    add_memory_args(p)
    p.set_defaults(output_type="images")
    return p


def _check_files(args: argparse.Namespace) -> None:
    checks = [
        ("--dit", args.dit),
        ("--vae", args.vae),
        ("--text_encoder", args.text_encoder),
        ("--vl_processor", args.vl_processor),
    ]
    checks += [("--lora_weight", w) for w in args.lora_weight or []]
    for flag, path in checks:
        if path and not Path(path).exists():
            raise UserError(f"{path}: not found ({flag})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; every check that needs no model runs here (exit 2 on a user error)."""
    args = setup_parser().parse_args(argv)
    check_memory_args(args)
    version = resolve_model_version(args)
    args.version = version
    args.device = str(resolve_device(args.device))
    args.attn = ATTN_MODES[args.attn_mode]
    if args.dit_dtype is None:
        args.dit_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.height, args.width = args.image_size
    check_output_type(args.output_type, OUTPUT_TYPES)
    if args.embedded_cfg_scale is not None:
        logger.warning("--embedded_cfg_scale has no effect: Qwen-Image has no embedded guidance (use --guidance_scale)")
    from musubi_tuner.networks.merge import per_adapter_patterns

    for flag, pats in (("--include_patterns", args.include_patterns), ("--exclude_patterns", args.exclude_patterns)):
        if pats and not args.lora_weight:
            raise UserError(f"{flag} filters the modules of --lora_weight files, but no --lora_weight was given")
        per_adapter_patterns(len(args.lora_weight or ()), pats, flag)  # count and regex syntax, before any model loads
    if args.lycoris:
        logger.info("--lycoris: nothing to do, LoHa / LoKr files load without it (no LyCORIS package needed)")
    if args.disable_numpy_memmap:
        logger.info("--disable_numpy_memmap: nothing to do, the streaming loader never memory-maps")
    if args.fp8 and args.fp8_scaled:
        raise UserError("--fp8 and --fp8_scaled cannot be combined; give one")
    if args.blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap must be >= 0 (got {args.blocks_to_swap})")
    if args.lora_multiplier and not args.lora_weight:
        raise UserError("--lora_multiplier needs --lora_weight")
    if args.lora_weight and args.lora_multiplier and len(args.lora_multiplier) > len(args.lora_weight):
        raise UserError(f"--lora_multiplier has {len(args.lora_multiplier)} values for {len(args.lora_weight)} LoRA file(s)")
    if args.resize_control_to_image_size and args.resize_control_to_official_size:
        raise UserError("--resize_control_to_image_size and --resize_control_to_official_size cannot be combined")
    if args.output_layers < 1:
        raise UserError(f"--output_layers must be >= 1 (got {args.output_layers})")
    if args.automatic_prompt_lang_for_layered and not version.is_layered:
        raise UserError("--automatic_prompt_lang_for_layered is for --model_version layered")
    if args.infer_steps < 1:
        raise UserError(f"--infer_steps must be >= 1 (got {args.infer_steps})")
    if args.flow_shift is not None and args.flow_shift <= 0:
        raise UserError(f"--flow_shift must be > 0 (got {args.flow_shift})")
    if args.rcm_kernel_size < 1 or args.rcm_kernel_size % 2 == 0:
        raise UserError(f"--rcm_kernel_size must be odd and >= 1 (got {args.rcm_kernel_size})")
    if args.rcm_dilate_size < 0:
        raise UserError(f"--rcm_dilate_size must be >= 0 (got {args.rcm_dilate_size})")
    if args.perp_neg is not None:
        raise UserError("--perp_neg is not available for Qwen-Image (use --cfg_schedule / --cfgzerostar_scaling)")
    for name in ("width", "height"):
        if getattr(args, name) % PIXEL_STEP or getattr(args, name) < PIXEL_STEP:
            raise UserError(f"--image_size: {name} {getattr(args, name)} is not a positive multiple of {PIXEL_STEP}")
    _check_files(args)
    if args.save_merged_model:
        if not (args.dit and args.lora_weight):
            raise UserError("--save_merged_model needs --dit and --lora_weight")
        return args
    if args.decode_from_latent:
        if not args.vae:
            raise UserError("--latent_path needs --vae")
        return parse_blissful_args(args)
    missing = [flag for flag, v in (("--dit", args.dit), ("--vae", args.vae or args.output_type == "latent")) if not v]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (needed to generate)")
    if not (args.prompt or args.from_file or args.interactive):
        if version.is_layered and args.automatic_prompt_lang_for_layered:
            args.prompt = AUTO_CAPTION_PROMPT
        else:
            raise UserError("give --prompt (or --from_file / --interactive)")
    elif not args.prompt and version.is_layered and args.automatic_prompt_lang_for_layered:
        args.prompt = AUTO_CAPTION_PROMPT  # lines without a prompt of their own are captioned
    return parse_blissful_args(args)
