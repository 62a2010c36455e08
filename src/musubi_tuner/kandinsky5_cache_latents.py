"""Cache Kandinsky 5 VAE latents for training (specs/kandinsky5.md §12.1, specs/dataset.md §6).

    python kandinsky5_cache_latents.py --dataset_config dataset.toml --vae path/to/hunyuan_vae [--nabla_resize]
    python kandinsky5_cache_latents.py --dataset_config images.toml --vae path/to/flux/vae --image_model_training

Writes one ``<stem>[_<start>-<count>]_<W>x<H>_k5.safetensors`` per image / clip with ``latents_{F}x{H}x{W}_{dtype}``
(already scaled), ``latents_image_2x{H}x{W}_{dtype}`` (first and last pixel frames, each encoded alone),
``latents_control_{i}_...`` (datasets with controls) and ``vae_scaling_factor_float32``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from musubi_tuner.dataset.architectures import arch_info
from musubi_tuner.dataset.config import resolve_datasets
from musubi_tuner.dataset.latent_caching import LatentBatch, add_latent_cache_args, cache_latents
from musubi_tuner.kandinsky5.caching import (
    VAE_DTYPE_DEFAULTS,
    encode_latent_batch,
    invalidate_mismatched_latent_caches,
    is_multi_frame,
    nabla_size,
    resolve_device,
)
from musubi_tuner.kandinsky5.configs import get_task_config
from musubi_tuner.kandinsky5.vae import K5Vae, load_k5_vae
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

ARCH = "k5"


def setup_parser() -> argparse.ArgumentParser:
    """The ``kandinsky5_cache_latents.py`` command line (common latent-cache options + the Kandinsky 5 ones)."""
    p = argparse.ArgumentParser(description="Cache Kandinsky 5 VAE latents of a dataset for training")
    add_latent_cache_args(p)
    k = p.add_argument_group("Kandinsky 5")
    k.add_argument(
        "--task",
        type=str,
        default=None,
        help="task key (optional): an Image Lite task (k5-lite-t2i-hd, k5-lite-i2i-hd) implies --image_model_training",
    )
    k.add_argument(
        "--nabla_resize",
        action="store_true",
        help="resize every frame up to the next multiple of 128 px per side after bucketing (NABLA attention needs it)",
    )
    k.add_argument(
        "--image_model_training",
        action="store_true",
        help="Image Lite (T2I/I2I): encode with the FLUX.1 VAE given by --vae (single-frame items only)",
    )
    k.add_argument(
        "--disable_vae_workaround",
        action="store_true",
        help="Blissful compatibility; no effect: this VAE never applies the approximate mid-block memory patch",
    )
    k.add_argument(
        "--vae_tiling",
        action="store_true",
        help="tiled VAE encoding to save memory on large frames (tiles blend, so latents differ slightly)",
    )
    k.add_argument(
        "--vae_spatial_tile_sample_min_size",
        type=int,
        default=None,
        help="tile size in pixels with --vae_tiling (default 256, stride 3/4 of it)",
    )
    k.add_argument(
        "--vae_posterior",
        choices=("sample", "mode"),
        default="sample",
        help="latents from a posterior sample (official, musubi; default) or its mode (deterministic)",
    )
    k.add_argument("--seed", type=int, default=None, help="seed of the posterior samples (reproducible caches)")
    return p


def validate_args(args: argparse.Namespace) -> str:
    """Check option combinations before any media or model is touched; returns the VAE kind."""
    image = bool(args.image_model_training)
    if args.task is not None:
        task = get_task_config(args.task)
        if task.is_image and not image:
            logger.info(f"--task {task.name} is an Image Lite task: using the FLUX.1 VAE (--image_model_training)")
            image = args.image_model_training = True
        elif image and not task.is_image:
            raise UserError(f"--image_model_training is for the Image Lite tasks; --task {task.name} is a video task")
    if image and args.nabla_resize:
        raise UserError("--nabla_resize cannot be combined with --image_model_training (Image Lite uses dense attention)")
    if args.vae_spatial_tile_sample_min_size is not None:
        size = args.vae_spatial_tile_sample_min_size
        if not args.vae_tiling:
            raise UserError("--vae_spatial_tile_sample_min_size needs --vae_tiling")
        if size < 64 or size % 32:
            raise UserError(f"--vae_spatial_tile_sample_min_size {size}: use a multiple of 32, at least 64")
    if args.seed is not None and args.vae_posterior == "mode":
        logger.warning("--seed has no effect with --vae_posterior mode")
    if args.disable_vae_workaround:
        logger.info(
            "--disable_vae_workaround: nothing to disable; this VAE always runs the exact diffusers mid-block attention "
            "(use --vae_tiling to save memory)"
        )
    if not args.debug_mode and not Path(args.vae).expanduser().exists():
        raise UserError(f"{args.vae}: VAE not found (--vae)")
    return "flux1" if image else "hunyuan_video"


class LatentEncoder:
    """The ``encode`` callable given to the shared driver: loads the VAE on first use, then ``encode_latent_batch``."""

    def __init__(self, args: argparse.Namespace, kind: str):
        self.args = args
        self.kind = kind
        self.device = resolve_device(args.device)
        self.dtype = parse_dtype(args.vae_dtype, VAE_DTYPE_DEFAULTS[kind], flag="--vae_dtype")
        self.vae: K5Vae | None = None
        self.generator: torch.Generator | None = None
        self._logged_sizes: set[tuple[int, int]] = set()

    def load(self) -> K5Vae:
        if self.vae is None:
            self.vae = load_k5_vae(self.args.vae, kind=self.kind, dtype=self.dtype, device=self.device)
            if self.args.vae_tiling:
                size = self.args.vae_spatial_tile_sample_min_size or 256
                self.vae.enable_tiling(tile_size=size, tile_stride=size * 3 // 4)
            if self.args.seed is not None:
                self.generator = torch.Generator(device=self.device).manual_seed(self.args.seed)
        return self.vae

    def __call__(self, batch: LatentBatch) -> list[dict[str, torch.Tensor]]:
        vae = self.load()
        if self.kind == "flux1" and batch.frame_count != 1:
            raise UserError(
                f"{batch.dataset.table} of {batch.dataset.config_path}: --image_model_training encodes single images, "
                f"but this dataset yields {batch.frame_count}-frame clips (use an image dataset or target_frames = [1])"
            )
        if self.args.nabla_resize and batch.bucket not in self._logged_sizes:
            self._logged_sizes.add(batch.bucket)
            w, h = batch.bucket
            nw, nh = nabla_size(w, h)
            if (nw, nh) != (w, h):
                logger.info(f"--nabla_resize: bucket {w}x{h} resized to {nw}x{nh} (next multiple of 128)")
        return encode_latent_batch(
            vae,
            batch,
            nabla_resize=self.args.nabla_resize,
            sample=self.args.vae_posterior == "sample",
            generator=self.generator,
        )


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``kandinsky5_cache_latents.py``."""
    args = setup_parser().parse_args(argv)
    kind = validate_args(args)
    encoder = LatentEncoder(args, kind)
    logger.info(f"VAE {kind} ({encoder.dtype}) on {encoder.device}; latents from the posterior {args.vae_posterior}")
    arch = arch_info(ARCH)
    datasets = resolve_datasets(args.dataset_config, architecture=arch, args=args)
    for params in datasets:
        if params.multiple_target:
            raise UserError(
                f"{params.table} of {params.config_path}: multiple_target (layered RGBA targets) is a Qwen-Image-Layered "
                "option; Kandinsky 5 trains on one RGB target per item"
            )
        if kind == "flux1" and is_multi_frame(params):
            raise UserError(
                f"{params.table} of {params.config_path}: --image_model_training (Image Lite) encodes single images; "
                f"this video dataset yields clips of {max(params.target_frames)} frames (use target_frames = [1])"
            )
    if args.skip_existing and not args.debug_mode:
        n = invalidate_mismatched_latent_caches(datasets, arch, nabla_resize=args.nabla_resize, vae_kind=kind)
        if n:
            logger.info(f"{n} existing latent caches were written with other settings and will be re-encoded")
    cache_latents(args, architecture=ARCH, encode=encoder)


if __name__ == "__main__":
    main()
