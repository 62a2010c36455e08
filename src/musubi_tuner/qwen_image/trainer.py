"""The Qwen-Image hooks of the common trainer (``NetworkTrainer``): model-version checks, DiT/VAE loading, the DiT
input of a step (text zero-padded and masked, edit controls appended after the target tokens, Layered composite +
layers), metadata and sampling during training (specs/qwen_image.md §8, specs/training.md).

``qwen_image_train_network.py`` builds the command line and imports this module only after parsing, so ``--help`` and
option errors do not pay for importing torch and the model code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.hv_train_network import DiTOutput, NetworkTrainer
from musubi_tuner.qwen_image.configs import ModelVersion, resolve_model_version
from musubi_tuner.qwen_image.training import build_training_inputs
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

ARCH_FULL = "qwen_image"


class QwenImageNetworkTrainer(NetworkTrainer):
    """The Qwen-Image hooks of ``NetworkTrainer``."""

    def __init__(self) -> None:
        super().__init__()
        self.version: ModelVersion | None = None
        self.default_vae_dtype = torch.bfloat16
        self._vae: Any = None

    @property
    def architecture(self) -> str:
        return self.version.short if self.version is not None else "qi"

    @property
    def architecture_full_name(self) -> str:
        return ARCH_FULL

    def handle_model_specific_args(self, args: argparse.Namespace) -> None:
        version = resolve_model_version(args)
        self.version = version
        self._control_training = version.is_edit or version.is_layered
        self.default_guidance_scale = version.guidance
        self.default_discrete_flow_shift = 2.2
        self.vae_frame_stride = 1
        self.resolution_step = 16
        if args.remove_first_image_from_target and not version.is_layered:
            raise UserError("--remove_first_image_from_target is for --model_version layered")
        if args.split_attn:
            raise UserError("--split_attn is not supported for Qwen-Image (text keys are masked per sample instead)")
        if args.fp8_base and not args.fp8_scaled:
            logger.info("--fp8_base: Qwen-Image uses block-scaled fp8 (--fp8_scaled)")
            args.fp8_scaled = True
        if args.guidance_scale != 1.0:
            logger.warning("--guidance_scale has no effect: Qwen-Image has no embedded guidance (guidance_embeds=False)")
        if args.sample_prompts:
            if not args.text_encoder:
                raise UserError("--sample_prompts needs --text_encoder (sample prompts are encoded once at start)")
            if not args.vae:
                raise UserError("--sample_prompts needs --vae to decode the samples")
        logger.info(f"Qwen-Image {version.name}: cache suffix {version.short}")

    # -- models ----------------------------------------------------------------------------------------------------

    def load_transformer(self, accelerator, args, dit_path, attn_mode, split_attn, loading_device, dit_weight_dtype):
        from musubi_tuner.qwen_image.models.loading import load_dit

        assert self.version is not None
        return load_dit(
            self.version,
            dit_path,
            device=loading_device,
            dtype=parse_dtype(args.dit_dtype, torch.bfloat16, flag="--dit_dtype"),
            fp8_base=bool(args.fp8_base),
            fp8_scaled=bool(args.fp8_scaled),
            attn_mode=attn_mode,
            num_layers=args.num_layers,
        )

    def load_vae(self, args: argparse.Namespace, vae_dtype: torch.dtype, vae_path: str | None) -> Any:
        from musubi_tuner.qwen_image.vae import QwenImageVae

        assert self.version is not None
        if self._vae is None:
            if not args.vae:
                raise UserError("--vae is needed to encode / decode the samples")
            self._vae = QwenImageVae.load(args.vae, layered=self.version.is_layered, dtype=vae_dtype or torch.bfloat16)
        return self._vae

    # -- the step ----------------------------------------------------------------------------------------------------

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype):
        assert self.version is not None
        if latents.dim() == 4:
            latents, noise, noisy_model_input = latents[:, :, None], noise[:, :, None], noisy_model_input[:, :, None]
        if args.remove_first_image_from_target:
            if latents.shape[2] < 2:
                raise UserError("--remove_first_image_from_target needs layered caches with at least two frames")
            latents, noise, noisy_model_input = latents[:, :, 1:], noise[:, :, 1:], noisy_model_input[:, :, 1:]
        inputs = build_training_inputs(
            self.version, noisy_model_input, batch, timesteps, device=accelerator.device, dtype=network_dtype
        )
        pred = inputs.call(transformer)
        return DiTOutput(pred=pred, target=(noise - latents).to(pred.device))

    def extra_metadata(self, args: argparse.Namespace) -> dict[str, str]:
        assert self.version is not None
        md = {"ss_qwen_image_model_version": self.version.name}
        if self.version.is_layered:
            md["ss_remove_first_image_from_target"] = str(bool(args.remove_first_image_from_target))
        return md

    # -- sampling during training ----------------------------------------------------------------------------------

    def process_sample_prompts(self, args: argparse.Namespace, accelerator: Any, sample_prompts: str) -> list[dict[str, Any]]:
        """Parse the prompt file and encode every prompt and negative once (control images shown to edit models)."""
        from musubi_tuner.qwen_image.text_encoders import QwenVLEncoder
        from musubi_tuner.training.sampling import load_sample_prompts

        version = self.version
        assert version is not None
        prompts = load_sample_prompts(sample_prompts)
        base = Path(sample_prompts).parent
        encoder = QwenVLEncoder(
            args.text_encoder, device="cpu", dtype=torch.bfloat16, fp8_vl=args.fp8_vl, vl_processor=args.vl_processor
        )
        try:
            for p in prompts:
                controls = [str(base / c) if not Path(c).is_absolute() else c for c in (p.get("control_image_path") or [])]
                if version.is_edit and not controls:
                    raise UserError(
                        f"{sample_prompts}: sample prompt {p.get('prompt')!r} needs --ci <control image> for {version.name}"
                    )
                images = _open_images(controls) if version.is_edit else None
                p["qi_cond"] = encoder.encode([p["prompt"]], version, images=[images] if images else None)[0]
                neg = p.get("negative_prompt")
                neg = " " if neg is None else neg
                p["qi_uncond"] = encoder.encode([neg], version, images=[images] if images else None)[0]
                p["qi_controls"] = controls
        finally:
            del encoder
        return prompts

    def do_inference(self, accelerator, args, sample_parameter, vae, dit_dtype, transformer, generator):
        from musubi_tuner.qwen_image.generate.images import encode_control_images
        from musubi_tuner.qwen_image.pipeline import TextCond, sample_latents

        version = self.version
        assert version is not None
        p = sample_parameter
        h, w = p["height"] // 8, p["width"] // 8
        controls = (
            encode_control_images(vae, p.get("qi_controls") or [], version, (p["width"], p["height"]))
            if p.get("qi_controls")
            else []
        )
        cfg = p["cfg_scale"] if p.get("cfg_scale") is not None else p["guidance_scale"]
        latents = sample_latents(
            transformer,
            version,
            cond=TextCond.from_list([p["qi_cond"]]),
            uncond=TextCond.from_list([p["qi_uncond"]]),
            latent_hw=(h, w),
            frames=5 if version.is_layered else 1,
            controls=controls,
            num_steps=p["sample_steps"],
            guidance_scale=float(cfg),
            flow_shift=p.get("discrete_flow_shift"),
            generator=generator,
            device=accelerator.device,
            dtype=dit_dtype,
        )
        pixels = vae.decode(latents[:, :, 0])
        return ((pixels[:, :3] + 1) / 2).clamp(0, 1)[:, :, None]


def _open_images(paths: list[str]) -> list[Any]:
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        except Exception as e:  # PIL raises many types
            raise UserError(f"{path}: cannot read the control image ({e})") from None
    return out
