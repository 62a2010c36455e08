"""The Kandinsky 5 hooks of the common trainer (``NetworkTrainer``): task checks, DiT/VAE loading, the DiT input of a
step, the loss, metadata and sampling during training (specs/kandinsky5.md §9–§12.3, specs/training.md).

``kandinsky5_train_network.py`` builds the command line and imports this module only after parsing, so ``--help`` and
option errors do not pay for importing torch and the model code.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.hv_train_network import DiTOutput, NetworkTrainer
from musubi_tuner.kandinsky5.conditioning import loss_frame_weight_list
from musubi_tuner.kandinsky5.configs import TaskConfig, get_task_config, task_names
from musubi_tuner.kandinsky5.training import (
    NablaSettings,
    build_training_dit_inputs,
    channels_first,
    check_nabla_latent_sizes,
    frame_weighted_mse,
    parse_override_dit,
    resolve_nabla_settings,
)
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

ARCH = "k5"
ARCH_FULL = "kandinsky5"
TEXT_ENCODER_PLACEMENT = ("text_encoder_cpu", "text_encoder_auto", "quantized_qwen")


class Kandinsky5NetworkTrainer(NetworkTrainer):
    """The Kandinsky 5 hooks of ``NetworkTrainer``."""

    def __init__(self) -> None:
        super().__init__()
        self.task: TaskConfig | None = None
        self.nabla: NablaSettings | None = None
        self.i2v_mode = "none"
        self.default_vae_dtype = torch.bfloat16
        self._vae: Any = None  # loaded early when sample prompts have I2V images
        self._sample_tag: str = ""

    # -- names -------------------------------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return ARCH

    @property
    def architecture_full_name(self) -> str:
        return ARCH_FULL

    # -- arguments -------------------------------------------------------------------------------------------------

    def handle_model_specific_args(self, args: argparse.Namespace) -> None:
        if not args.task:
            raise UserError(f"--task is required ({', '.join(task_names())})")
        task = get_task_config(args.task)
        self.task = task
        self._i2v_training = task.is_i2v
        self._control_training = task.is_i2i
        self.default_guidance_scale = task.guidance
        if args.scheduler_scale is not None and args.scheduler_scale <= 0:
            raise UserError(f"--scheduler_scale must be > 0 (got {args.scheduler_scale})")
        self.default_discrete_flow_shift = args.scheduler_scale if args.scheduler_scale is not None else task.scheduler_scale
        self.vae_frame_stride = 1 if task.is_image else 4
        self.default_vae_dtype = torch.bfloat16
        if args.i2v_mode is not None and not task.is_i2v:
            raise UserError(f"--i2v_mode is for image-to-video tasks; --task {task.name} is not one")
        if args.loss_on_conditioned_frames and not task.is_i2v:
            raise UserError(
                f"--loss_on_conditioned_frames is for image-to-video tasks; --task {task.name} has no conditioned frames"
            )
        self.i2v_mode = (args.i2v_mode or "first") if task.is_i2v else "none"
        self.nabla = resolve_nabla_settings(
            task,
            force=args.force_nabla_attention,
            dense=args.dense_attention,
            P=args.nabla_P,
            wT=args.nabla_wT,
            wH=args.nabla_wH,
            wW=args.nabla_wW,
            method=args.nabla_method,
            add_sta=args.nabla_add_sta,
        )
        self.resolution_step = 128 if self.nabla is not None else 16
        logger.info(f"task {task.name}: attention {self.nabla.describe() if self.nabla else 'dense'}")
        if args.split_attn:
            raise UserError("--split_attn is not supported for Kandinsky 5 (text keys are masked per sample instead)")
        if args.fp8_base and not args.fp8_scaled:
            logger.info("--fp8_base: Kandinsky 5 always uses block-scaled fp8 (--fp8_scaled)")
            args.fp8_scaled = True
        self._override_dit = parse_override_dit(args.override_dit)
        placement = [f"--{n}" for n in TEXT_ENCODER_PLACEMENT if getattr(args, n)]
        if len(placement) > 1:
            raise UserError(f"{' and '.join(placement)} cannot be combined (choose one text-encoder placement)")
        if args.guidance_scale != 1.0:
            logger.warning(
                "--guidance_scale is embedded guidance of other architectures; Kandinsky 5 has none (sample CFG: --l in the prompt file)"
            )
        if args.sample_prompts:
            missing = [
                f
                for f, v in (("--text_encoder_qwen", args.text_encoder_qwen), ("--text_encoder_clip", args.text_encoder_clip))
                if not v
            ]
            if missing:
                raise UserError(f"--sample_prompts needs {' and '.join(missing)} (sample prompts are encoded once at start)")
            if not args.vae and not args.no_vae_load:
                raise UserError("--sample_prompts needs --vae to decode the samples (or --no_vae_load to save sample latents)")
        elif args.no_vae_load or args.offload_dit_during_sampling:
            flag = "--no_vae_load" if args.no_vae_load else "--offload_dit_during_sampling"
            raise UserError(f"{flag} only affects sampling during training; add --sample_prompts or drop it")

    # -- datasets: NABLA needs 128-aligned latents; fail before any model is loaded -----------------------------

    def on_datasets_loaded(self, args: argparse.Namespace, train_group: Any, val_group: Any | None) -> None:
        if self.nabla is None:
            return
        for group in (train_group, val_group):
            if group is None:
                continue
            for ds in group.datasets:
                sizes = [item.latent_shape[-2:] for item in ds.items if item.latent_shape is not None]
                check_nabla_latent_sizes(sizes, f"{args.dataset_config} ({ds.cache_directory})")

    # -- models ----------------------------------------------------------------------------------------------------

    def load_transformer(self, accelerator, args, dit_path, attn_mode, split_attn, loading_device, dit_weight_dtype):
        from musubi_tuner.kandinsky5.models.loading import load_dit

        assert self.task is not None
        if self._override_dit:
            logger.info(f"--override_dit: {self._override_dit}")
        compute = parse_dtype(args.dit_dtype, torch.bfloat16, flag="--dit_dtype")
        return load_dit(
            self.task,
            dit_path,
            device=loading_device,
            dtype=compute,
            fp8_base=bool(args.fp8_base),
            fp8_scaled=bool(args.fp8_scaled),
            attn_mode=attn_mode,
            overrides=self._override_dit,
        )

    def load_vae(self, args: argparse.Namespace, vae_dtype: torch.dtype, vae_path: str | None) -> Any:
        if args.no_vae_load:
            self._vae = None
            return None
        if self._vae is None:
            self._vae = self._load_k5_vae(args, vae_dtype)
        return self._vae

    def _load_k5_vae(self, args: argparse.Namespace, vae_dtype: torch.dtype | None = None) -> Any:
        from musubi_tuner.kandinsky5.vae import load_k5_vae

        assert self.task is not None
        if not args.vae:
            raise UserError("--vae is needed to encode the sample images (--i / --ei / --ci in --sample_prompts)")
        dtype = vae_dtype or parse_dtype(args.vae_dtype, self.default_vae_dtype, flag="--vae_dtype")
        return load_k5_vae(args.vae, kind=self.task.vae, dtype=dtype, device="cpu", tiling=torch.cuda.is_available())

    # -- the step ----------------------------------------------------------------------------------------------------

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype):
        assert self.task is not None
        visual_cond = getattr(transformer, "in_channels", self.task.in_visual_channels) > latents.shape[1]
        inputs = build_training_dit_inputs(
            self.task,
            noisy_model_input,
            batch,
            timesteps,
            visual_cond=visual_cond,
            i2v_mode=self.i2v_mode,  # type: ignore[arg-type]
            nabla=self.nabla,
            device=accelerator.device,
        )
        pred = channels_first(inputs.call(transformer))
        target = noise - latents
        frames = latents.shape[2]
        weights = loss_frame_weight_list(frames, inputs.indices, exclude_conditioned=not args.loss_on_conditioned_frames)
        return DiTOutput(pred=pred, target=target, extra={"frame_weights": weights})

    def compute_loss(self, args, output: DiTOutput, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Weighted MSE over the frames that count (I2V: conditioned frames excluded unless asked)."""
        assert self.timestep_sampler is not None
        return frame_weighted_mse(
            output.pred, output.target, self.timestep_sampler.loss_weight(t), output.extra.get("frame_weights")
        )

    def extra_metadata(self, args: argparse.Namespace) -> dict[str, str]:
        assert self.task is not None
        md = {"ss_k5_task": self.task.name, "ss_k5_attention": self.nabla.describe() if self.nabla else "dense"}
        if self.task.is_i2v:
            md["ss_k5_i2v_mode"] = self.i2v_mode
            md["ss_k5_loss_on_conditioned_frames"] = str(bool(args.loss_on_conditioned_frames))
        return md

    # -- sampling during training ----------------------------------------------------------------------------------

    def process_sample_prompts(self, args: argparse.Namespace, accelerator: Any, sample_prompts: str) -> list[dict[str, Any]]:
        """Parse the prompt file and encode every prompt and negative once (then free the text encoders).

        I2V first/last images (``--i``/``--ei``) and the I2I source image (``--ci``) are VAE-encoded once too, at the
        sample's size (the image is scaled to cover it and centre-cropped).
        """
        from musubi_tuner.kandinsky5.pipeline import default_negative_prompt, template_mode_for_task
        from musubi_tuner.kandinsky5.sampling import needs_uncond
        from musubi_tuner.kandinsky5.text_encoders import Kandinsky5TextEncoder
        from musubi_tuner.kandinsky5.vae import latent_frame_count
        from musubi_tuner.training.sampling import load_sample_prompts

        task = self.task
        assert task is not None
        prompts = load_sample_prompts(sample_prompts)
        base = Path(sample_prompts).parent
        jobs: dict[str, set[str]] = {}  # batched per template
        edit_jobs: set[tuple[str, str, int, int]] = set()  # image_edit: (text, source image, W, H), one at a time
        for p in prompts:
            self._check_sample_prompt(p, _where(p, sample_prompts))
            if task.is_image:
                p["frame_count"] = 1
            resolved = self._resolve(p)
            latent_frames = 1 if task.is_image else latent_frame_count(resolved["frame_count"])
            mode = template_mode_for_task(task, latent_frames)
            p["k5_cfg"] = resolved["cfg_scale"] if resolved.get("cfg_scale") is not None else resolved["guidance_scale"]
            negative = p.get("negative_prompt")
            p["k5_negative"] = negative if negative is not None else default_negative_prompt(task)
            texts = [p.get("prompt") or ""] + ([p["k5_negative"]] if needs_uncond(p["k5_cfg"]) else [])
            if mode == "image_edit":
                src = str(_rel(p["control_image_path"][0], base))
                p["k5_key"] = (mode, src, resolved["width"], resolved["height"])
                edit_jobs.update((t, src, resolved["width"], resolved["height"]) for t in texts)
            else:
                p["k5_key"] = (mode,)
                jobs.setdefault(mode, set()).update(texts)

        encoder = Kandinsky5TextEncoder.from_args(
            args, device=accelerator.device, dtype=torch.bfloat16, qwen_max_length=task.qwen_max_length
        )
        encoded: dict[tuple, dict[str, torch.Tensor]] = {}
        try:
            for mode, texts in jobs.items():
                ordered = sorted(texts)
                for text, item in zip(ordered, encoder.encode(ordered, mode)):
                    encoded[((mode,), text)] = item
            for text, src, w, h in sorted(edit_jobs):
                image = _sample_image(src, (w, h), "--ci")
                encoded[(("image_edit", src, w, h), text)] = encoder.encode([text], "image_edit", images=[[image]])[0]
        finally:
            del encoder
            _free_memory()
        logger.info(f"encoded {len(encoded)} sample prompts / negatives once; text encoders freed")
        for p in prompts:
            key = p.pop("k5_key")
            p["k5_cond"] = encoded[(key, p.get("prompt") or "")]
            p["k5_uncond"] = encoded[(key, p["k5_negative"])] if needs_uncond(p["k5_cfg"]) else None
        self._encode_sample_images(args, accelerator, prompts, base)
        return prompts

    def _check_sample_prompt(self, p: dict[str, Any], where: str) -> None:
        task = self.task
        assert task is not None
        for key, flag in (("control_video_path", "--cn"), ("mask_path", "--m")):
            if p.get(key):
                raise UserError(f"{where}: {flag} is not supported for Kandinsky 5 samples")
        if (p.get("image_path") or p.get("end_image_path")) and not task.is_i2v:
            raise UserError(f"{where}: --i/--ei (I2V images) need an image-to-video task; --task {task.name} is not one")
        if p.get("end_image_path") and not p.get("image_path"):
            raise UserError(f"{where}: --ei (last frame) needs --i (first frame)")
        if task.is_i2v and not p.get("image_path"):
            raise UserError(f"{where}: task {task.name} needs a first-frame image for every sample (--i path)")
        if p.get("control_image_path") and not task.is_i2i:
            raise UserError(f"{where}: --ci (source image) is for the image-edit task k5-lite-i2i-hd; --task {task.name}")
        if task.is_i2i and not p.get("control_image_path"):
            raise UserError(f"{where}: task {task.name} edits an image: give the source image with --ci path")

    def _resolve(self, prompt: dict[str, Any]) -> dict[str, Any]:
        from musubi_tuner.training.sampling import resolve_sample_parameters

        return resolve_sample_parameters(
            prompt,
            resolution_step=self.resolution_step,
            frame_stride=self.vae_frame_stride,
            default_guidance_scale=self.default_guidance_scale,
            default_flow_shift=self.default_discrete_flow_shift,
        )

    def _encode_sample_images(self, args: argparse.Namespace, accelerator: Any, prompts: list[dict[str, Any]], base: Path) -> None:
        """VAE-encode the I2V first/last images and the I2I source images of the samples once, at the sample's size."""
        from musubi_tuner.kandinsky5.pipeline import image_to_tensor

        todo = [p for p in prompts if p.get("image_path") or p.get("control_image_path")]
        if not todo:
            return
        vae = self._load_k5_vae(args)
        try:
            vae.to(accelerator.device)
            for p in todo:
                r = self._resolve(p)
                size = (r["width"], r["height"])
                if p.get("control_image_path"):  # I2I source latent (1, h, w, 16)
                    src = image_to_tensor(_sample_image(_rel(p["control_image_path"][0], base), size, "--ci"))
                    p["k5_source_latents"] = vae.encode_video(src[:, :, None])[0].permute(1, 2, 3, 0).cpu()
                    continue
                first = image_to_tensor(_sample_image(_rel(p["image_path"], base), size, "--i"))
                last = None
                if p.get("end_image_path"):
                    last = image_to_tensor(_sample_image(_rel(p["end_image_path"], base), size, "--ei"))
                p["k5_image_latents"] = vae.encode_image_condition(first, last)[0].cpu()
                p["k5_i2v_mode"] = "first_last" if last is not None else "first"
        finally:
            vae.to("cpu")
        if args.no_vae_load:
            del vae
            _free_memory()
        else:
            self._vae = vae

    def sample_metadata(self, args, sample_parameter, *, seed, step):
        """What ``kandinsky5_generate_video.py`` records for the same settings: task, CFG, resolved negative..."""
        from musubi_tuner.kandinsky5.configs import OUTPUT_FPS
        from musubi_tuner.kandinsky5.generate.generator import model_type
        from musubi_tuner.kandinsky5.vae import latent_frame_count
        from musubi_tuner.training.sampling import sample_generation_metadata

        task = self.task
        assert task is not None
        p = sample_parameter
        extra = {
            "bt_task": task.name,
            "bt_negative_prompt": p.get("k5_negative"),
            "bt_guidance_scale": p.get("k5_cfg"),
            "bt_scheduler": "default",
            "bt_fps": OUTPUT_FPS,
            "bt_latent_frames": 1 if task.is_image else latent_frame_count(p["frame_count"]),
            "bt_nabla": "true" if self.nabla is not None else None,
        }
        return sample_generation_metadata(args, p, model_type=model_type(task), seed=seed, step=step, extra=extra)

    def on_before_sample_images(self, accelerator, args, epoch, step, vae, transformer) -> None:
        from musubi_tuner.training.sampling import sample_tag

        self._sample_tag = sample_tag(step=None if epoch is not None else step, epoch=epoch)

    def do_inference(self, accelerator, args, sample_parameter, vae, dit_dtype, transformer, generator):
        from musubi_tuner.kandinsky5.pipeline import decode_latents, sample_latents
        from musubi_tuner.kandinsky5.vae import latent_frame_count

        task = self.task
        assert task is not None
        p = sample_parameter
        device = accelerator.device
        frames = 1 if task.is_image else latent_frame_count(p["frame_count"])
        shape = (frames, p["height"] // 8, p["width"] // 8)
        cfg = p["cfg_scale"] if p.get("cfg_scale") is not None else p["guidance_scale"]
        nabla = self.nabla
        latents = sample_latents(
            transformer,
            task,
            cond=p["k5_cond"],
            uncond=p.get("k5_uncond"),
            latent_shape=shape,
            num_steps=p["sample_steps"],
            guidance_scale=float(cfg),
            scheduler_scale=float(p["discrete_flow_shift"]),
            generator=generator,
            device=device,
            dtype=dit_dtype,
            image_latents=p.get("k5_image_latents"),
            i2v_mode=p.get("k5_i2v_mode", "first"),
            source_latents=p.get("k5_source_latents"),
            sparse_params_fn=(lambda s: nabla.params(s, device)) if nabla is not None else None,
            autocast=getattr(accelerator, "mixed_precision", "no") != "no",
            progress=False,
        )
        if vae is None:  # --no_vae_load: keep the latent, decode later
            self._save_sample_latent(args, p, latents)
            return None
        offload = args.offload_dit_during_sampling
        if offload:
            _move_dit(transformer, "cpu")
        try:
            vae.to(device)
            video = decode_latents(vae, latents)
        finally:
            vae.to("cpu")
            if offload:
                _move_dit(transformer, device)
        return video

    def _save_sample_latent(self, args: argparse.Namespace, p: dict[str, Any], latents: torch.Tensor) -> None:
        from musubi_tuner.training.sampling import sample_base_path
        from musubi_tuner.utils.atomic import save_safetensors_atomic

        assert self.task is not None
        base = sample_base_path(args.output_dir, args.output_name, self._sample_tag, int(p.get("enum", 0)), p.get("seed"))
        path = base.with_name(base.name + "_latent.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "bt_model_type": "k5",
            "bt_task": self.task.name,
            "prompt": p.get("prompt") or "",
            "negative_prompt": p.get("k5_negative") or "",
            "seeds": str(p.get("seed")),
            "width": str(p["width"]),
            "height": str(p["height"]),
            "infer_steps": str(p["sample_steps"]),
            "guidance_scale": str(p["cfg_scale"] if p.get("cfg_scale") is not None else p["guidance_scale"]),
        }
        save_safetensors_atomic({"latent": latents.detach().float().cpu().contiguous()}, path, metadata)
        logger.info(f"sample latent saved: {path}")


def _where(prompt: dict[str, Any], source: str) -> str:
    line = prompt.get("line_number")
    return f"{source}, line {line}" if line else f"{source} (prompt {int(prompt.get('enum', 0)) + 1})"


def _rel(path: str, base: Path) -> Path:
    """Image paths in a prompt file are taken as given, else relative to the prompt file."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else base / p


def _sample_image(path: str | Path, size: tuple[int, int], flag: str) -> Any:
    """A sample's reference image (RGB PIL) scaled to cover ``size`` (W, H) and centre-cropped."""
    from musubi_tuner.kandinsky5.pipeline import load_image, resize_cover

    return resize_cover(load_image(path, flag), int(size[0]), int(size[1]))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _move_dit(model: Any, device: torch.device | str) -> None:
    """Move the DiT; with block swap only the resident part moves (the swapped blocks keep their layout)."""
    if getattr(model, "blocks_to_swap", 0):
        model.move_to_device_except_swap_blocks(device)
    else:
        model.to(device)
    if torch.device(device).type == "cpu":
        _free_memory()
