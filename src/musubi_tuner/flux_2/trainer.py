"""The FLUX.2 hooks of the common trainer (``NetworkTrainer``): DiT/VAE loading, the DiT input of a step (packed
target tokens + the item's reference latents, ids built per item), dev's embedded training guidance, metadata and
sampling during training (specs/flux2.md §9, specs/training.md).

``flux_2_train_network.py`` builds the command line and imports this module only after parsing, so ``--help`` and
option errors do not pay for importing torch and the model code.
"""

from __future__ import annotations

import argparse
import gc
import re
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.flux_2.configs import ARCH, ARCH_FULL, ModelVersion, get_model_version
from musubi_tuner.flux_2.sampling import build_img_ids, build_txt_ids, pack_latents, unpack_latents
from musubi_tuner.hv_train_network import DiTOutput, NetworkTrainer
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

_CONTROL_KEY = re.compile(r"^latents_control_(\d+)$")


def reference_latents(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The batch's reference latents ``latents_control_0..N`` in order (each ``(B, 128, hi, wi)``)."""
    found = {int(m.group(1)): v for k, v in batch.items() if (m := _CONTROL_KEY.match(k)) and torch.is_tensor(v)}
    if sorted(found) != list(range(len(found))):
        raise UserError(f"reference latents of a batch are not numbered 0..N-1: {sorted(found)}")
    return [found[i] for i in range(len(found))]


def build_training_inputs(noisy: torch.Tensor, refs: list[torch.Tensor], ctx: torch.Tensor, device: torch.device):
    """Tokens and ids of one training batch; ids are built per item (each item's own reference shapes)."""
    b, _, h, w = noisy.shape
    tokens = torch.cat([pack_latents(noisy), *[pack_latents(r.to(device, noisy.dtype)) for r in refs]], dim=1)
    img_ids = torch.cat([build_img_ids((h, w), [tuple(r[i].shape[-2:]) for r in refs], device=device) for i in range(b)])
    txt_ids = build_txt_ids(ctx.shape[1], device=device).expand(b, -1, -1)
    return tokens, img_ids, txt_ids


class Flux2NetworkTrainer(NetworkTrainer):
    """The FLUX.2 hooks of ``NetworkTrainer``."""

    def __init__(self) -> None:
        super().__init__()
        self.version: ModelVersion | None = None
        self.default_vae_dtype = torch.float32
        self._vae: Any = None

    @property
    def architecture(self) -> str:
        return ARCH

    @property
    def architecture_full_name(self) -> str:
        return ARCH_FULL

    def handle_model_specific_args(self, args: argparse.Namespace) -> None:
        self.version = get_model_version(args.model_version)
        self.default_guidance_scale = self.version.guidance
        self.default_discrete_flow_shift = 1.0  # sampling uses the empirical-mu schedule; shift is not used
        self.vae_frame_stride = 1
        self.resolution_step = 16
        if not args.metadata_arch:  # variant-specific ModelSpec architecture (specs/flux2.md §1)
            args.metadata_arch = f"{self.version.modelspec_architecture}/lora"
        if not args.metadata_reso:  # product rule: 1024x1024 (the reference writes 1280x720)
            args.metadata_reso = "1024,1024"
        if args.fp8_base and not args.fp8_scaled:
            logger.info("--fp8_base: FLUX.2 uses block-scaled fp8 (--fp8_scaled)")
            args.fp8_scaled = True
        if args.guidance_scale != 1.0 and not self.version.guidance_embed:
            logger.warning(f"--guidance_scale is dev's embedded training guidance; --model_version {self.version.name} has none")
        if args.sample_prompts:
            if not args.text_encoder:
                raise UserError("--sample_prompts needs --text_encoder (sample prompts are encoded once at start)")
            if not args.vae:
                raise UserError("--sample_prompts needs --vae to decode the samples")

    def on_datasets_loaded(self, args: argparse.Namespace, train_group: Any, val_group: Any | None) -> None:
        from musubi_tuner.flux_2.caching import check_te_caches

        assert self.version is not None
        paths = [
            item.te_path for group in (train_group, val_group) if group is not None for ds in group.datasets for item in ds.items
        ]
        check_te_caches(paths, self.version)
        self._te_paths = paths[:1]

    def load_transformer(self, accelerator, args, dit_path, attn_mode, split_attn, loading_device, dit_weight_dtype):
        from musubi_tuner.flux_2.models.loading import load_dit

        assert self.version is not None
        if split_attn:
            raise UserError("--split_attn is not supported for FLUX.2 (no attention mask: every text token is attended)")
        compute = parse_dtype(args.dit_dtype, torch.bfloat16, flag="--dit_dtype")
        return load_dit(
            self.version,
            dit_path,
            device=loading_device,
            dtype=compute,
            fp8_base=bool(args.fp8_base),
            fp8_scaled=bool(args.fp8_scaled),
            attn_mode=attn_mode,
        )

    def on_transformer_loaded(self, args: argparse.Namespace, transformer: torch.nn.Module) -> None:
        from musubi_tuner.flux_2.caching import check_te_caches

        assert self.version is not None
        check_te_caches(getattr(self, "_te_paths", []), self.version, context_dim=transformer.config["context_in_dim"])

    def load_vae(self, args: argparse.Namespace, vae_dtype: torch.dtype, vae_path: str | None) -> Any:
        from musubi_tuner.flux_2.vae import load_flux2_vae

        if self._vae is None and vae_path:
            self._vae = load_flux2_vae(vae_path, dtype=vae_dtype)
        return self._vae

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype):
        assert self.version is not None
        device = accelerator.device
        if latents.dim() != 4:
            raise UserError(f"FLUX.2 latent caches hold (128, H, W) images; got a batch of shape {tuple(latents.shape)}")
        ctx = batch["ctx_vec"].to(device, network_dtype)
        refs = reference_latents(batch)
        tokens, img_ids, txt_ids = build_training_inputs(noisy_model_input, refs, ctx, device)
        b, _, h, w = latents.shape
        guidance = torch.full((b,), float(args.guidance_scale), device=device) if self.version.guidance_embed else None
        with accelerator.autocast():
            pred = transformer(tokens.to(network_dtype), img_ids, ctx, txt_ids, timesteps.to(device) / 1000.0, guidance)
        pred = unpack_latents(pred[:, : h * w], h, w)
        return DiTOutput(pred=pred, target=noise - latents, extra={})

    def extra_metadata(self, args: argparse.Namespace) -> dict[str, str]:
        assert self.version is not None
        md = {"ss_flux2_model_version": self.version.name}
        if self.version.guidance_embed:
            md["ss_guidance_scale"] = str(args.guidance_scale)
        return md

    # -- sampling during training ----------------------------------------------------------------------------------

    def process_sample_prompts(self, args: argparse.Namespace, accelerator: Any, sample_prompts: str) -> list[dict[str, Any]]:
        """Parse the prompt file, encode every prompt and negative once, free the encoder; encode --ci references."""
        from musubi_tuner.flux_2.text_encoders import Flux2TextEncoder
        from musubi_tuner.training.sampling import load_sample_prompts

        version = self.version
        assert version is not None
        prompts = load_sample_prompts(sample_prompts)
        texts: set[str] = set()
        for p in prompts:
            texts.add(p.get("prompt") or "")
            if version.uses_cfg:
                texts.add(p.get("negative_prompt") or "")
        device = torch.device("cpu") if args.text_encoder_cpu else accelerator.device
        encoder = Flux2TextEncoder(args.text_encoder, version, device=device, fp8=args.fp8_text_encoder, tokenizer=args.tokenizer)
        try:
            ordered = sorted(texts)
            embeds = dict(zip(ordered, encoder.encode(ordered).cpu()))
        finally:
            encoder.close()
            del encoder
            gc.collect()
        for p in prompts:
            p["f2_ctx"] = embeds[p.get("prompt") or ""]
            p["f2_neg"] = embeds[p.get("negative_prompt") or ""] if version.uses_cfg else None
        todo = [p for p in prompts if p.get("control_image_path")]
        if todo:
            from musubi_tuner.flux_2.pipeline import encode_reference_images

            vae = self.load_vae(args, parse_dtype(args.vae_dtype, self.default_vae_dtype, flag="--vae_dtype"), args.vae)
            base = Path(sample_prompts).parent
            for p in todo:
                paths = [str(Path(c) if Path(c).is_absolute() or Path(c).exists() else base / c) for c in p["control_image_path"]]
                size = (int(p.get("width") or 256), int(p.get("height") or 256))
                p["f2_refs"] = encode_reference_images(vae, paths, size, flag="--ci")
        logger.info(f"encoded {len(texts)} sample prompts / negatives once; text encoder freed")
        return prompts

    def do_inference(self, accelerator, args, sample_parameter, vae, dit_dtype, transformer, generator):
        from musubi_tuner.flux_2.pipeline import decode_latents, sample_latents

        assert self.version is not None
        p = sample_parameter
        cfg = p["cfg_scale"] if p.get("cfg_scale") is not None else p["guidance_scale"]
        latents = sample_latents(
            transformer,
            self.version,
            ctx=p["f2_ctx"],
            ctx_neg=p.get("f2_neg"),
            latent_hw=(p["height"] // 16, p["width"] // 16),
            num_steps=p["sample_steps"],
            guidance=float(cfg),
            generator=generator,
            device=accelerator.device,
            references=p.get("f2_refs") or (),
            progress=False,
        )
        if vae is None:
            return None
        vae.to(accelerator.device)
        try:
            image = decode_latents(vae, latents)
        finally:
            vae.to("cpu")
        return image[:, None]
