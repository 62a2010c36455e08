"""``K5Generator``: the models of one ``kandinsky5_generate_video.py`` run, loaded lazily and once.

Memory-aware order: encode every prompt and negative (Qwen + CLIP), keep the embeddings on the CPU and free the
encoders; encode the reference images with the VAE; load the DiT once (LoRAs merged in float32, then fp8), block
swap or move it to the device; sample every job; free the DiT; decode and save. The methods are the stages of
``blissful_tuner.generation_loop`` (encode, generate, decode+save).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from blissful_tuner.dit_residency import DitResidency, free_memory
from blissful_tuner.generation_loop import Job
from blissful_tuner.guidance import GuidancePlan
from blissful_tuner.latent_preview import FLUX1_RGB, HUNYUAN_VIDEO_RGB, LatentPreviewer, load_preview_decoder
from blissful_tuner.media_output import output_stem
from blissful_tuner.metadata import prepare_metadata
from blissful_tuner.seeds import make_generator, seed_everything
from musubi_tuner.kandinsky5.configs import TaskConfig
from musubi_tuner.kandinsky5.generate.outputs import write_outputs
from musubi_tuner.kandinsky5.generate.plan import JobPlan
from musubi_tuner.kandinsky5.models.loading import dit_weights_path, load_dit
from musubi_tuner.kandinsky5.models.nabla import build_sparse_params
from musubi_tuner.kandinsky5.pipeline import decode_latents, initial_noise, sample_latents, ti2i_step_count
from musubi_tuner.kandinsky5.vae import K5Vae, load_k5_vae
from musubi_tuner.modules.flow_dpmpp import dpmpp_sample
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)


def _to_uint8_image(t: torch.Tensor) -> torch.Tensor:
    """``(1, 3, H, W)`` in [-1, 1] → ``(3, H, W)`` uint8 (the Qwen image-edit template takes pixels)."""
    return ((t[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


_free = free_memory  # (kept name)


def _file_dtype(path: str) -> torch.dtype | None:
    """The dtype of the (never quantised) text-embedding norm in the checkpoint: the file's working dtype."""
    try:
        with open_weights(dit_weights_path(path)) as reader:
            key = "text_embeddings.norm.weight"
            return reader.get_dtype(key) if key in reader else None
    except UserError:
        return None


def _checkpoint_keys(path: str) -> list[str]:
    """The tensor names of the DiT checkpoint (what a LoRA's keys are matched against)."""
    with open_weights(dit_weights_path(path)) as reader:
        return list(reader.keys())


class K5Generator:
    """Holds the models of one run and implements the stages of ``generation_loop`` (encode, generate, decode+save)."""

    def __init__(self, args: argparse.Namespace, *, interactive: bool = False) -> None:
        self.args = args
        self.task: TaskConfig = args.task_config
        self.device = torch.device(args.device)
        self.interactive = interactive
        self.te: Any = None
        self.dit = DitResidency(args, self.device, self._load_dit)
        self.vae: K5Vae | None = None
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
        """Jobs with equal keys share one text encoding (prompt, negative, template and the I2I source image)."""
        plan: JobPlan = job.args.k5_plan
        image = (str(job.args.image), plan.width, plan.height) if plan.kind == "i2i" else None
        return (job.prompt, plan.negative, plan.template, image)

    def free_text_encoder(self) -> None:
        """Drop the text encoders (the embeddings are already on the CPU)."""
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

    def after_encode(self, jobs: list[Job]) -> None:
        """The ``run_generation`` hook after the text stage (= ``encode_all_images``)."""
        self.encode_all_images(jobs)

    # -- DiT -------------------------------------------------------------------------------------------------------

    def _load_dit(self, load_device: torch.device | str) -> Any:
        """Load the DiT (LoRAs merged while loading, then fp8) for ``DitResidency`` (block swap, compile, parking)."""
        from musubi_tuner.networks.merge import build_lora_delta_hook

        a = self.args
        dtype = parse_dtype(a.dit_dtype, None, flag="--dit_dtype") if a.dit_dtype else _file_dtype(a.dit)
        if dtype is None or dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.bfloat16
        hook = None
        if a.lora_weight:
            hook = build_lora_delta_hook(a.lora_weight, a.lora_multiplier, _checkpoint_keys(a.dit), target_name=str(a.dit))
        return load_dit(
            self.task,
            a.dit,
            device=load_device,
            dtype=dtype,
            fp8_scaled=a.fp8_scaled,
            fp8_fast=a.fp8_fast,
            attn_mode=a.attn,
            lora_deltas=hook,
        )

    def _dit_to_device(self) -> Any:
        return self.dit.get()

    def _dit_to_cpu(self) -> None:
        self.dit.park()

    def free_dit(self) -> None:
        """Drop the DiT after the last job is sampled (decoding needs the memory)."""
        self.dit.free()

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
        """The job's ``bt_*`` metadata for the saved files (``None`` with ``--no_metadata``)."""
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
