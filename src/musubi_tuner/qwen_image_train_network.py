"""LoRA training for Qwen-Image on the common trainer (specs/qwen_image.md §8, specs/training.md).

    accelerate launch --config_file configs/accelerate_single.yaml qwen_image_train_network.py \\
        --dit qwen_image_bf16.safetensors --vae qwen_image_vae.safetensors --dataset_config dataset.toml \\
        --network_module networks.lora_qwen_image --network_dim 16 --timestep_sampling qwen_shift \\
        --output_dir out --output_name my_qwen_lora [--model_version edit-2509]

Reads only caches (``qwen_image_cache_latents.py``, ``qwen_image_cache_text_encoder_outputs.py``). Text of a batch is
zero-padded and always masked; edit controls are appended after the target tokens; Layered trains composite + layers
(``--remove_first_image_from_target`` drops the composite from the target).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from musubi_tuner.qwen_image.configs import add_model_version_args
from musubi_tuner.training.args import read_config_from_file, setup_parser_common
from musubi_tuner.utils.errors import cli_entry

# the trainer itself (torch, the model code) is imported after parsing: ``--help`` and option errors stay fast
_TRAINER_NAMES = ("QwenImageNetworkTrainer", "ARCH_FULL")


def __getattr__(name: str) -> Any:
    """``QwenImageNetworkTrainer`` (and ``ARCH_FULL``) from ``qwen_image.trainer``, imported on first use."""
    if name in _TRAINER_NAMES:
        from musubi_tuner.qwen_image import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_qwen_image_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Qwen-Image options of the trainer (musubi-tuner's names); the common ones come from the base parser."""
    q = parser.add_argument_group("Qwen-Image")
    add_model_version_args(q)
    q.add_argument("--text_encoder", type=str, default=None, help="Qwen2.5-VL file or directory (only to encode --sample_prompts)")
    q.add_argument("--fp8_vl", action="store_true", help="sample prompts: Qwen2.5-VL with fp8 Linear weights")
    q.add_argument("--vl_processor", type=str, default=None, help="local Qwen2.5-VL processor directory (edit sample prompts)")
    q.add_argument("--num_layers", type=int, default=None, help="load only the first N transformer blocks (pruned models)")
    q.add_argument(
        "--remove_first_image_from_target",
        action="store_true",
        help="Layered: do not train on the first target frame (the composite); only the layers are targets",
    )
    q.add_argument(
        "--dit_dtype", type=str, default=None, choices=("bfloat16", "float16", "float32"), help="DiT compute dtype (bfloat16)"
    )
    return parser


def setup_parser() -> argparse.ArgumentParser:
    """The ``qwen_image_train_network.py`` command line: common trainer options + the Qwen-Image group."""
    parser = setup_parser_common()
    parser.description = "Train a LoRA for Qwen-Image from cached latents and text-encoder outputs"
    return add_qwen_image_train_args(parser)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``qwen_image_train_network.py`` (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = setup_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args = read_config_from_file(args, parser, argv)
    from musubi_tuner.qwen_image.trainer import QwenImageNetworkTrainer

    QwenImageNetworkTrainer().train(args)


if __name__ == "__main__":
    main()
