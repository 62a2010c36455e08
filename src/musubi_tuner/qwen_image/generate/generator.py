"""``QwenImageGenerator``: the models of one ``qwen_image_generate_image.py`` run, loaded lazily and once.

Batch order (specs/qwen_image.md §9): every job's prompt and negative are encoded first (the VL processor is loaded
for edit models and for Layered auto-captioning alike — one-off, batch and interactive go through the same
``encode``), the text encoder is freed, the DiT is loaded once (LoRAs merged while loading, then fp8), every latent
is generated, the DiT is freed, then each job is decoded and saved. Every job keeps its own batch axis from noise to
PNG, so lines of different sizes each write their own correct image.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blissful_tuner.generation_loop import Job
from blissful_tuner.guidance import GuidancePlan
from blissful_tuner.latent_preview import WAN21_RGB, LatentPreviewer, load_preview_decoder
from blissful_tuner.media_output import output_stem, save_latent, save_png, save_rgba_png, time_flag, unique_path
from blissful_tuner.metadata import prepare_metadata
from blissful_tuner.seeds import make_generator
from blissful_tuner.utils import compile_kwargs
from musubi_tuner.qwen_image.configs import LATENT_CHANNELS, ModelVersion
from musubi_tuner.qwen_image.generate.args import AUTO_CAPTION_PROMPT
from musubi_tuner.qwen_image.generate.images import ControlBlend, encode_control_images, load_mask, open_image
from musubi_tuner.qwen_image.generate.plan import controls_of
from musubi_tuner.qwen_image.pipeline import TextCond, sample_latents
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class QwenImageGenerator:
    """Holds the models of one run and implements the stages of ``generation_loop`` (encode, generate, decode+save)."""

    def __init__(self, args: argparse.Namespace, *, interactive: bool = False) -> None:
        self.args = args
        self.version: ModelVersion = args.version
        self.device = torch.device(args.device)
        self.interactive = interactive
        self.te: Any = None
        self.dit: Any = None
        self.vae: Any = None
        self.te_device = torch.device("cpu") if args.text_encoder_cpu else self.device
        self.te_dtype = torch.bfloat16 if self.te_device.type == "cuda" else torch.float32
        self.vae_dtype = parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype")

    # -- text ------------------------------------------------------------------------------------------------------

    def _text_encoder(self) -> Any:
        if self.te is None:
            from musubi_tuner.qwen_image.text_encoders import QwenVLEncoder

            a = self.args
            self.te = QwenVLEncoder(
                a.text_encoder, device=self.te_device, dtype=self.te_dtype, fp8_vl=a.fp8_vl, vl_processor=a.vl_processor
            )
        elif self.interactive:
            self.te.to(self.te_device)
        return self.te

    @property
    def needs_vl_processor(self) -> bool:
        """Edit models show images to Qwen2.5-VL; Layered auto-captioning reads the control image (seed fixes 3, 4)."""
        return self.version.is_edit or (self.version.is_layered and bool(self.args.automatic_prompt_lang_for_layered))

    def encode(self, job: Job) -> dict[str, Any]:
        """Prompt and negative embeddings (CPU); edit models see the job's control images; Layered jobs without a
        prompt are captioned from their control image first."""
        self._dit_to_cpu()
        te = self._text_encoder()
        if self.needs_vl_processor:
            te.image_processor()  # load (or fail with a clear message) before any work
        controls = controls_of(job)
        if job.prompt == AUTO_CAPTION_PROMPT:
            caption = te.caption(
                open_image(controls[0]), self.args.automatic_prompt_lang_for_layered, self.args.caption_max_new_tokens
            )
            logger.info(f"{job.location}: caption of {controls[0]}: {caption}")
            job.prompt = job.args.prompt = caption
        images = [[open_image(p) for p in controls]] if self.version.is_edit else None
        cond = te.encode([job.prompt], self.version, images=images)[0]
        uncond = te.encode([job.args.negative_prompt], self.version, images=images)[0]
        if self.interactive:
            te.to("cpu")  # interactive: the encoder waits in CPU memory
        return {"cond": cond, "uncond": uncond}

    def cache_key(self, job: Job) -> Any:
        """Jobs with equal keys share one text encoding: (prompt, negative, control images, size)."""
        a = job.args
        return (job.prompt, a.negative_prompt, tuple(controls_of(job)), (a.width, a.height))

    def free_text_encoder(self) -> None:
        self.te = None
        _free()

    # -- VAE -------------------------------------------------------------------------------------------------------

    def _get_vae(self) -> Any:
        from musubi_tuner.qwen_image.vae import QwenImageVae

        if self.vae is None:
            self.vae = QwenImageVae.load(self.args.vae, layered=self.version.is_layered, dtype=self.vae_dtype, device=self.device)
            if self.args.vae_enable_tiling:
                self.vae.enable_tiling()
        else:
            self.vae.to(self.device)
        return self.vae

    def _park_vae(self) -> None:
        if self.vae is not None and self.device.type != "cpu":
            self.vae.to("cpu")
            _free()

    # -- DiT -------------------------------------------------------------------------------------------------------

    def _load_dit(self) -> Any:
        """Load the DiT once (LoRAs merged while loading, fp8, block swap, compile)."""
        from musubi_tuner.networks.merge import build_lora_delta_hook
        from musubi_tuner.qwen_image.models.loading import load_dit, model_keys

        a = self.args
        self.free_text_encoder()
        hook = None
        if a.lora_weight:
            hook = build_lora_delta_hook(
                a.lora_weight,
                a.lora_multiplier,
                model_keys(a.dit),
                target_name=str(a.dit),
                include_patterns=a.include_patterns,
                exclude_patterns=a.exclude_patterns,
            )
        swap = a.blocks_to_swap > 0
        dit = load_dit(
            self.version,
            a.dit,
            device="cpu" if swap else self.device,
            dtype=parse_dtype(a.dit_dtype, torch.bfloat16, flag="--dit_dtype"),
            fp8_base=a.fp8,
            fp8_scaled=a.fp8_scaled,
            attn_mode=a.attn,
            lora_deltas=hook,
            num_layers=a.num_layers,
        )
        if swap:
            from musubi_tuner.modules.offloading import BlockSwapConfig

            config = BlockSwapConfig(self.device, supports_backward=False, use_pinned_memory=a.use_pinned_memory_for_block_swap)
            dit.enable_block_swap(a.blocks_to_swap, config)
            dit.move_to_device_except_swap_blocks(self.device)
            dit.switch_block_swap_for_inference()
        kw = compile_kwargs(a)
        if kw is not None:
            for block in dit.transformer_blocks:
                block.compile(**kw)
        self.dit = dit
        return dit

    def _dit_to_device(self) -> Any:
        return self.dit if self.dit is not None else self._load_dit()

    def _dit_to_cpu(self) -> None:
        """Interactive runs keep the DiT; nothing to move in batch runs (it is freed after the last job)."""

    def free_dit(self) -> None:
        if self.dit is not None and getattr(self.dit, "offloaders", None):
            self.dit.disable_block_swap()
        self.dit = None
        _free()

    # -- generation ------------------------------------------------------------------------------------------------

    def generate(self, job: Job, encoded: dict[str, Any]) -> torch.Tensor:
        """Sample one job's latent ``(1, 16, F, h, w)`` on the CPU (F = 1, Layered: layers + 1)."""
        a, version = job.args, self.version
        h, w = a.height // 8, a.width // 8
        controls_paths = controls_of(job)
        blend_needed = bool(a.mask_path) or a.rcm_threshold is not None
        controls = []
        if controls_paths:
            controls = encode_control_images(
                self._get_vae(),
                controls_paths,
                version,
                (a.width, a.height),
                to_image_size=a.resize_control_to_image_size,
                to_official=a.resize_control_to_official_size,
                first_at_output_size=blend_needed,
            )
            self._park_vae()
        dit = self._dit_to_device()
        frames = a.output_layers + 1 if version.is_layered else 1
        steps = a.infer_steps
        scale = float(a.guidance_scale)
        logger.info(f"seed {job.seed}: {version.name} {a.width}x{a.height}, {steps} steps, true CFG {scale:g}")
        generator = make_generator(job.seed, "cpu")
        noise = torch.randn((1, LATENT_CHANNELS, frames, h, w), generator=generator, dtype=torch.float32)
        gplan = GuidancePlan.from_args(a, steps, scale)
        blend = None
        if blend_needed:
            mask = load_mask(a.mask_path, (h, w)) if a.mask_path else None
            rcm = None
            if a.rcm_threshold is not None:
                rcm = {
                    "threshold": a.rcm_threshold,
                    "relative": bool(a.rcm_relative_threshold),
                    "kernel_size": a.rcm_kernel_size,
                    "dilate_size": a.rcm_dilate_size,
                }
            debug = Path(a.save_path) / f"{output_stem(job.seed)}_rcm" if a.rcm_debug_save else None
            blend = ControlBlend(controls[0], noise, mask=mask, rcm=rcm, debug_dir=debug)
        previewer = None
        if a.preview_latent_every:
            decoder = load_preview_decoder(a.preview_vae, self.device) if a.preview_vae else None
            pv = LatentPreviewer(Path(a.save_path), a.preview_latent_every, noise[0], table=WAN21_RGB, decoder=decoder)

            def previewer(i: int, x: torch.Tensor, sigma: float) -> None:
                pv(i, x[0], sigma)

        latent = sample_latents(
            dit,
            version,
            cond=TextCond.from_list([encoded["cond"]]),
            uncond=TextCond.from_list([encoded["uncond"]]),
            latent_hw=(h, w),
            frames=frames,
            controls=controls,
            num_steps=steps,
            guidance_scale=scale,
            flow_shift=a.flow_shift,
            noise=noise,
            device=self.device,
            dtype=dit.compute_dtype,
            guidance_fn=lambda i, pos, neg: gplan.combine(i, pos, neg),
            uncond_needed_fn=gplan.needs_uncond if scale > 1.0 else (lambda _i: False),
            step_callback=previewer,
            latent_blend_fn=blend,
        )
        return latent.cpu()

    # -- decode and save -------------------------------------------------------------------------------------------

    def metadata(self, job: Job, extra: dict[str, Any] | None = None) -> dict[str, str] | None:
        """The job's ``bt_*`` metadata (UTF-8 PNG text chunks and latent files; ``None`` with ``--no_metadata``)."""
        if self.args.no_metadata:
            return None
        a = job.args
        md = {
            "bt_model_version": self.version.name,
            "bt_control_images": ", ".join(Path(p).name for p in controls_of(job)) or None,
            "bt_output_layers": a.output_layers if self.version.is_layered else None,
            **(extra or {}),
        }
        return prepare_metadata(
            a, model_type="Qwen-Image", seeds=job.seed, prompt=job.prompt, negative_prompt=a.negative_prompt,
            raw_prompt=job.raw_prompt, extra=md,
        )  # fmt: skip

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, 16, F, h, w)`` → ``(B, F, C, H, W)`` in [0, 1] (C = 4 for Layered)."""
        vae = self._get_vae()
        b, _, f, h, w = latent.shape
        flat = latent.permute(0, 2, 1, 3, 4).reshape(b * f, LATENT_CHANNELS, h, w)
        pixels = vae.decode(flat)
        if self.interactive:
            self._park_vae()
        return ((pixels + 1) / 2).clamp(0, 1).reshape(b, f, *pixels.shape[1:])

    def output_names(self, job: Job) -> OutputNames:
        """The reference generator's file names for a job (``--append_original_name``: the first control image's)."""
        controls = controls_of(job)
        original = Path(controls[0]).stem if self.args.append_original_name and controls else None
        return OutputNames(time_flag(), job.seed, original)

    def decode_save(self, job: Job, latent: torch.Tensor) -> list[Path]:
        """Decode (unless only the latent is wanted) and write the job's files."""
        a = job.args
        out = Path(a.save_path)
        out.mkdir(parents=True, exist_ok=True)
        names = self.output_names(job)
        md = self.metadata(job)
        written: list[Path] = []
        if a.output_type in ("latent", "latent_images"):
            written.append(save_latent(latent, unique_path(out / names.latent()), md))
        if a.output_type in ("images", "latent_images"):
            written += self.save_images(self.decode(latent), out, names, md)
        for p in written:
            logger.info(f"saved {p}")
        return written

    def save_images(self, images: torch.Tensor, out: Path, names: OutputNames, md: dict[str, str] | None) -> list[Path]:
        """``(B, F, C, H, W)`` → PNGs; Layered: the composite frame is dropped, one RGBA PNG per layer."""
        written = []
        for b in range(images.shape[0]):
            if self.version.is_layered:
                for i, frame in enumerate(images[b, 1:]):
                    written.append(save_rgba_png(frame, unique_path(out / names.image(b, layer=i)), md))
            else:
                written.append(save_png(images[b, 0, :3], unique_path(out / names.image(b)), md))
        return written


@dataclass(frozen=True)
class OutputNames:
    """File names as the reference generator writes them (specs/qwen_image.md §9 "Files"):
    ``<time>[_layerN]_<seed>[_<original>]_<batch:03d>.png`` and ``<time>_<seed>_latent[_<original>].safetensors``."""

    time: str
    seed: int | str
    original: str | None = None

    def _orig(self) -> str:
        return f"_{self.original}" if self.original else ""

    def image(self, batch_index: int, layer: int | None = None) -> str:
        layer_part = "" if layer is None else f"_layer{layer}"
        return f"{self.time}{layer_part}_{self.seed}{self._orig()}_{batch_index:03d}.png"

    def latent(self) -> str:
        return f"{self.time}_{self.seed}_latent{self._orig()}.safetensors"


def save_merged_model(args: argparse.Namespace) -> list[Path]:
    """``--save_merged_model FILE``: stream ``--dit`` into FILE with the LoRAs merged (then exit)."""
    from musubi_tuner.networks.merge import merge_lora_files

    report = merge_lora_files(
        args.dit,
        args.lora_weight,
        args.save_merged_model,
        args.lora_multiplier,
        include_patterns=args.include_patterns,
        exclude_patterns=args.exclude_patterns,
    )
    logger.info(f"saved merged model {args.save_merged_model} ({report})")
    return [Path(args.save_merged_model)]


def decode_saved_latents(args: argparse.Namespace) -> list[Path]:
    """``--latent_path F…``: decode saved latents (their own metadata kept); ``<time>_<seed>_<latent name>_000.png``."""
    from blissful_tuner.media_output import load_latent_file

    gen = QwenImageGenerator(args)
    written: list[Path] = []
    for path in args.decode_from_latent:
        latent, md = load_latent_file(path)
        if latent.dim() == 4:
            latent = latent[None]
        if latent.dim() != 5 or latent.shape[1] != LATENT_CHANNELS:
            raise UserError(f"{path}: expected a Qwen-Image latent (B, 16, F, h, w), got {tuple(latent.shape)}")
        out = Path(args.save_path)
        out.mkdir(parents=True, exist_ok=True)
        seed = md.get("bt_seeds", "").split(",")[0].strip() or "0"
        names = OutputNames(time_flag(), seed, Path(path).stem)  # as the reference: the latent's name appended
        meta = None if args.no_metadata else {k: v for k, v in md.items() if k.startswith("bt_")}
        files = gen.save_images(gen.decode(latent.float()), out, names, meta)
        for p in files:
            logger.info(f"saved {p}")
        written += files
    return written
