"""Cache Wan text-encoder outputs (UMT5-XXL) for training (specs/wan.md §6, §9).

    python wan_cache_text_encoder_outputs.py --dataset_config dataset.toml --t5 models_t5_umt5-xxl-enc-bf16.pth [--fp8_t5]

Writes one ``<stem>_wan_te.safetensors`` per item with ``varlen_t5_bfloat16`` ``(L, 4096)`` (the prompt's tokens incl.
``</s>``, at most 512); the trainer zero-pads to 512 as the references do.
"""

from __future__ import annotations

import argparse

import torch

from musubi_tuner.dataset.text_caching import TextItem, add_text_cache_args, cache_text_encoder_outputs
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.errors import cli_entry
from musubi_tuner.utils.log import get_logger
from musubi_tuner.wan.caching import encode_text_items
from musubi_tuner.wan.text_encoders import T5_MAX_LENGTH

logger = get_logger(__name__)

ARCH = "wan"


def setup_parser() -> argparse.ArgumentParser:
    """The ``wan_cache_text_encoder_outputs.py`` command line."""
    p = argparse.ArgumentParser(description="Cache Wan UMT5 text-encoder outputs of a dataset")
    add_text_cache_args(p)
    w = p.add_argument_group("Wan")
    w.add_argument("--t5", type=str, required=True, help="UMT5-XXL: official models_t5_umt5-xxl-enc-bf16.pth or an HF directory")
    w.add_argument("--t5_tokenizer", type=str, default=None, help="UMT5 tokenizer dir (default: google/umt5-xxl next to --t5)")
    w.add_argument(
        "--fp8_t5", action="store_true", help="store the T5 Linear weights in fp8 (less memory, slightly different states)"
    )
    return p


class TextEncoderRun:
    """Loads UMT5 on the first caption to encode."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        self.encoder = None

    def metadata(self, _params) -> dict[str, str]:
        return {"wan_t5_max_length": str(T5_MAX_LENGTH), "wan_fp8_t5": str(bool(self.args.fp8_t5))}

    def __call__(self, items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
        from musubi_tuner.wan.text_encoders import WanT5Encoder

        if self.encoder is None:
            self.encoder = WanT5Encoder.load(
                self.args.t5, tokenizer=self.args.t5_tokenizer, dtype=torch.bfloat16, device=self.device, fp8=self.args.fp8_t5
            )
        return encode_text_items(self.encoder, items)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``wan_cache_text_encoder_outputs.py``."""
    args = setup_parser().parse_args(argv)
    run = TextEncoderRun(args)
    cache_text_encoder_outputs(args, architecture=ARCH, encode=run, extra_metadata=run.metadata)


if __name__ == "__main__":
    main()
