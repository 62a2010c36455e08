"""Cache FLUX.2 VAE latents for training (specs/flux2.md §9, specs/dataset.md §6).

    python flux_2_cache_latents.py --dataset_config dataset.toml --vae ae.safetensors [--model_version klein-base-9b]

Writes one ``<stem>_<W>x<H>_f2.safetensors`` per image with ``latents_{h}x{w}_{dtype}`` (normalised, patchified,
128 channels) and ``latents_control_{i}_{h}x{w}_{dtype}`` per reference image (``control_directory`` / JSONL
``control_path_0..N``; ``no_resize_control`` and ``control_resolution`` apply). Latents do not depend on the model
version (all variants share the VAE); ``--model_version`` is accepted for upstream command lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from musubi_tuner.dataset.config import resolve_datasets
from musubi_tuner.dataset.latent_caching import LatentBatch, add_latent_cache_args, cache_latents
from musubi_tuner.flux_2.caching import encode_latent_batch
from musubi_tuner.flux_2.configs import ARCH, get_model_version, model_version_names
from musubi_tuner.flux_2.vae import Flux2Vae, load_flux2_vae
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """The ``flux_2_cache_latents.py`` command line."""
    p = argparse.ArgumentParser(description="Cache FLUX.2 VAE latents of an image dataset for training")
    add_latent_cache_args(p)
    p.add_argument(
        "--model_version",
        type=str,
        default="dev",
        choices=model_version_names(),
        help="FLUX.2 variant (latents are the same for all)",
    )
    return p


class LatentEncoder:
    """The ``encode`` callable of the driver: loads the VAE on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        default = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = parse_dtype(args.vae_dtype, default, flag="--vae_dtype")
        self.vae: Flux2Vae | None = None

    def __call__(self, batch: LatentBatch) -> list[dict[str, torch.Tensor]]:
        if self.vae is None:
            self.vae = load_flux2_vae(self.args.vae, dtype=self.dtype, device=self.device)
        return encode_latent_batch(self.vae, batch)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``flux_2_cache_latents.py``."""
    args = setup_parser().parse_args(argv)
    get_model_version(args.model_version)
    if not args.debug_mode and not Path(args.vae).expanduser().exists():
        raise UserError(f"{args.vae}: VAE not found (--vae)")
    for params in resolve_datasets(args.dataset_config, architecture=ARCH, args=args):
        if params.is_video:
            raise UserError(f"{params.table} of {params.config_path}: FLUX.2 trains on images; use an image dataset")
        if params.multiple_target:
            raise UserError(f"{params.table} of {params.config_path}: multiple_target is a Qwen-Image-Layered option")
    cache_latents(args, architecture=ARCH, encode=LatentEncoder(args))


if __name__ == "__main__":
    main()
