"""LoRA training for FLUX.2 (dev and klein) on the common trainer (specs/flux2.md §9, specs/training.md).

    accelerate launch flux_2_train_network.py --model_version dev --dit flux2-dev.safetensors --vae ae.safetensors \\
        --text_encoder Mistral-Small-3.2/ --dataset_config dataset.toml --network_module networks.lora_flux_2 \\
        --timestep_sampling flux2_shift --fp8_base --fp8_scaled --blocks_to_swap 10 --gradient_checkpointing ...

Reads only caches (``flux_2_cache_latents.py``, ``flux_2_cache_text_encoder_outputs.py``). A step packs the target
latents to tokens, appends the item's reference latents (``latents_control_{i}``, ids ``t = 10 + 10·i``, built per
item), feeds ``t`` in [0, 1] and — dev only — an embedded guidance of ``--guidance_scale`` (1.0 by default, recorded
in the LoRA metadata), and compares the target-token prediction with ``noise − latents``. The hooks live in
``flux_2.trainer``, imported after parsing so that ``--help`` and option errors stay fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from musubi_tuner.flux_2.cli_args import add_text_encoder_args
from musubi_tuner.flux_2.configs import model_version_names
from musubi_tuner.training.args import read_config_from_file, setup_parser_common
from musubi_tuner.utils.errors import cli_entry

# the trainer itself (torch, the model code) is imported after parsing: ``--help`` and option errors stay fast
_TRAINER_NAMES = ("Flux2NetworkTrainer", "build_training_inputs", "reference_latents")


def __getattr__(name: str) -> Any:
    """``Flux2NetworkTrainer`` (and the step helpers) from ``flux_2.trainer``, imported on first use."""
    if name in _TRAINER_NAMES:
        from musubi_tuner.flux_2 import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_flux2_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The FLUX.2 options of the trainer; the common ones come from the base parser."""
    g = parser.add_argument_group("FLUX.2")
    g.add_argument("--model_version", type=str, default="dev", choices=model_version_names(), help="FLUX.2 variant (dev)")
    g.add_argument(
        "--dit_dtype", type=str, default=None, choices=("bfloat16", "float16", "float32"), help="DiT compute dtype (bfloat16)"
    )
    add_text_encoder_args(parser, required=False)
    return parser


def setup_parser() -> argparse.ArgumentParser:
    """The ``flux_2_train_network.py`` command line."""
    parser = setup_parser_common()
    parser.description = "Train a LoRA for FLUX.2 from cached latents and text-encoder outputs"
    return add_flux2_train_args(parser)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``flux_2_train_network.py`` (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = setup_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args = read_config_from_file(args, parser, argv)
    from musubi_tuner.flux_2.trainer import Flux2NetworkTrainer

    Flux2NetworkTrainer().train(args)


if __name__ == "__main__":
    main()
