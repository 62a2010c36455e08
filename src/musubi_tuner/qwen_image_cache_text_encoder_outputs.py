"""Cache Qwen-Image text-encoder outputs for training (specs/qwen_image.md §5, §8).

    python qwen_image_cache_text_encoder_outputs.py --dataset_config dataset.toml --text_encoder path/to/qwen2.5-vl \
        [--model_version edit-2509] [--fp8_vl]

Writes one ``<stem>_<qi|qie|qil>_te.safetensors`` per item with ``varlen_vl_embed_{dtype}`` ``(L, 3584)`` (template
prefix dropped). Edit models show the item's control images to Qwen2.5-VL with the caption. The template is recorded
in the metadata, and ``--skip_existing`` re-encodes a cache written for another one.
"""

from __future__ import annotations

import argparse

import torch

from musubi_tuner.dataset.text_caching import TextItem, add_text_cache_args, cache_text_encoder_outputs
from musubi_tuner.qwen_image.caching import encode_text_items
from musubi_tuner.qwen_image.configs import ModelVersion, add_model_version_args, resolve_model_version
from musubi_tuner.qwen_image.text_encoders import QwenVLEncoder
from musubi_tuner.qwen_image.vl_loading import resolve_vl_source
from musubi_tuner.utils.devices import resolve_device
from musubi_tuner.utils.errors import cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

TEXT_ENCODER_DTYPE = torch.bfloat16


def setup_parser() -> argparse.ArgumentParser:
    """The ``qwen_image_cache_text_encoder_outputs.py`` command line."""
    p = argparse.ArgumentParser(description="Cache Qwen-Image text-encoder outputs (Qwen2.5-VL) of a dataset")
    add_text_cache_args(p)
    q = p.add_argument_group("Qwen-Image")
    q.add_argument(
        "--text_encoder",
        type=str,
        required=True,
        help="Qwen2.5-VL-7B-Instruct: ComfyUI single file, or local HF / diffusers directory",
    )
    q.add_argument("--fp8_vl", action="store_true", help="run Qwen2.5-VL with fp8 Linear weights (less memory)")
    q.add_argument(
        "--vl_processor",
        type=str,
        default=None,
        help="local directory with the Qwen2.5-VL preprocessor_config.json (edit models; default: next to --text_encoder)",
    )
    add_model_version_args(q)
    return p


def template_metadata(version: ModelVersion) -> dict[str, str]:
    """What a TE cache records so that one written for another template is re-encoded."""
    layout = "edit_plus" if version.multi_image else ("edit" if version.is_edit else "t2i")
    return {"qwen_image_template": layout}


class TextEncoderRun:
    """The ``encode`` callable: loads Qwen2.5-VL on first use."""

    def __init__(self, args: argparse.Namespace, version: ModelVersion):
        self.args = args
        self.version = version
        self.device = resolve_device(args.device)
        self.encoder: QwenVLEncoder | None = None

    def __call__(self, items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
        if self.encoder is None:
            self.encoder = QwenVLEncoder(
                self.args.text_encoder,
                device=self.device,
                dtype=TEXT_ENCODER_DTYPE,
                fp8_vl=self.args.fp8_vl,
                vl_processor=self.args.vl_processor,
            )
        return encode_text_items(self.encoder, items, self.version)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``qwen_image_cache_text_encoder_outputs.py``."""
    args = setup_parser().parse_args(argv)
    version = resolve_model_version(args)
    resolve_vl_source(args.text_encoder, args.vl_processor)  # a bad --text_encoder fails before the dataset is read
    run = TextEncoderRun(args, version)
    cache_text_encoder_outputs(args, architecture=version.short, encode=run, extra_metadata=template_metadata(version))


if __name__ == "__main__":
    main()
