"""The Wan hooks of the common trainer (``NetworkTrainer``): task and expert checks, DiT/VAE loading (one DiT or the
two Wan 2.2 A14B experts), the DiT input of a step, metadata, per-expert LoRA files and sampling during training
(specs/wan.md §9, specs/training.md).

``wan_train_network.py`` builds the command line and imports this module only after parsing, so ``--help`` and option
errors do not pay for importing torch and the model code.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.hv_train_network import DiTOutput, NetworkTrainer
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.wan.configs import TRAIN_REFUSED_FLAGS, TaskConfig, get_task_config

logger = get_logger(__name__)

ARCH = "wan"
ARCH_FULL = "wan"


class WanNetworkTrainer(NetworkTrainer):
    """The Wan hooks of ``NetworkTrainer``."""

    def __init__(self) -> None:
        super().__init__()
        self.task: TaskConfig | None = None
        self.expert_mode: str | None = None
        self.boundary: float | None = None
        self._rewrite_layout: str | None = None  # "diffusers" / "comfyui": saved kohya, rewritten by on_post_save
        self.default_vae_dtype = torch.bfloat16

    @property
    def architecture(self) -> str:
        return ARCH

    @property
    def architecture_full_name(self) -> str:
        return ARCH_FULL

    # -- arguments -------------------------------------------------------------------------------------------------

    def handle_model_specific_args(self, args: argparse.Namespace) -> None:
        task = get_task_config(args.task)
        self.task = task
        for flag, why in TRAIN_REFUSED_FLAGS.items():
            if getattr(args, flag.lstrip("-")):
                raise UserError(f"{flag}: {why}")
        if args.compile_args is not None:
            raise UserError("--compile_args: use --compile with --compile_backend / --compile_mode / --compile_dynamic")
        if args.one_frame:
            from musubi_tuner.wan.one_frame import check_one_frame_task

            check_one_frame_task(task, "--one_frame")
        self._i2v_training = task.i2v
        self._control_training = task.control
        self.default_guidance_scale = task.guidance
        self.default_discrete_flow_shift = task.shift
        self.vae_frame_stride = 1 if task.image_only else 4
        self.resolution_step = task.resolution_step
        if args.lora_format == "diffusers":
            if "loha" in (args.network_module or "").lower() or "lycoris" in (args.network_module or "").lower():
                raise UserError(
                    f"--lora_format diffusers with --network_module {args.network_module}: diffusers loads LoRA only; save kohya"
                )
            # the shared saver knows official module names only: save kohya, rewrite with the Wan diffusers table
            self._rewrite_layout = "diffusers"
            args.lora_format = "kohya"
        if args.force_v2_1_time_embedding:
            logger.info("--force_v2_1_time_embedding: no effect (only TI2V-5B uses per-token timesteps)")
        if task.two_experts:
            if args.expert is None:
                raise UserError(
                    f"--task {task.name} has two experts: choose --expert both (one LoRA per expert in one run, needs "
                    "--dit_high_noise), high or low (see docs/wan.md, 'Which LoRA do I get?')"
                )
            self.expert_mode = args.expert
            self.boundary = args.timestep_boundary if args.timestep_boundary is not None else task.boundary
            if args.expert == "both":
                if not args.dit_high_noise:
                    raise UserError("--expert both needs --dit_high_noise (the high-noise expert; --dit is the low-noise one)")
                if args.lora_format == "comfyui":
                    # the combined file spans both experts: save kohya, split it per expert, rewrite each file
                    self._rewrite_layout = "comfyui"
                    args.lora_format = "kohya"
                if args.min_timestep is not None or args.max_timestep is not None:
                    raise UserError(
                        "--min_timestep/--max_timestep cannot be combined with --expert both (the boundary splits the range)"
                    )
            else:
                if args.dit_high_noise and args.expert == "low":
                    raise UserError("--expert low trains the low-noise expert given by --dit; drop --dit_high_noise")
                edge = self.boundary * 1000.0
                if args.expert == "high":
                    args.min_timestep = edge if args.min_timestep is None else max(edge, args.min_timestep)
                else:
                    args.max_timestep = edge if args.max_timestep is None else min(edge, args.max_timestep)
                logger.info(f"--expert {args.expert}: timesteps in [{args.min_timestep or 0:.0f}, {args.max_timestep or 1000:.0f}]")
        else:
            for flag, val in (
                ("--expert", args.expert),
                ("--dit_high_noise", args.dit_high_noise),
                ("--timestep_boundary", args.timestep_boundary),
            ):
                if val is not None:
                    raise UserError(
                        f"{flag} is for the Wan 2.2 two-expert tasks (t2v-A14B, i2v-A14B); --task {task.name} has one DiT"
                    )
            if args.offload_inactive_dit:
                raise UserError(f"--offload_inactive_dit is for --expert both; --task {task.name} has one DiT")
        if args.sample_prompts and not args.t5:
            raise UserError("--sample_prompts needs --t5 (sample prompts are encoded once at start)")
        if args.sample_prompts and not args.vae:
            raise UserError("--sample_prompts needs --vae to decode the samples")

    # -- models ----------------------------------------------------------------------------------------------------

    def _load_one(self, args, path, attn_mode, split_attn, device, expert=None):
        from musubi_tuner.wan.models.loading import load_dit

        compute = parse_dtype(args.dit_dtype, torch.bfloat16, flag="--dit_dtype")
        assert self.task is not None
        return load_dit(
            self.task,
            path,
            device=device,
            dtype=compute,
            fp8_base=bool(args.fp8_base),
            fp8_scaled=bool(args.fp8_scaled),
            attn_mode=attn_mode,
            split_attn=split_attn,
            expert=expert,
            flag="--dit_high_noise" if expert == "high" else "--dit",
        )

    def load_transformer(self, accelerator, args, dit_path, attn_mode, split_attn, loading_device, dit_weight_dtype):
        if self.expert_mode == "both":
            from musubi_tuner.wan.training import WanExpertPair

            high_device = "cpu" if args.offload_inactive_dit else loading_device
            high = self._load_one(args, args.dit_high_noise, attn_mode, split_attn, high_device, "high")
            low = self._load_one(args, dit_path, attn_mode, split_attn, loading_device, "low")
            return WanExpertPair(high, low, offload_inactive=bool(args.offload_inactive_dit))
        path = args.dit_high_noise if (self.expert_mode == "high" and args.dit_high_noise) else dit_path
        return self._load_one(args, path, attn_mode, split_attn, loading_device, self.expert_mode)

    def load_vae(self, args: argparse.Namespace, vae_dtype: torch.dtype, vae_path: str | None) -> Any:
        from musubi_tuner.wan.vae import load_wan_vae

        assert self.task is not None
        return load_wan_vae(
            vae_path or args.vae, kind=self.task.vae, dtype=vae_dtype, device="cpu", cache_on_cpu=args.vae_cache_cpu
        )

    # -- the step ----------------------------------------------------------------------------------------------------

    def get_noisy_model_input_and_timesteps(self, args, noise, latents, batch, device, dtype):
        from musubi_tuner.training.timesteps import noisy_input
        from musubi_tuner.wan.training import route_timesteps

        if self.expert_mode != "both":
            return super().get_noisy_model_input_and_timesteps(args, noise, latents, batch, device, dtype)
        assert self.timestep_sampler is not None and self.boundary is not None
        hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        t = self.timestep_sampler.sample(latents.shape[0], hw, device=device, uniforms=batch.get("timesteps"))
        t, expert = route_timesteps(t, self.boundary, lambda k: self.timestep_sampler.sample(k, hw, device=device))
        batch["_wan_expert"] = expert
        return noisy_input(latents, noise, t).to(dtype), t

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype):
        from musubi_tuner.wan.training import build_dit_kwargs

        assert self.task is not None
        model = transformer
        if self.expert_mode == "both":
            expert = batch.get("_wan_expert") or ("high" if float(timesteps[0]) >= self.boundary * 1000.0 else "low")
            if transformer.active != expert and args.offload_inactive_dit:
                transformer.activate(expert, accelerator.device)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            model = transformer.expert(expert)
        kwargs = build_dit_kwargs(self.task, model.in_dim, noisy_model_input, batch, timesteps, accelerator.device)
        pred = model(kwargs.pop("x"), kwargs.pop("timestep"), kwargs.pop("context"), **kwargs)
        target = noise - latents
        if "frame_indices" in kwargs:
            # one-frame training: the loss covers the generated frame only, not the control frames
            from musubi_tuner.wan.one_frame import target_positions

            rows = torch.arange(pred.shape[0], device=pred.device)
            pos = target_positions(kwargs["y"]).to(pred.device)
            pred, target = pred[rows, :, pos][:, :, None], target[rows, :, pos][:, :, None]
        return DiTOutput(pred=pred.float(), target=target.float())

    def extra_metadata(self, args: argparse.Namespace) -> dict[str, str]:
        assert self.task is not None
        md = {"ss_wan_task": self.task.name}
        if self._rewrite_layout is not None:
            md["ss_lora_format"] = self._rewrite_layout
        if self.expert_mode is not None:
            md["ss_wan_expert"] = self.expert_mode
            md["ss_wan_timestep_boundary"] = f"{self.boundary:g}"
            if self.expert_mode == "high":
                md["modelspec.timestep_range"] = f"{round(self.boundary * 1000)},1000"
            elif self.expert_mode == "low":
                md["modelspec.timestep_range"] = f"0,{round(self.boundary * 1000)}"
        return md

    def on_post_save(self, args: argparse.Namespace, accelerator: Any, path: Path) -> None:
        """``--expert both``: replace the combined file by ``<stem>_high_noise`` and ``<stem>_low_noise``;
        ``--lora_format diffusers`` / ``comfyui`` (the latter saved kohya only with ``--expert both``): rewrite each file
        in that layout."""
        from musubi_tuner.wan.lora_formats import rewrite_as

        if self.expert_mode != "both":
            if self._rewrite_layout is not None:
                rewrite_as(path, self._rewrite_layout)
            return
        from safetensors import safe_open

        from musubi_tuner.networks.formats import precalculate_safetensors_hashes
        from musubi_tuner.utils.atomic import save_safetensors_atomic
        from musubi_tuner.wan.training import split_expert_state_dict

        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
        edge = round(self.boundary * 1000)
        for expert, part in split_expert_state_dict(sd).items():
            md = dict(metadata)
            md["ss_wan_expert"] = expert
            md["modelspec.timestep_range"] = f"{edge},1000" if expert == "high" else f"0,{edge}"
            md["modelspec.title"] = f"{md.get('modelspec.title', path.stem)} ({expert}-noise expert)"
            model_hash, legacy_hash = precalculate_safetensors_hashes(part, md)
            md["sshs_model_hash"], md["sshs_legacy_hash"] = model_hash, legacy_hash
            out = path.with_name(f"{path.stem}_{expert}_noise{path.suffix}")
            save_safetensors_atomic(part, out, md)
            if self._rewrite_layout is not None:
                rewrite_as(out, self._rewrite_layout)
            logger.info(f"saved {out} ({len(part) // 3} modules, t {md['modelspec.timestep_range']})")
        path.unlink()

    # -- sampling during training ----------------------------------------------------------------------------------

    def process_sample_prompts(self, args: argparse.Namespace, accelerator: Any, sample_prompts: str) -> list[dict[str, Any]]:
        """Encode every prompt and negative prompt once with UMT5 (then free it); I2V sample images are VAE/CLIP-encoded
        at sampling time."""
        from musubi_tuner.training.sampling import load_sample_prompts
        from musubi_tuner.wan.text_encoders import WanT5Encoder

        assert self.task is not None
        prompts = load_sample_prompts(sample_prompts)
        texts: set[str] = set()
        for p in prompts:
            if self.task.i2v and not p.get("image_path"):
                raise UserError(f"{sample_prompts}: task {self.task.name} needs a start image for every sample prompt (--i path)")
            if self.task.flf2v and not p.get("end_image_path"):
                raise UserError(f"{sample_prompts}: task {self.task.name} needs an end image for every sample prompt (--ei path)")
            if p.get("end_image_path") and not self.task.flf2v:
                raise UserError(f"{sample_prompts}: --ei (end image) needs --task flf2v-14B, not {self.task.name}")
            if self.task.control and not p.get("control_video_path"):
                raise UserError(
                    f"{sample_prompts}: task {self.task.name} needs a control video for every sample prompt (--cn path)"
                )
            if p.get("one_frame"):
                from musubi_tuner.wan.one_frame import check_one_frame_task, parse_one_frame_options

                check_one_frame_task(self.task, f"{sample_prompts}: --of")
                parse_one_frame_options(p["one_frame"], f"{sample_prompts}: --of")
            elif args.one_frame:
                raise UserError(
                    f"{sample_prompts}: --one_frame samples need one-frame options on every prompt (--of target_index=N)"
                )
            p["wan_negative"] = p.get("negative_prompt") if p.get("negative_prompt") is not None else self.task.negative_prompt
            texts.update([p.get("prompt") or "", p["wan_negative"]])
        enc = WanT5Encoder.load(
            args.t5, tokenizer=args.t5_tokenizer, dtype=torch.bfloat16, device=accelerator.device, fp8=args.fp8_t5
        )
        ordered = sorted(texts)
        encoded = dict(zip(ordered, enc.encode(ordered)))
        del enc
        gc.collect()
        for p in prompts:
            p["wan_cond"] = encoded[p.get("prompt") or ""]
            p["wan_uncond"] = encoded[p["wan_negative"]]
            p["wan_base"] = str(Path(sample_prompts).parent)
        logger.info(f"encoded {len(encoded)} sample prompts / negatives once; T5 freed")
        return prompts

    def do_inference(self, accelerator, args, sample_parameter, vae, dit_dtype, transformer, generator):
        from musubi_tuner.wan.generate.conditions import control_condition, image_condition
        from musubi_tuner.wan.pipeline import decode_latents, sample_latents
        from musubi_tuner.wan.vae import latent_frame_count

        task = self.task
        assert task is not None
        p = sample_parameter
        device = accelerator.device
        frames = 1 if task.image_only else p["frame_count"]
        lf = latent_frame_count(frames)
        s = task.vae_stride[1]
        shape = (task.latent_channels, lf, p["height"] // s, p["width"] // s)
        cfg = p["cfg_scale"] if p.get("cfg_scale") is not None else p["guidance_scale"]
        y = clip_fea = ti2v = None
        vae.to(device)
        try:
            one_frame = None
            if p.get("one_frame"):
                from musubi_tuner.wan.generate.conditions import one_frame_condition
                from musubi_tuner.wan.one_frame import parse_one_frame_options

                one_frame = parse_one_frame_options(p["one_frame"], "sample prompt --of")
                end = _rel(p["end_image_path"], p["wan_base"]) if p.get("end_image_path") else None
                controls = [_rel(c, p["wan_base"]) for c in p.get("control_image_path") or []]
                y, clip_fea = one_frame_condition(
                    task,
                    vae,
                    args.clip,
                    _rel(p["image_path"], p["wan_base"]),
                    end,
                    controls,
                    one_frame,
                    p["width"],
                    p["height"],
                    device,
                )
                shape = (task.latent_channels, len(one_frame.frame_indices), *shape[2:])
            elif p.get("image_path"):
                end = _rel(p["end_image_path"], p["wan_base"]) if p.get("end_image_path") else None
                y, clip_fea, ti2v = image_condition(
                    task, vae, args.clip, _rel(p["image_path"], p["wan_base"]), end, frames, p["width"], p["height"], device
                )
            if task.control:
                y = control_condition(vae, _rel(p["control_video_path"], p["wan_base"]), y, frames, p["width"], p["height"])
            on_expert = None
            if self.expert_mode == "both":
                dits = {"high": transformer.expert("high"), "low": transformer.expert("low")}
                on_expert = lambda e: transformer.activate(e, device)  # noqa: E731 (offloads the other expert)
            else:
                dits = transformer
            latents = sample_latents(
                dits,
                task,
                cond=p["wan_cond"],
                uncond=p["wan_uncond"],
                latent_shape=shape,
                num_steps=p["sample_steps"],
                guidance_scale=float(cfg),
                shift=float(p["discrete_flow_shift"]),
                generator=generator,
                device=device,
                boundary=self.boundary if self.expert_mode == "both" else None,
                y=y,
                clip_fea=clip_fea,
                ti2v_image_latent=ti2v,
                on_expert=on_expert,
                frame_indices=one_frame.frame_indices if one_frame is not None else None,
                progress=False,
            )
            if one_frame is not None:
                latents = latents[:, one_frame.target_position : one_frame.target_position + 1]
            return decode_latents(vae, latents.to(device))
        finally:
            vae.to("cpu")


def _rel(path: str, base: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else Path(base) / p
