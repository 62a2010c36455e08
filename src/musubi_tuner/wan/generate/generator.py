"""``WanGenerator``: the models of one ``wan_generate_video.py`` run, loaded lazily and once, and the stages of
``blissful_tuner.generation_loop`` (encode, generate, decode + save).

Order: encode every prompt and negative with UMT5 (embeddings stay on the CPU, T5 freed); encode the job's images /
videos with the VAE (and CLIP); load the DiT(s) once with LoRAs merged while loading (A14B: ``--lora_weight`` into
the low-noise expert, ``--lora_weight_high_noise`` into the high-noise one), fp8, block swap; sample; free the DiTs;
decode and save.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from blissful_tuner.generation_loop import Job
from blissful_tuner.guidance import GuidancePlan
from blissful_tuner.latent_preview import WAN21_RGB, LatentPreviewer
from blissful_tuner.media_output import output_stem, save_generation
from blissful_tuner.metadata import prepare_metadata
from blissful_tuner.seeds import make_generator, seed_everything
from blissful_tuner.utils import compile_kwargs
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.wan.configs import TaskConfig, check_video_geometry
from musubi_tuner.wan.generate.args import _cfg_skip_steps
from musubi_tuner.wan.generate.conditions import control_condition, image_condition, load_video, one_frame_condition
from musubi_tuner.wan.one_frame import check_one_frame_task, parse_one_frame_options
from musubi_tuner.wan.pipeline import decode_latents, sample_latents
from musubi_tuner.wan.vae import latent_frame_count

logger = get_logger(__name__)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_keys(path: str, expert: str | None) -> list[str]:
    """Our (official) module keys of a DiT checkpoint: what LoRA names are matched against."""
    from musubi_tuner.utils.safetensors_utils import open_weights
    from musubi_tuner.wan.models.loading import _key_map_for, dit_weights_path

    with open_weights(dit_weights_path(path, expert)) as reader:
        return list(_key_map_for(reader.keys()).map_keys(reader.keys()).values())


def validate_job(job: Job) -> None:
    """Per-job checks (sizes, frame count, one-frame options) before any model is loaded."""
    a = job.args
    check_video_geometry(a.task_config, int(a.width), int(a.height), int(a.video_length), where=job.location)
    if a.one_frame_inference is not None:
        check_one_frame_task(a.task_config, f"{job.location}: --of / --one_frame_inference")
        parse_one_frame_options(a.one_frame_inference, f"{job.location}: --of / --one_frame_inference")
    elif a.control_image_path:
        raise UserError(f"{job.location}: control images (--ci / --control_image_path) need one-frame options (--of)")


class WanGenerator:
    """Holds the models of one run."""

    def __init__(self, args: argparse.Namespace, *, interactive: bool = False) -> None:
        self.args = args
        self.task: TaskConfig = args.task_config
        self.device = torch.device(args.device)
        self.interactive = interactive
        self.t5: Any = None
        self.vae: Any = None
        self.dits: dict[str | None, Any] = {}
        self.conditions: dict[int, dict[str, Any]] = {}
        self.vae_dtype = parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype")

    # -- text ------------------------------------------------------------------------------------------------------

    def encode(self, job: Job) -> dict[str, torch.Tensor]:
        from musubi_tuner.wan.text_encoders import WanT5Encoder

        if self.t5 is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.t5 = WanT5Encoder.load(
                self.args.t5, tokenizer=self.args.t5_tokenizer, dtype=dtype, device=self.device, fp8=self.args.fp8_t5
            )
        negative = job.negative_prompt if job.negative_prompt is not None else self.task.negative_prompt
        texts = [job.prompt, negative]
        nag = job.args.nag_scale is not None
        if nag:
            texts.append(job.args.nag_prompt if job.args.nag_prompt is not None else negative)
        if job.args.perp_neg is not None:
            texts.append("")  # perpendicular negative guidance: the empty-prompt ("nocond") pass
        states = self.t5.encode(texts)
        return {
            "cond": states[0],
            "uncond": states[1],
            "nag": states[2] if nag else None,
            "nocond": states[-1] if job.args.perp_neg is not None else None,
            "negative": negative,
        }

    def cache_key(self, job: Job) -> Any:
        return (job.prompt, job.negative_prompt, job.args.nag_prompt, job.args.nag_scale is not None, job.args.perp_neg is not None)

    def free_text_encoder(self) -> None:
        self.t5 = None
        _free()

    # -- conditions ------------------------------------------------------------------------------------------------

    def _get_vae(self) -> Any:
        from musubi_tuner.wan.vae import load_wan_vae

        if self.vae is None:
            self.vae = load_wan_vae(
                self.args.vae, kind=self.task.vae, dtype=self.vae_dtype, device=self.device, cache_on_cpu=self.args.vae_cache_cpu
            )
        else:
            self.vae.to(self.device)
        return self.vae

    def encode_conditions(self, job: Job) -> None:
        """VAE / CLIP encodings of the job's start / end image, V2V source and control video (once per job)."""
        a = job.args
        if job.index in self.conditions:
            return
        out: dict[str, Any] = {}
        w, h, f = int(a.width), int(a.height), int(a.video_length)
        if a.one_frame_inference is not None:
            if not a.image_path:
                raise UserError(f"{job.location}: one-frame inference needs a start image (--image_path / --i)")
            options = parse_one_frame_options(a.one_frame_inference, f"{job.location}: --of / --one_frame_inference")
            y, clip_fea = one_frame_condition(
                self.task, self._get_vae(), a.clip, a.image_path, a.end_image_path, a.control_image_path, options, w, h, self.device
            )
            self.conditions[job.index] = {"y": y, "clip_fea": clip_fea, "one_frame": options}
            return
        if a.image_path:
            y, clip_fea, ti2v = image_condition(
                self.task, self._get_vae(), a.clip, a.image_path, a.end_image_path, f, w, h, self.device
            )
            out.update(y=y, clip_fea=clip_fea, ti2v=ti2v)
        elif self.task.i2v:
            raise UserError(f"{job.location}: task {self.task.name} needs a start image (--image_path / --i)")
        if self.task.control:
            if not a.control_path:
                raise UserError(f"{job.location}: task {self.task.name} needs a control video (--control_path / --cn)")
            out["y"] = control_condition(self._get_vae(), a.control_path, out.get("y"), f, w, h)
        if a.video_path:
            out["init"] = self._get_vae().encode(load_video(a.video_path, w, h, f, "--video_path")[None])[0].cpu()
        self.conditions[job.index] = out

    def encode_all_conditions(self, jobs: list[Job]) -> None:
        if self.t5 is not None:
            self.free_text_encoder()
        for job in jobs:
            try:
                self.encode_conditions(job)
            except UserError as e:
                logger.error(f"{job.location}: {e}")
        if self.vae is not None and self.device.type != "cpu":
            self.vae.to("cpu")
            _free()

    # -- DiT -------------------------------------------------------------------------------------------------------

    def _load_dit(self, expert: str | None) -> Any:
        from musubi_tuner.networks.merge import build_lora_delta_hook
        from musubi_tuner.wan.models.loading import load_dit

        a = self.args
        path = a.dit_high_noise if expert == "high" else a.dit
        loras, mults = (
            (a.lora_weight_high_noise, a.lora_multiplier_high_noise) if expert == "high" else (a.lora_weight, a.lora_multiplier)
        )
        hook = build_lora_delta_hook(loras, mults, _model_keys(path, expert), target_name=str(path)) if loras else None
        swap = a.blocks_to_swap > 0
        offload = expert is not None and a.offload_inactive_dit
        dit = load_dit(
            self.task,
            path,
            device="cpu" if (swap or offload) else self.device,
            dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            fp8_base=a.fp8_base,
            fp8_scaled=a.fp8_scaled,
            fp8_fast=a.fp8_fast,
            attn_mode=a.attn,
            lora_deltas=hook,
            expert=expert,
            flag="--dit_high_noise" if expert == "high" else "--dit",
        )
        if swap:
            from musubi_tuner.modules.offloading import BlockSwapConfig

            dit.enable_block_swap(
                a.blocks_to_swap,
                BlockSwapConfig(self.device, supports_backward=False, use_pinned_memory=a.use_pinned_memory_for_block_swap),
            )
            dit.move_to_device_except_swap_blocks(self.device)
            dit.switch_block_swap_for_inference()
        kw = compile_kwargs(a)
        if kw is not None:
            for block in dit.blocks:
                block.compile(**kw)
        return dit

    def _dits(self) -> dict[str | None, Any]:
        if not self.dits:
            experts = ("high", "low") if self.task.two_experts else (None,)
            self.dits = {e: self._load_dit(e) for e in experts}
        return self.dits

    def _on_expert(self, expert: str | None) -> None:
        """``--offload_inactive_dit``: only the expert in use is on the device."""
        if expert is None or not self.args.offload_inactive_dit or self.args.blocks_to_swap > 0:
            return
        for name, dit in self.dits.items():
            dit.to(self.device if name == expert else "cpu")
        _free()

    def free_dit(self) -> None:
        for dit in self.dits.values():
            if getattr(dit, "offloaders", None):
                dit.disable_block_swap()
        self.dits = {}
        _free()

    # -- generation ------------------------------------------------------------------------------------------------

    def generate(self, job: Job, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        a, task = job.args, self.task
        if job.index not in self.conditions:
            self.encode_conditions(job)
        cond = self.conditions.pop(job.index, {})
        dits = self._dits()
        frames = int(a.video_length)
        s = task.vae_stride[1]
        one_frame = cond.get("one_frame")
        lat_frames = len(one_frame.frame_indices) if one_frame is not None else latent_frame_count(frames)
        shape = (task.latent_channels, lat_frames, int(a.height) // s, int(a.width) // s)
        steps = int(a.infer_steps)
        start = 0
        if cond.get("init") is not None and a.denoise_strength is not None:
            from musubi_tuner.wan.sampling import denoise_start_index

            start = denoise_start_index(steps, a.denoise_strength)
        run_steps = steps - start
        gplan = GuidancePlan.from_args(a, run_steps, float(a.guidance_scale))
        skip = _cfg_skip_steps(a.cfg_skip_mode, a.cfg_apply_ratio, run_steps)
        logger.info(
            f"seed {job.seed}: {task.name} {a.width}x{a.height}, "
            + (f"one frame at index {one_frame.target_index}" if one_frame is not None else f"{frames} frame(s)")
            + f", {steps} steps ({a.sample_solver}), "
            f"guidance {a.guidance_scale:g}"
            + (f" / high {a.guidance_scale_high_noise:g}" if task.two_experts else "")
            + f", shift {a.flow_shift:g}"
        )
        seed_everything(job.seed)
        gen = make_generator(job.seed, "cpu" if a.cpu_noise else self.device)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=gen.device)

        def needs_uncond(n: int) -> bool:
            return gplan.needs_uncond(n) and (skip is None or skip[n])

        def guidance(n: int, v_c: torch.Tensor, v_u: torch.Tensor | None, scale: float, v_n: torch.Tensor | None) -> torch.Tensor:
            if v_u is None:
                return v_c
            if scale != float(a.guidance_scale):  # the high-noise expert's own scale
                from blissful_tuner.guidance import perp_neg_combine
                from musubi_tuner.wan.sampling import cfg_combine

                return perp_neg_combine(v_c, v_u, v_n, scale, a.perp_neg) if v_n is not None else cfg_combine(v_c, v_u, scale)
            return gplan.combine(n, v_c, v_u, v_n)

        layers = a.slg_layer_list
        lo, hi = (round(run_steps * a.slg_start), round(run_steps * a.slg_end)) if layers else (0, 0)

        def skip_blocks(n: int, which: str) -> list[int] | None:
            return layers if (layers and a.slg_mode == "uncond" and which == "uncond" and lo <= n < hi) else None

        def slg(n: int) -> tuple[list[int], float] | None:
            return (layers, a.slg_scale) if (layers and a.slg_mode == "original" and lo <= n < hi) else None

        previewer = None
        if a.preview_latent_every:
            previewer = (
                LatentPreviewer(
                    Path(a.save_path),
                    a.preview_latent_every,
                    noise,
                    table=WAN21_RGB if task.latent_channels == 16 else None,
                    fps=a.fps,
                )
                if task.latent_channels == 16
                else None
            )
            if previewer is None:
                logger.warning("--preview_latent_every: no latent→RGB table for the 48-channel Wan 2.2 VAE; previews off")
        latent = sample_latents(
            dits if task.two_experts else dits[None],
            task,
            cond=encoded["cond"],
            uncond=encoded["uncond"],
            latent_shape=shape,
            num_steps=steps,
            guidance_scale=float(a.guidance_scale),
            guidance_scale_high=a.guidance_scale_high_noise,
            shift=float(a.flow_shift),
            generator=gen,
            device=self.device,
            solver=a.sample_solver,
            boundary=a.boundary,
            y=cond.get("y"),
            clip_fea=cond.get("clip_fea"),
            ti2v_image_latent=cond.get("ti2v"),
            init_latents=cond.get("init"),
            denoise_strength=a.denoise_strength,
            noise=noise,
            nocond=encoded.get("nocond"),
            guidance_fn=guidance,
            uncond_needed_fn=needs_uncond,
            skip_blocks_fn=skip_blocks,
            slg_fn=slg,
            on_expert=self._on_expert,
            step_callback=previewer,
            riflex_index=a.riflex_index,
            nag=(encoded["nag"], a.nag_scale, a.nag_tau, a.nag_alpha) if encoded.get("nag") is not None else None,
            frame_indices=one_frame.frame_indices if one_frame is not None else None,
        )
        if one_frame is not None:  # keep the generated frame only
            latent = latent[:, one_frame.target_position : one_frame.target_position + 1]
        return latent

    # -- decode and save -------------------------------------------------------------------------------------------

    def metadata(self, job: Job, negative: str) -> dict[str, str] | None:
        a = job.args
        if a.no_metadata:
            return None
        extra = {
            "bt_task": self.task.name,
            "bt_width": a.width,
            "bt_height": a.height,
            "bt_video_length": a.video_length,
            "bt_infer_steps": a.infer_steps,
            "bt_guidance_scale": a.guidance_scale,
            "bt_guidance_scale_high_noise": a.guidance_scale_high_noise if self.task.two_experts else None,
            "bt_timestep_boundary": a.boundary,
            "bt_flow_shift": a.flow_shift,
            "bt_sample_solver": a.sample_solver,
            "bt_fps": a.fps,
            "bt_image_path": Path(a.image_path).name if a.image_path else None,
            "bt_end_image_path": Path(a.end_image_path).name if a.end_image_path else None,
            "bt_one_frame_inference": a.one_frame_inference,
            "bt_control_image_path": ",".join(Path(p).name for p in a.control_image_path) if a.control_image_path else None,
            "bt_nag_scale": a.nag_scale,
            "bt_nag_tau": a.nag_tau if a.nag_scale is not None else None,
            "bt_nag_alpha": a.nag_alpha if a.nag_scale is not None else None,
            "bt_lora_weight_high_noise": ",".join(Path(p).name for p in a.lora_weight_high_noise)
            if a.lora_weight_high_noise
            else None,
        }
        return prepare_metadata(
            a,
            model_type=f"Wan {self.task.version} {self.task.name}",
            seeds=job.seed,
            prompt=job.prompt,
            negative_prompt=negative,
            raw_prompt=job.raw_prompt,
            extra=extra,
        )

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        video = decode_latents(self._get_vae(), latent)
        if self.args.trim_tail_frames:
            video = video[:, : max(1, video.shape[1] - self.args.trim_tail_frames)]
        return video

    def decode_save(self, job: Job, latent: torch.Tensor, negative: str | None = None) -> list[Path]:
        a = job.args
        md = self.metadata(job, negative if negative is not None else (job.negative_prompt or self.task.negative_prompt))
        video = None if a.output_type == "latent" else self.decode(latent)
        files = save_generation(
            save_path=a.save_path,
            stem=output_stem(job.seed),
            video=video,
            latent=latent,
            output_type=a.output_type,
            codec=a.codec,
            container=a.container,
            fps=a.fps,
            metadata=md,
            save_first_frame=a.save_first_frame,
            save_last_frame=a.save_last_frame,
            overwrite=a.overwrite,
            crf=a.crf,
            bitrate=a.video_bitrate,
        )
        for p in files:
            logger.info(f"saved {p}")
        return files


def decode_saved_latents(args: argparse.Namespace) -> list[Path]:
    """``--latent_path`` / ``--decode_from_latent``: decode saved latents with their own metadata."""
    from blissful_tuner.media_output import decoded_latent_stem, load_latent_file
    from musubi_tuner.wan.configs import get_task_config
    from musubi_tuner.wan.vae import load_wan_vae

    written: list[Path] = []
    for path in args.decode_from_latent:
        latent, md = load_latent_file(path)
        if latent.dim() == 5 and latent.shape[0] == 1:
            latent = latent[0]
        task = get_task_config(md.get("bt_task", args.task))
        if latent.dim() != 4 or latent.shape[0] != task.latent_channels:
            raise UserError(f"{path}: expected a Wan latent ({task.latent_channels}, F, h, w), got {tuple(latent.shape)}")
        vae = load_wan_vae(
            args.vae,
            kind=task.vae,
            dtype=parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype"),
            device=args.device,
            cache_on_cpu=args.vae_cache_cpu,
        )
        video = decode_latents(vae, latent.float())
        fps = float(md.get("bt_fps", args.fps))
        metadata = None if args.no_metadata else {k: v for k, v in md.items() if k.startswith("bt_")}
        files = save_generation(
            save_path=args.save_path or str(Path(path).parent),
            stem=decoded_latent_stem(path),
            video=video,
            output_type="images" if args.output_type in ("images", "latent_images") else "video",
            codec=args.codec,
            container=args.container,
            fps=fps,
            metadata=metadata,
            overwrite=args.overwrite,
        )
        written.extend(files)
    return written
