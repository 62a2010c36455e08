"""Cache Qwen-Image VAE latents for training (specs/qwen_image.md §8, specs/dataset.md §6).

    python qwen_image_cache_latents.py --dataset_config dataset.toml --vae qwen_image_vae.safetensors [--model_version edit-2509]

Writes one ``<stem>_<W>x<H>_<qi|qie|qil>.safetensors`` per image with ``latents_{F}x{H}x{W}_{dtype}`` (F = 1; Layered:
composite + layers) and ``latents_control_{i}_...`` for every control image.
"""

from __future__ import annotations

import argparse

import torch

from musubi_tuner.dataset.latent_caching import LatentBatch, add_latent_cache_args, cache_latents
from musubi_tuner.qwen_image.caching import encode_latent_batch
from musubi_tuner.qwen_image.configs import ModelVersion, add_model_version_args, resolve_model_version
from musubi_tuner.qwen_image.vae import QwenImageVae
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """The ``qwen_image_cache_latents.py`` command line (common latent-cache options + the model version)."""
    p = argparse.ArgumentParser(description="Cache Qwen-Image VAE latents of a dataset for training")
    add_latent_cache_args(p)
    add_model_version_args(p.add_argument_group("Qwen-Image"))
    return p


class LatentEncoder:
    """The ``encode`` callable of the shared driver: loads the VAE on first use."""

    def __init__(self, args: argparse.Namespace, version: ModelVersion):
        self.args = args
        self.version = version
        self.device = resolve_device(args.device)
        self.dtype = parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype")
        self.vae: QwenImageVae | None = None

    def __call__(self, batch: LatentBatch) -> list[dict[str, torch.Tensor]]:
        if self.vae is None:
            self.vae = QwenImageVae.load(self.args.vae, layered=self.version.is_layered, dtype=self.dtype, device=self.device)
        return encode_latent_batch(self.vae, batch, self.version)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``qwen_image_cache_latents.py``."""
    args = setup_parser().parse_args(argv)
    version = resolve_model_version(args)
    encoder = LatentEncoder(args, version)
    logger.info(f"Qwen-Image {version.name}: VAE ({encoder.dtype}) on {encoder.device}")
    cache_latents(args, architecture=version.short, encode=encoder)


if __name__ == "__main__":
    main()
