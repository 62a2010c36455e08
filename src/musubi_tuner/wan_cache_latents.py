"""Cache Wan VAE latents for training (specs/wan.md §8, §9; specs/dataset.md §6).

    python wan_cache_latents.py --dataset_config dataset.toml --vae Wan2.1_VAE.pth [--i2v] [--clip models_clip_...pth]

Writes one ``<stem>[_<start>-<count>]_<W>x<H>_wan.safetensors`` per image / clip with ``latents_{F}x{H}x{W}_{dtype}``
(normalised), with ``--i2v`` ``latents_image_...`` (mask 4 + first-frame latent 16), with ``--clip`` ``clip_float16``
``(257, 1280)`` (Wan 2.1 I2V), and ``latents_control_...`` for datasets with control videos (Fun-Control). With
``--task flf2v-14B`` the condition is the first and last frame of each clip and ``clip_float16`` is ``(2, 257, 1280)``.
Video datasets are converted to 16 fps by the shared frame extraction. With ``--one_frame`` (image datasets with
control images and ``fp_1f_target_index`` / ``fp_1f_clean_indices``) the one-frame layout of ``wan.one_frame`` is
cached, with ``f_indices_int32``.
"""

from __future__ import annotations

import argparse

import torch

from musubi_tuner.dataset.latent_caching import LatentBatch, add_latent_cache_args, cache_latents
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger
from musubi_tuner.wan.caching import encode_latent_batch
from musubi_tuner.wan.configs import get_task_config, task_names

logger = get_logger(__name__)

ARCH = "wan"


def setup_parser() -> argparse.ArgumentParser:
    """The ``wan_cache_latents.py`` command line."""
    p = argparse.ArgumentParser(description="Cache Wan VAE latents of a dataset for training")
    add_latent_cache_args(p)
    w = p.add_argument_group("Wan")
    w.add_argument(
        "--task", type=str, default=None, help=f"task (optional; ti2v-5B selects the Wan 2.2 VAE): {', '.join(task_names())}"
    )
    w.add_argument(
        "--vae_cache_cpu",
        action="store_true",
        help="keep the VAE's causal feature cache in CPU memory during encode / decode (less VRAM, slower)",
    )
    w.add_argument("--i2v", action="store_true", help="also cache the I2V condition (mask + first-frame latent) for I2V / A14B I2V")
    w.add_argument(
        "--clip", type=str, default=None, help="CLIP image encoder (open-clip .pth or HF dir): cache 2.1 I2V image tokens"
    )
    w.add_argument(
        "--one_frame",
        action="store_true",
        help="one-frame training caches: image datasets with control images and fp_1f_target_index / fp_1f_clean_indices",
    )
    return p


def validate_args(args: argparse.Namespace) -> str:
    """Check the options before any media or model is touched; returns the VAE kind."""
    kind = "wan2.1"
    args.flf2v = False
    if args.task is not None:
        task = get_task_config(args.task)
        kind = task.vae
        args.flf2v = task.flf2v
        if task.i2v and not args.i2v:
            logger.info(f"--task {task.name} is image-to-video: caching the I2V condition (--i2v)")
            args.i2v = True
        if task.clip and not args.clip:
            raise UserError(f"--task {task.name} (Wan 2.1 I2V / FLF2V) needs --clip to cache the image tokens")
        if args.clip and not task.clip:
            raise UserError(f"--clip: task {task.name} takes no CLIP image tokens (only Wan 2.1 I2V / FLF2V do)")
    if args.clip and not args.i2v:
        args.i2v = True
    if args.one_frame:
        from musubi_tuner.wan.one_frame import check_one_frame_task

        if args.task is not None:
            check_one_frame_task(get_task_config(args.task), "--one_frame")
        args.i2v = True
    return kind


class LatentEncoder:
    """Loads the VAE (and CLIP) on first use, then ``encode_latent_batch``."""

    def __init__(self, args: argparse.Namespace, kind: str):
        self.args = args
        self.kind = kind
        self.device = resolve_device(args.device)
        self.dtype = parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype")
        self.vae = None
        self.clip = None

    def __call__(self, batch: LatentBatch) -> list[dict[str, torch.Tensor]]:
        from musubi_tuner.wan.text_encoders import WanClipEncoder
        from musubi_tuner.wan.vae import load_wan_vae

        if self.vae is None:
            self.vae = load_wan_vae(
                self.args.vae, kind=self.kind, dtype=self.dtype, device=self.device, cache_on_cpu=self.args.vae_cache_cpu
            )
            if self.args.clip:
                self.clip = WanClipEncoder.load(
                    self.args.clip, dtype=torch.float16 if self.device.type == "cuda" else torch.float32, device=self.device
                )
        return encode_latent_batch(
            self.vae, batch, i2v=self.args.i2v, clip=self.clip, flf2v=self.args.flf2v, one_frame=self.args.one_frame
        )


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``wan_cache_latents.py``."""
    args = setup_parser().parse_args(argv)
    kind = validate_args(args)
    cache_latents(args, architecture=ARCH, encode=LatentEncoder(args, kind))


if __name__ == "__main__":
    main()
