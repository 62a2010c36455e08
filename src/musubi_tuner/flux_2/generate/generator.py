"""``Flux2Generator``: the models of one ``flux_2_generate_image.py`` run, loaded lazily and once.

Memory-aware order: encode every prompt (and negative, klein base) with the streamed text encoder, keep the
embeddings on the CPU and free the encoder; VAE-encode each job's reference images; load the DiT once (LoRAs merged
in float32 while streaming, then fp8; block swap); sample every job; free the DiT; decode and save PNGs with
metadata. The methods are the stages of ``blissful_tuner.generation_loop.run_generation``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from blissful_tuner.dit_residency import DitResidency, free_memory
from blissful_tuner.generation_loop import Job
from blissful_tuner.guidance import GuidancePlan
from blissful_tuner.latent_preview import LatentPreviewer
from blissful_tuner.media_output import decoded_latent_stem, load_latent_file, output_stem, save_generation
from blissful_tuner.metadata import prepare_metadata
from blissful_tuner.seeds import make_generator, seed_everything
from musubi_tuner.flux_2.configs import ModelVersion
from musubi_tuner.flux_2.models.keys import official_view
from musubi_tuner.flux_2.models.loading import dit_weights_path, load_dit
from musubi_tuner.flux_2.pipeline import decode_latents, encode_reference_images, sample_latents
from musubi_tuner.flux_2.text_encoders import Flux2TextEncoder
from musubi_tuner.flux_2.vae import Flux2Vae, load_flux2_vae
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

# what save_generation writes for our --output_type values (one image = a one-frame "video" → <stem>.png)
_SAVE_TYPES = {"images": "video", "latent": "latent", "latent_images": "both"}


def model_type(version: ModelVersion) -> str:
    """``bt_model_type``: ``FLUX.2 dev`` / ``FLUX.2 klein-9b`` ..."""
    return f"FLUX.2 {version.name}"


def _official_keys(path: str) -> list[str]:
    """The DiT's tensor names in the official layout (what LoRA names are matched against)."""
    reader = official_view(open_weights(dit_weights_path(path)))
    try:
        return list(reader.keys())
    finally:
        reader.close()


class Flux2Generator:
    """Holds the models of one run; implements encode / after_encode / generate / decode_save."""

    def __init__(self, args: argparse.Namespace, *, interactive: bool = False) -> None:
        self.args = args
        self.version: ModelVersion = args.version
        self.device = torch.device(args.device)
        self.interactive = interactive
        self.te: Flux2TextEncoder | None = None
        self.vae: Flux2Vae | None = None
        self.refs: dict[int, list[torch.Tensor]] = {}
        cuda = self.device.type == "cuda"
        self.vae_dtype = parse_dtype(args.vae_dtype, torch.bfloat16 if cuda else torch.float32, flag="--vae_dtype")
        self.te_dtype = torch.bfloat16 if cuda else torch.float32
        self.dit = DitResidency(args, self.device, self._load_dit)

    # -- text ------------------------------------------------------------------------------------------------------

    def _needs_negative(self, job: Job) -> bool:
        return self.version.uses_cfg and float(job.args.guidance_scale) != 1.0

    def encode(self, job: Job) -> dict[str, torch.Tensor | None]:
        """Prompt (and negative) embeddings on the CPU."""
        if self.te is None:
            device = torch.device("cpu") if self.args.text_encoder_cpu else self.device
            self.te = Flux2TextEncoder(
                self.args.text_encoder,
                self.version,
                device=device,
                dtype=self.te_dtype,
                fp8=self.args.fp8_text_encoder,
                tokenizer=self.args.tokenizer,
            )
        texts = [job.prompt] + ([job.negative_prompt or ""] if self._needs_negative(job) else [])
        out = self.te.encode(texts).cpu()
        return {"cond": out[0], "uncond": out[1] if len(texts) > 1 else None}

    def cache_key(self, job: Job) -> Any:
        return (job.prompt, job.negative_prompt if self._needs_negative(job) else None)

    def after_encode(self, jobs: list[Job]) -> None:
        """Free the text encoder, then VAE-encode every job's reference images once."""
        if self.te is not None:
            self.te.close()
            self.te = None
            free_memory()
        for job in jobs:
            self._encode_references(job)
        self._park_vae()

    # -- VAE -------------------------------------------------------------------------------------------------------

    def _get_vae(self) -> Flux2Vae:
        if self.vae is None:
            self.vae = load_flux2_vae(self.args.vae, dtype=self.vae_dtype, device=self.device)
        else:
            self.vae.to(self.device)
        return self.vae

    def _park_vae(self) -> None:
        if self.vae is not None and self.device.type != "cpu":
            self.vae.to("cpu")
            free_memory()

    def _encode_references(self, job: Job) -> None:
        paths = job.args.control_image_path or []
        if not paths or job.index in self.refs:
            return
        target = (int(job.args.width), int(job.args.height))
        self.refs[job.index] = encode_reference_images(self._get_vae(), paths, target, resize=not job.args.no_resize_control)
        logger.info(
            f"{job.location}: {len(paths)} reference image(s) encoded at {[tuple(r.shape[-2:]) for r in self.refs[job.index]]}"
        )

    # -- DiT -------------------------------------------------------------------------------------------------------

    def _load_dit(self, device: torch.device | str) -> Any:
        from musubi_tuner.networks.merge import build_lora_delta_hook

        a = self.args
        hook = None
        if a.lora_weight:
            hook = build_lora_delta_hook(a.lora_weight, a.lora_multiplier, _official_keys(a.dit), target_name=str(a.dit))
        return load_dit(
            self.version,
            a.dit,
            device=device,
            dtype=parse_dtype(a.dit_dtype, torch.bfloat16, flag="--dit_dtype"),
            fp8_scaled=a.fp8_scaled,
            fp8_fast=a.fp8_fast,
            attn_mode=a.attn,
            lora_deltas=hook,
        )

    def free_dit(self) -> None:
        self.dit.free()

    # -- sampling --------------------------------------------------------------------------------------------------

    def _previewer(self, noise: torch.Tensor) -> LatentPreviewer | None:
        a = self.args
        if not a.preview_latent_every:
            return None
        vae = self._get_vae()

        def decoder(z: torch.Tensor) -> torch.Tensor:  # (1, 128, 1, h, w) → (1, 3, H, W) in [0, 1]
            return decode_latents(vae, z[0, :, 0].to(torch.float32))[None]

        return LatentPreviewer(Path(a.save_path), a.preview_latent_every, noise[:, :, None], table=None, decoder=decoder, fps=1)

    def generate(self, job: Job, encoded: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Sample one job's normalised latent ``(128, H/16, W/16)`` on the CPU."""
        a = job.args
        if (a.control_image_path or []) and job.index not in self.refs:  # interactive: references per job
            self.dit.park()
            self._encode_references(job)
            self._park_vae()
        dit = self.dit.get()
        v = self.version
        steps = int(a.infer_steps)
        guidance = float(a.embedded_cfg_scale) if v.guidance_embed else float(a.guidance_scale)
        gplan = GuidancePlan.from_args(a, steps, float(a.guidance_scale)) if encoded["uncond"] is not None else None
        h, w = int(a.height) // 16, int(a.width) // 16
        logger.info(
            f"seed {job.seed}: {a.width}x{a.height}, {steps} steps, "
            + (f"embedded guidance {guidance:g}" if v.guidance_embed else f"CFG {guidance:g}" if gplan else "no CFG")
            + (f", {len(self.refs.get(job.index, []))} reference(s)" if job.index in self.refs else "")
        )
        seed_everything(job.seed)
        generator = make_generator(job.seed, "cpu")
        noise = torch.randn(1, dit.in_channels, h, w, generator=generator)
        mu = None if a.flow_shift is None else float(torch.log(torch.tensor(float(a.flow_shift))))
        latent = sample_latents(
            dit,
            v,
            ctx=encoded["cond"],
            ctx_neg=encoded["uncond"],
            latent_hw=(h, w),
            num_steps=steps,
            guidance=guidance,
            generator=None,
            device=self.device,
            references=self.refs.pop(job.index, ()),
            noise=noise,
            cfg_fn=gplan.combine if gplan is not None else None,
            step_callback=self._previewer(noise),
            mu=mu,
        )
        return latent

    # -- decode and save -------------------------------------------------------------------------------------------

    def metadata(self, job: Job) -> dict[str, str] | None:
        a = job.args
        if a.no_metadata:
            return None
        v = self.version
        extra: dict[str, Any] = {
            "bt_model_version": v.name,
            "bt_width": a.width,
            "bt_height": a.height,
            "bt_infer_steps": a.infer_steps,
            "bt_guidance_scale": a.guidance_scale if v.uses_cfg else None,
            "bt_embedded_cfg_scale": a.embedded_cfg_scale if v.guidance_embed else None,
            "bt_flow_shift": a.flow_shift,
            "bt_control_images": ", ".join(Path(p).name for p in a.control_image_path) if a.control_image_path else None,
        }
        neg = job.negative_prompt if self._needs_negative(job) else None
        return prepare_metadata(
            a,
            model_type=model_type(v),
            seeds=job.seed,
            prompt=job.prompt,
            negative_prompt=neg,
            raw_prompt=job.raw_prompt,
            extra=extra,
        )

    def decode_save(self, job: Job, latent: torch.Tensor) -> list[Path]:
        a = job.args
        image = None
        if a.output_type != "latent":
            self.dit.park()
            image = decode_latents(self._get_vae(), latent)[:, None]  # (3, 1, H, W)
            if self.interactive:
                self._park_vae()
        written = save_generation(
            save_path=a.save_path,
            stem=output_stem(job.seed),
            video=image,
            latent=latent,
            output_type=_SAVE_TYPES[a.output_type],
            metadata=self.metadata(job),
            overwrite=a.overwrite,
        )
        for p in written:
            logger.info(f"saved {p}")
        return written


def decode_saved_latents(args: argparse.Namespace) -> list[Path]:
    """``--latent_path F…``: decode saved latents ``(128, h, w)`` with their own metadata; PNGs named after them."""
    cuda = torch.device(args.device).type == "cuda"
    vae = load_flux2_vae(args.vae, dtype=parse_dtype(args.vae_dtype, torch.bfloat16 if cuda else torch.float32), device=args.device)
    written: list[Path] = []
    for path in args.decode_from_latent:
        latent, md = load_latent_file(path)
        if latent.dim() != 3 or latent.shape[0] != 128:
            raise UserError(f"{path}: expected a FLUX.2 latent (128, h, w), got {tuple(latent.shape)}")
        image = decode_latents(vae, latent.float())[:, None]
        metadata = None if args.no_metadata else {k: v for k, v in md.items() if k.startswith("bt_")}
        files = save_generation(
            save_path=args.save_path,
            stem=decoded_latent_stem(path),
            video=image,
            output_type="video",
            metadata=metadata,
            overwrite=args.overwrite,
        )
        written.extend(files)
        for p in files:
            logger.info(f"saved {p}")
    return written
