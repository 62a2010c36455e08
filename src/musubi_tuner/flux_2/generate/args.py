"""The command line of ``flux_2_generate_image.py``: the musubi-tuner flags (specs/upstream_flags/flux_2_*.txt), the
Blissful generation options of docs/generation.md that apply to images, and every check that needs no model."""

from __future__ import annotations

import argparse

from blissful_tuner.blissful_core import (
    add_attention_args,
    add_blissful_generation_args,
    merge_aliases,
    parse_blissful_args,
    resolve_attention_mode,
)
from blissful_tuner.generation_loop import Job
from musubi_tuner.flux_2.cli_args import TOKENIZER_HELP
from musubi_tuner.flux_2.configs import get_model_version, model_version_names
from musubi_tuner.flux_2.pipeline import check_image_size
from musubi_tuner.memory.options import add_memory_args, check_memory_args
from musubi_tuner.modules.fp8_optimization import check_scaled_mm_supported
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.images import load_image
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

DTYPE_CHOICES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
ALIAS_GROUPS = (
    (("infer_steps", "--infer_steps"), ("steps", "--steps")),
    (("guidance_scale", "--guidance_scale"), ("guidance", "--guidance")),
    (("dit_dtype", "--dit_dtype"), ("dtype", "--dtype")),
)
IMAGE_OUTPUT_TYPES = ("images", "latent", "latent_images")


def setup_parser() -> argparse.ArgumentParser:
    """The ``flux_2_generate_image.py`` command line."""
    p = argparse.ArgumentParser(description="Generate and edit images with FLUX.2 (dev, klein 4B/9B)", allow_abbrev=False)
    m = p.add_argument_group("model")
    m.add_argument("--model_version", type=str, default="dev", choices=model_version_names(), help="FLUX.2 variant (dev)")
    m.add_argument("--dit", type=str, default=None, help="DiT: BFL flux2-*.safetensors, diffusers file or directory")
    m.add_argument("--vae", type=str, default=None, help="VAE: BFL ae.safetensors or a diffusers directory")
    m.add_argument("--text_encoder", type=str, default=None, help="Qwen3 (klein) or Mistral 3 (dev) directory or file")
    m.add_argument(
        "--fp8_text_encoder", "--fp8_m3", dest="fp8_text_encoder", action="store_true", help="fp8 text encoder (any variant)"
    )
    m.add_argument("--text_encoder_cpu", action="store_true", help="run the text encoder on the CPU")
    m.add_argument("--tokenizer", type=str, default=None, help=TOKENIZER_HELP)
    m.add_argument("--dit_dtype", type=str, default=None, choices=DTYPE_CHOICES, help="DiT compute dtype (bfloat16)")
    m.add_argument("--dtype", type=str, default=None, choices=DTYPE_CHOICES, help="alias of --dit_dtype")
    m.add_argument("--vae_dtype", type=str, default=None, choices=DTYPE_CHOICES, help="VAE dtype (bfloat16 on CUDA, else float32)")
    m.add_argument("--device", type=str, default=None, help="device (default: cuda when available, else cpu)")
    m.add_argument("--fp8", "--fp8_base", dest="fp8", action="store_true", help="fp8 DiT weights (block-scaled, = --fp8_scaled)")
    m.add_argument("--fp8_scaled", action="store_true", help="block-scaled fp8 DiT weights, quantised while loading")
    m.add_argument("--fp8_fast", action="store_true", help="fp8 matmuls with torch._scaled_mm (CUDA, capability >= 8.9)")
    m.add_argument("--blocks_to_swap", type=int, default=0, help="double-block units kept on the CPU (a single block = 1/2)")
    m.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host memory for block swap")
    m.add_argument("--offload_dit_during_sampling", action="store_true", help="park the DiT in CPU memory while the VAE runs")
    m.add_argument("--disable_numpy_memmap", action="store_true", help="accepted: the streaming loader never memory-maps")
    add_attention_args(m)
    m.add_argument("--lora_weight", type=str, nargs="*", default=None, help="LoRA files merged into the DiT while it loads")
    m.add_argument("--lora_multiplier", type=float, nargs="*", default=None, help="one multiplier per LoRA (missing: 1.0)")
    m.add_argument("--lycoris", action="store_true", help="accepted: LoHa/LoKr files are recognised without it")
    m.add_argument("--include_patterns", type=str, nargs="*", default=None, help="not supported (refused): filter LoRA modules")
    m.add_argument("--exclude_patterns", type=str, nargs="*", default=None, help="not supported (refused): filter LoRA modules")
    m.add_argument("--save_merged_model", type=str, default=None, help="not supported (refused): use merge_lora.py")

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", type=str, default=None, help="prompt (wildcards with --prompt_wildcards)")
    g.add_argument("--negative_prompt", type=str, default=None, help="negative prompt (klein base variants, true CFG)")
    g.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"), help="height width (1024 1024)")
    g.add_argument("--control_image_path", type=str, nargs="*", default=None, help="reference images (editing), any number")
    g.add_argument("--no_resize_control", action="store_true", help="encode references at their own size (floored to 16 px)")
    g.add_argument("--infer_steps", type=int, default=None, help="sampling steps (default: the variant's, 4 distilled / 50)")
    g.add_argument("--steps", type=int, default=None, help="alias of --infer_steps")
    g.add_argument("--guidance_scale", type=float, default=None, help="klein base: CFG scale (4.0); distilled: unused")
    g.add_argument("--guidance", type=float, default=None, help="alias of --guidance_scale")
    g.add_argument("--embedded_cfg_scale", type=float, default=4.0, help="dev: embedded guidance (4.0)")
    g.add_argument("--flow_shift", type=float, default=None, help="fixed schedule shift s (default: the empirical μ)")
    g.add_argument("--seed", type=str, default=None, help="integer or any text (default: random; printed)")

    o = p.add_argument_group("output")
    o.add_argument("--save_path", type=str, default=None, help="output directory (created); names <time>_<seed>.png")
    add_blissful_generation_args(p)
    add_memory_args(p)
    p.set_defaults(output_type="images")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (exit 2 on a user error, before any model is loaded)."""
    args = setup_parser().parse_args(argv)
    check_memory_args(args)
    merge_aliases(args, ALIAS_GROUPS)
    for flag, attr, why in (
        ("--include_patterns", "include_patterns", "LoRAs are merged whole"),
        ("--exclude_patterns", "exclude_patterns", "LoRAs are merged whole"),
        ("--save_merged_model", "save_merged_model", "merge with merge_lora.py --dit ... --lora_weight ..."),
    ):
        if getattr(args, attr):
            raise UserError(f"{flag} is not supported by this FLUX.2 generator ({why})")
    if args.perp_neg is not None:
        raise UserError("--perp_neg is not available for FLUX.2 (use --cfg_schedule / --cfgzerostar_scaling)")
    version = get_model_version(args.model_version)
    args.version = version
    args.device = str(resolve_device(args.device))
    args.attn = resolve_attention_mode(args)
    if args.fp8:
        args.fp8_scaled = True  # FLUX.2 uses block-scaled fp8 for the DiT (--fp8 / --fp8_base = --fp8_scaled)
    if args.fp8_fast:
        check_scaled_mm_supported(args.device)
        args.fp8_scaled = True
    if args.blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap must be >= 0 (got {args.blocks_to_swap})")
    if args.lora_multiplier and not args.lora_weight:
        raise UserError("--lora_multiplier needs --lora_weight")
    if args.lora_weight and args.lora_multiplier and len(args.lora_multiplier) > len(args.lora_weight):
        raise UserError(f"--lora_multiplier has {len(args.lora_multiplier)} values for {len(args.lora_weight)} LoRA file(s)")
    if args.output_type not in IMAGE_OUTPUT_TYPES:
        raise UserError(f"--output_type {args.output_type}: FLUX.2 writes images; use one of {', '.join(IMAGE_OUTPUT_TYPES)}")
    height, width = args.image_size or (1024, 1024)
    check_image_size(width, height)
    args.height, args.width = height, width
    if args.decode_from_latent:
        if not args.vae:
            raise UserError("--latent_path needs --vae")
        if not args.save_path:
            raise UserError("give --save_path DIR")
        return parse_blissful_args(args)
    if args.infer_steps is None:
        args.infer_steps = args.steps = version.steps
    if args.guidance_scale is None:
        args.guidance_scale = args.guidance = version.guidance
    if args.infer_steps < 1:
        raise UserError(f"--infer_steps must be >= 1 (got {args.infer_steps})")
    if args.flow_shift is not None and args.flow_shift <= 0:
        raise UserError(f"--flow_shift must be > 0 (got {args.flow_shift})")
    if not version.uses_cfg:
        unused = [f for f, v in (("--negative_prompt", args.negative_prompt), ("--cfg_schedule", args.cfg_schedule)) if v]
        if args.cfgzerostar_scaling:
            unused.append("--cfgzerostar_scaling")
        if unused:
            kind = "embedded guidance (--embedded_cfg_scale)" if version.guidance_embed else "no CFG (distilled)"
            raise UserError(f"{' / '.join(unused)}: --model_version {version.name} uses {kind}; true CFG is for klein-base-*")
    missing = [f for f, v in (("--dit", args.dit), ("--text_encoder", args.text_encoder)) if not v]
    if args.output_type != "latent" and not args.vae:
        missing.append("--vae")
    if args.control_image_path and not args.vae:
        missing.append("--vae (to encode the reference images)")
    if missing:
        raise UserError(f"missing {', '.join(missing)} (needed to generate)")
    if not args.save_path:
        raise UserError("give --save_path DIR")
    if not (args.prompt or args.from_file or args.interactive):
        raise UserError("give --prompt (or --from_file / --interactive)")
    return parse_blissful_args(args, num_steps=args.infer_steps)


def validate_job(job: Job) -> None:
    """Per-job checks before any model loads: size multiple of 16, reference images readable."""
    a = job.args
    check_image_size(int(a.width), int(a.height), flag=f"{job.location}: image size")
    for path in a.control_image_path or []:
        load_image(path, f"{job.location}: --control_image_path")
