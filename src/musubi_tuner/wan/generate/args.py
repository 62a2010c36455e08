"""The command line of ``wan_generate_video.py``: musubi-tuner's and blissful-tuner's Wan flags (specs/upstream_flags/
wan_*.txt), each accepted with the same meaning or refused by name with the reason, plus the shared blissful options.
Every check that needs no model runs here."""

from __future__ import annotations

import argparse

import torch

from blissful_tuner.blissful_core import add_blissful_generation_args, parse_blissful_args
from blissful_tuner.media_output import check_output_type
from musubi_tuner.memory.options import add_memory_args, check_memory_args
from musubi_tuner.modules.attention import attention_mode_from_args
from musubi_tuner.modules.fp8_optimization import check_scaled_mm_supported
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.wan.configs import check_video_geometry, get_task_config, parse_timestep_boundary, task_names
from musubi_tuner.wan.sampling import SOLVERS

logger = get_logger(__name__)

ATTN_MODES = {
    "torch": "sdpa",
    "sdpa": "sdpa",
    "flash": "flash_attn",
    "flash2": "flash_attn",
    "flash3": "flash3",
    "sageattn": "sage_attn",
    "xformers": "xformers",
}
CFG_SKIP_MODES = ("early", "late", "middle", "early_late", "alternate", "none")
# Upstream flags refused by name: (flag attribute, message).
REFUSED: tuple[tuple[str, str], ...] = (
    ("ckpt_dir", "--ckpt_dir: name the files instead (--dit, --vae, --t5, --clip); no directory layout is guessed"),
    (
        "control_image_mask_path",
        "--control_image_mask_path: one-frame control masks are not implemented for Wan (musubi-tuner ignores them too)",
    ),
    ("include_patterns", "--include_patterns: LoRA module filters at load time are not supported; every LoRA module is applied"),
    ("exclude_patterns", "--exclude_patterns: LoRA module filters at load time are not supported; every LoRA module is applied"),
    ("save_merged_model", "--save_merged_model: use merge_lora.py (streams the merge to a file)"),
    ("lycoris", "--lycoris: LyCORIS files are loaded like any LoRA/LoHa through --lora_weight; drop --lycoris"),
    (
        "compile_args",
        "--compile_args: use --compile with --compile_backend / --compile_mode / --compile_dynamic / --compile_fullgraph",
    ),
)
UNIMPLEMENTED_SOLVERS = {
    "euler_a": "--sample_solver euler_a is not implemented (blissful-tuner accepts it without implementing it)",
}


def setup_parser() -> argparse.ArgumentParser:
    """The ``wan_generate_video.py`` command line."""
    p = argparse.ArgumentParser(description="Generate videos and images with Wan 2.1 / 2.2", allow_abbrev=False)
    m = p.add_argument_group("model")
    m.add_argument("--task", type=str, default="t2v-14B", help=f"task (default t2v-14B): {', '.join(task_names())}")
    m.add_argument("--ckpt_dir", type=str, default=None, help="refused: name the files explicitly")
    m.add_argument(
        "--dit", type=str, default=None, help="DiT (low-noise expert for A14B): official/ComfyUI .safetensors or diffusers dir"
    )
    m.add_argument("--dit_high_noise", type=str, default=None, help="Wan 2.2 A14B high-noise expert")
    m.add_argument("--force_v2_1_time_embedding", action="store_true", help="accepted; only TI2V-5B uses per-token timesteps")
    m.add_argument("--offload_inactive_dit", action="store_true", help="A14B: keep the expert not in use in CPU memory")
    m.add_argument("--lazy_loading", action="store_true", help="accepted: weights always stream in tensor by tensor")
    m.add_argument("--disable_numpy_memmap", action="store_true", help="accepted: the loader never memory-maps")
    m.add_argument("--vae", type=str, default=None, help="Wan2.1_VAE.pth / wan_2.1_vae.safetensors / diffusers dir (TI2V: 2.2 VAE)")
    m.add_argument("--vae_dtype", type=str, default=None, help="VAE dtype (default bfloat16)")
    m.add_argument(
        "--vae_cache_cpu",
        action="store_true",
        help="keep the VAE's causal feature cache in CPU memory during encode / decode (less VRAM, slower)",
    )
    m.add_argument("--t5", type=str, default=None, help="UMT5-XXL: models_t5_umt5-xxl-enc-bf16.pth or HF dir")
    m.add_argument("--t5_tokenizer", type=str, default=None, help="UMT5 tokenizer dir (default: google/umt5-xxl next to --t5)")
    m.add_argument("--clip", type=str, default=None, help="CLIP ViT-H/14 (open-clip .pth or HF dir) for Wan 2.1 I2V / FLF2V")
    m.add_argument("--lora_weight", type=str, nargs="*", default=None, help="LoRAs merged into the (low-noise) DiT on load")
    m.add_argument("--lora_multiplier", type=float, nargs="*", default=None, help="one multiplier per --lora_weight (1.0)")
    m.add_argument("--lora_weight_high_noise", type=str, nargs="*", default=None, help="A14B: LoRAs for the high-noise expert")
    m.add_argument(
        "--lora_multiplier_high_noise", type=float, nargs="*", default=None, help="multipliers of --lora_weight_high_noise"
    )
    m.add_argument("--include_patterns", type=str, nargs="*", default=None, help="refused")
    m.add_argument("--exclude_patterns", type=str, nargs="*", default=None, help="refused")
    m.add_argument("--save_merged_model", type=str, default=None, help="refused: use merge_lora.py")
    m.add_argument("--lycoris", action="store_true", help="refused (LoHa/LyCORIS files load through --lora_weight)")
    m.add_argument("--fp8", action="store_true", help="fp8 DiT weights (plain cast; pre-cast fp8_e4m3fn files need it)")
    m.add_argument("--fp8_scaled", action="store_true", help="block-scaled fp8 DiT weights")
    m.add_argument("--fp8_fast", action="store_true", help="fp8 matmuls with torch._scaled_mm (CUDA >= 8.9)")
    m.add_argument("--fp8_t5", action="store_true", help="T5 Linear weights in fp8")
    m.add_argument("--device", type=str, default=None, help="device (default: cuda when available)")
    m.add_argument("--attn_mode", type=str, default="torch", choices=tuple(ATTN_MODES), help="attention kernel")
    m.add_argument("--blocks_to_swap", type=int, default=0, help="transformer blocks kept on the CPU and streamed in")
    m.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host memory for block swap")
    m.add_argument("--compile_args", nargs=4, default=None, help="refused: use --compile*")

    g = p.add_argument_group("generation")
    g.add_argument("--sample_solver", type=str, default="unipc", choices=(*SOLVERS, *UNIMPLEMENTED_SOLVERS), help="solver (unipc)")
    g.add_argument("--prompt", type=str, default=None, help="prompt")
    g.add_argument("--negative_prompt", type=str, default=None, help="negative prompt (default: the official one)")
    g.add_argument("--video_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"), help="height width (task default)")
    g.add_argument("--video_length", type=int, default=None, help="pixel frames, 4n+1 (default 81; t2i 1)")
    g.add_argument("--fps", type=int, default=None, help="output frame rate (16; TI2V 24)")
    g.add_argument("--infer_steps", type=int, default=None, help="steps (task default)")
    g.add_argument("--seed", type=str, default=None, help="seed (int or text; random when omitted)")
    g.add_argument("--cpu_noise", action="store_true", help="draw the initial noise on the CPU (same video on any GPU)")
    g.add_argument("--timestep_boundary", type=str, default=None, help="A14B boundary: 0.875 or 875 (task default)")
    g.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (low-noise expert for A14B)")
    g.add_argument("--guidance_scale_high_noise", type=float, default=None, help="A14B: CFG scale of the high-noise expert")
    g.add_argument("--flow_shift", type=float, default=None, help="flow shift (task default)")
    g.add_argument("--video_path", type=str, default=None, help="V2V: source video (with --denoise_strength)")
    g.add_argument("--denoise_strength", type=float, default=None, help="V2V strength in (0, 1] (default 1.0 = from noise)")
    g.add_argument("--image_path", type=str, default=None, help="I2V / FLF2V / TI2V start image")
    g.add_argument("--end_image_path", type=str, default=None, help="FLF2V end image")
    g.add_argument("--control_path", type=str, default=None, help="Fun-Control control video (or image directory)")
    g.add_argument(
        "--one_frame_inference",
        type=str,
        default=None,
        help="one-frame inference (I2V tasks): e.g. target_index=9,control_index=0 (see docs/wan.md); writes one image",
    )
    g.add_argument(
        "--control_image_path", type=str, nargs="*", default=None, help="one-frame control images (default: --image_path)"
    )
    g.add_argument("--control_image_mask_path", type=str, nargs="*", default=None, help="refused (one-frame masks)")
    g.add_argument("--trim_tail_frames", type=int, default=0, help="drop this many frames from the end of the output")
    g.add_argument("--cfg_skip_mode", type=str, default="none", choices=CFG_SKIP_MODES, help="steps that skip CFG")
    g.add_argument("--cfg_apply_ratio", type=float, default=None, help="share of steps that run CFG with --cfg_skip_mode (0.5)")
    g.add_argument("--slg_layers", type=str, default=None, help="skip-layer guidance: comma-separated block indices")
    g.add_argument("--slg_scale", type=float, default=3.0, help="SLG scale (original mode)")
    g.add_argument("--slg_start", type=float, default=0.0, help="SLG start as a share of the steps")
    g.add_argument("--slg_end", type=float, default=0.3, help="SLG end as a share of the steps")
    g.add_argument("--slg_mode", type=str, default=None, choices=("original", "uncond"), help="SLG mode")
    g.add_argument(
        "--riflex_index", type=int, default=0, help="RIFLEx temporal frequency index (6 for Wan; needs --rope_func comfy)"
    )
    g.add_argument(
        "--rope_func", type=str, default="default", choices=("default", "comfy"), help="RoPE implementation (both real-valued here)"
    )
    g.add_argument(
        "--nag_scale", type=float, default=None, help="NAG (Normalized Attention Guidance) scale, e.g. 5-11 (off by default)"
    )
    g.add_argument("--nag_tau", type=float, default=3.5, help="NAG normalisation threshold τ (3.5)")
    g.add_argument("--nag_alpha", type=float, default=0.5, help="NAG blend α between the guided and the plain attention (0.5)")
    g.add_argument("--nag_prompt", type=str, default=None, help="NAG negative prompt (default: the negative prompt)")
    g.add_argument("--save_path", type=str, default=None, help="output directory")
    add_blissful_generation_args(p)
    add_memory_args(p)
    return p


def _cfg_skip_steps(mode: str, ratio: float | None, steps: int) -> list[bool] | None:
    """Per step: does CFG run (musubi-tuner's ``--cfg_skip_mode`` / ``--cfg_apply_ratio``); None = every step."""
    if mode == "none":
        return None
    r = 0.5 if ratio is None else ratio
    if not 0.0 <= r <= 1.0:
        raise UserError(f"--cfg_apply_ratio must be in [0, 1] (got {r})")
    n = round(steps * r)
    idx = range(steps)
    if mode == "early":  # skip the early steps
        return [i >= steps - n for i in idx]
    if mode == "late":
        return [i < n for i in idx]
    if mode == "middle":
        head = n // 2
        return [i < head or i >= steps - (n - head) for i in idx]
    if mode == "early_late":
        start = (steps - n) // 2
        return [start <= i < start + n for i in idx]
    return [int((i + 1) * r) > int(i * r) for i in idx]  # alternate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate (exit 2 with one message on a user error)."""
    args = setup_parser().parse_args(argv)
    check_memory_args(args)
    for attr, msg in REFUSED:
        if getattr(args, attr):
            raise UserError(msg)
    if args.sample_solver in UNIMPLEMENTED_SOLVERS:
        raise UserError(UNIMPLEMENTED_SOLVERS[args.sample_solver])
    if args.riflex_index and args.rope_func != "comfy":
        raise UserError("--riflex_index needs --rope_func comfy (as in blissful-tuner)")
    if args.nag_scale is not None and (args.nag_scale < 1.0 or args.nag_tau <= 0 or not 0.0 <= args.nag_alpha <= 1.0):
        raise UserError(
            f"NAG: need --nag_scale >= 1, --nag_tau > 0, 0 <= --nag_alpha <= 1 (got {args.nag_scale}, {args.nag_tau}, {args.nag_alpha})"
        )
    if args.riflex_index < 0:
        raise UserError(f"--riflex_index must be >= 0 (got {args.riflex_index})")
    task = get_task_config(args.task)
    args.task_config = task
    args.device = str(resolve_device(args.device))
    for flag in ("force_v2_1_time_embedding", "lazy_loading", "disable_numpy_memmap"):
        if getattr(args, flag):
            logger.info(f"--{flag}: accepted, no effect here")
    if not args.decode_from_latent:
        missing = [f for f, v in (("--dit", args.dit), ("--vae", args.vae), ("--t5", args.t5)) if not v]
        if missing:
            raise UserError(f"{', '.join(missing)} required")
        if not args.save_path:
            raise UserError("--save_path is required")
    elif not args.vae:
        raise UserError("--latent_path / --decode_from_latent needs --vae")
    if task.two_experts:
        if not args.dit_high_noise and not args.decode_from_latent:
            raise UserError(f"--task {task.name} has two experts: give --dit_high_noise (high-noise) and --dit (low-noise)")
        args.boundary = parse_timestep_boundary(args.timestep_boundary) if args.timestep_boundary is not None else task.boundary
    else:
        for flag, val in (
            ("--dit_high_noise", args.dit_high_noise),
            ("--lora_weight_high_noise", args.lora_weight_high_noise),
            ("--guidance_scale_high_noise", args.guidance_scale_high_noise),
            ("--timestep_boundary", args.timestep_boundary),
        ):
            if val:
                raise UserError(f"{flag} is for the Wan 2.2 two-expert tasks; --task {task.name} has one DiT")
        args.boundary = None
    if args.clip and not task.clip:
        raise UserError(f"--clip: task {task.name} takes no CLIP image tokens (Wan 2.1 I2V / FLF2V only)")
    if task.clip and args.image_path and not args.clip:
        raise UserError(f"--task {task.name} needs --clip (the CLIP image encoder)")
    if task.i2v and not args.image_path and not args.decode_from_latent and not args.from_file and not args.interactive:
        raise UserError(f"--task {task.name} is image-to-video: give --image_path")
    if args.end_image_path and not task.flf2v:
        raise UserError(f"--end_image_path needs --task flf2v-14B (got {task.name})")
    if args.control_path and not task.control:
        raise UserError(f"--control_path needs a Fun-Control task (-FC), not {task.name}")
    if task.control and not args.control_path and not args.decode_from_latent and not args.from_file and not args.interactive:
        raise UserError(f"--task {task.name} is Fun-Control: give --control_path (the control video)")
    if args.one_frame_inference is not None:
        from musubi_tuner.wan.one_frame import check_one_frame_task, parse_one_frame_options

        check_one_frame_task(task, "--one_frame_inference")
        parse_one_frame_options(args.one_frame_inference, "--one_frame_inference")
        if args.video_path:
            raise UserError("--video_path (V2V) cannot be combined with --one_frame_inference")
    elif args.control_image_path and not args.from_file and not args.interactive:
        raise UserError("--control_image_path needs --one_frame_inference (the control images of one-frame inference)")
    if args.denoise_strength is not None and not args.video_path:
        raise UserError("--denoise_strength needs --video_path (V2V)")
    if args.fp8_fast:
        check_scaled_mm_supported(torch.device(args.device))
        args.fp8_scaled = True
    if args.fp8_scaled:
        args.fp8 = True
    args.fp8_base = args.fp8
    args.attn = attention_mode_from_args(argparse.Namespace(**{ATTN_MODES[args.attn_mode]: True}))
    h, w = args.video_size if args.video_size else (task.resolution[1], task.resolution[0])
    args.height, args.width = h, w
    if args.video_length is None:
        args.video_length = 1 if task.image_only else task.frames
    args.infer_steps = args.infer_steps or task.steps
    args.fps = args.fps or task.fps
    args.flow_shift = args.flow_shift if args.flow_shift is not None else task.shift
    args.guidance_scale = args.guidance_scale if args.guidance_scale is not None else task.guidance
    if args.guidance_scale_high_noise is None and task.guidance_high is not None:
        args.guidance_scale_high_noise = task.guidance_high
    args.vae_dtype = args.vae_dtype or "bfloat16"
    if args.trim_tail_frames < 0:
        raise UserError(f"--trim_tail_frames must be >= 0 (got {args.trim_tail_frames})")
    if args.slg_layers is not None:
        try:
            args.slg_layer_list = [int(x) for x in args.slg_layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--slg_layers {args.slg_layers!r}: expected comma-separated block indices, e.g. 9 or 8,9") from None
        if not 0 <= args.slg_start < args.slg_end <= 1:
            raise UserError(f"--slg_start/--slg_end must satisfy 0 <= start < end <= 1 (got {args.slg_start}, {args.slg_end})")
        args.slg_mode = args.slg_mode or "original"
        if args.perp_neg is not None and args.slg_mode == "original":
            raise UserError("--perp_neg cannot be combined with --slg_mode original (use --slg_mode uncond)")
    else:
        args.slg_layer_list = None
    _cfg_skip_steps(args.cfg_skip_mode, args.cfg_apply_ratio, args.infer_steps)
    check_output_type(args.output_type)
    parse_blissful_args(args, num_steps=args.infer_steps)
    if not args.decode_from_latent:
        check_video_geometry(task, args.width, args.height, args.video_length)
    return args
