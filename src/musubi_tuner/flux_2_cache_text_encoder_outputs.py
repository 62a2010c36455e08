"""Cache FLUX.2 text-encoder outputs for training (specs/flux2.md §7, §9).

    python flux_2_cache_text_encoder_outputs.py --dataset_config dataset.toml --model_version klein-9b \\
        --text_encoder Qwen3-8B/ [--fp8_text_encoder]

Writes one ``<stem>_f2_te.safetensors`` per item with ``ctx_vec_{dtype}`` ``(512, 3·hidden)``. The encoder (kind and
width), its layers and the token budget are recorded in the metadata; ``--skip_existing`` re-encodes a cache made
with another encoder, and the trainer refuses caches that do not fit its ``--model_version``.
"""

from __future__ import annotations

import argparse

import torch

from musubi_tuner.dataset.text_caching import TextItem, add_text_cache_args, cache_text_encoder_outputs
from musubi_tuner.flux_2.caching import encode_text_items
from musubi_tuner.flux_2.cli_args import add_text_encoder_args
from musubi_tuner.flux_2.configs import ARCH, get_model_version, model_version_names
from musubi_tuner.flux_2.text_encoders import Flux2TextEncoder
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.errors import cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """The ``flux_2_cache_text_encoder_outputs.py`` command line."""
    p = argparse.ArgumentParser(description="Cache FLUX.2 text-encoder outputs of a dataset")
    add_text_cache_args(p)
    p.add_argument("--model_version", type=str, default="dev", choices=model_version_names(), help="FLUX.2 variant (dev)")
    add_text_encoder_args(p, required=True)
    return p


class TextEncoderRun:
    """Loads the encoder on the first caption to encode and records it in every cache."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.version = get_model_version(args.model_version)
        self.device = torch.device("cpu") if args.text_encoder_cpu else resolve_device(args.device)
        self.encoder = self._load()

    def _load(self) -> Flux2TextEncoder:
        dtype = torch.bfloat16
        return Flux2TextEncoder(
            self.args.text_encoder,
            self.version,
            device=self.device,
            dtype=dtype,
            fp8=self.args.fp8_text_encoder,
            tokenizer=self.args.tokenizer,
        )

    def __call__(self, items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
        return encode_text_items(self.encoder, items)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``flux_2_cache_text_encoder_outputs.py``."""
    args = setup_parser().parse_args(argv)
    run = TextEncoderRun(args)
    cache_text_encoder_outputs(args, architecture=ARCH, encode=run, extra_metadata=run.encoder.cache_metadata())


if __name__ == "__main__":
    main()
