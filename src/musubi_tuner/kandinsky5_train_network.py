"""LoRA training for Kandinsky 5 on the common trainer (specs/kandinsky5.md §9–§12.3, specs/training.md).

    accelerate launch --config_file configs/accelerate_single.yaml kandinsky5_train_network.py \\
        --task k5-lite-t2v-5s-sd --dit kandinsky5lite_t2v_sft_5s.safetensors --dataset_config dataset.toml \\
        --network_module networks.lora_kandinsky --network_dim 32 --network_alpha 32 --sdpa \\
        --timestep_sampling shift --discrete_flow_shift 5.0 --output_dir out --output_name my_k5_lora

Reads only caches (``kandinsky5_cache_latents.py``, ``kandinsky5_cache_text_encoder_outputs.py``). The DiT input of a
step is built by ``kandinsky5.training.build_training_dit_inputs`` (the I2V layout of ``kandinsky5.conditioning``, the
same as inference); samples during training go through ``kandinsky5.pipeline.sample_latents`` with every prompt and
negative encoded once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from musubi_tuner.kandinsky5.configs import NABLA_METHODS, task_names
from musubi_tuner.training.args import read_config_from_file, setup_parser_common
from musubi_tuner.utils.errors import cli_entry

# the trainer itself (torch, the model code) is imported after parsing: ``--help`` and option errors stay fast
_TRAINER_NAMES = ("Kandinsky5NetworkTrainer", "ARCH", "ARCH_FULL", "TEXT_ENCODER_PLACEMENT")


def __getattr__(name: str) -> Any:
    """``Kandinsky5NetworkTrainer`` (and its constants) from ``kandinsky5.trainer``, imported on first use."""
    if name in _TRAINER_NAMES:
        from musubi_tuner.kandinsky5 import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_k5_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Kandinsky 5 options of the trainer (specs/kandinsky5.md §12.3); the common ones come from the base parser."""
    k = parser.add_argument_group("Kandinsky 5")
    k.add_argument("--task", type=str, default=None, help=f"task key (required): {', '.join(task_names())}")
    k.add_argument(
        "--override_dit",
        type=str,
        default=None,
        help="JSON object overriding DiT config fields, e.g. '{\"axes_dims\": [16, 24, 24]}'",
    )
    k.add_argument(
        "--dit_dtype", type=str, default=None, choices=("bfloat16", "float16", "float32"), help="DiT compute dtype (bfloat16)"
    )
    k.add_argument("--text_encoder_qwen", type=str, default=None, help="Qwen2.5-VL-7B-Instruct (HF id or dir) for sample prompts")
    k.add_argument("--text_encoder_clip", type=str, default=None, help="CLIP ViT-L/14 (HF id or dir) for sample prompts")
    k.add_argument("--quantized_qwen", action="store_true", help="sample prompts: Qwen2.5-VL in NF4 (CUDA, bitsandbytes)")
    k.add_argument("--text_encoder_cpu", action="store_true", help="sample prompts: run Qwen2.5-VL on the CPU")
    k.add_argument("--text_encoder_auto", action="store_true", help="sample prompts: place Qwen2.5-VL with device_map='auto'")
    k.add_argument(
        "--offload_dit_during_sampling", action="store_true", help="move the DiT to the CPU while a sample is VAE-decoded"
    )
    k.add_argument(
        "--no_vae_load",
        action="store_true",
        help="never load the VAE for samples: save sample latents (<name>_latent.safetensors, decode later with "
        "kandinsky5_generate_video.py --decode_from_latent); I2V sample images still need --vae once to be encoded",
    )
    k.add_argument("--scheduler_scale", type=float, default=None, help="sampling shift of the samples (default: the task's)")
    k.add_argument(
        "--i2v_mode", type=str, default=None, choices=("first", "first_last"), help="I2V tasks: conditioned frames (first)"
    )
    k.add_argument(
        "--loss_on_conditioned_frames",
        action="store_true",
        help="I2V: also compute the loss on the conditioned frames (default: excluded, inference discards them)",
    )
    k.add_argument(
        "--force_nabla_attention",
        "--use_nabla_attention",
        dest="force_nabla_attention",
        action="store_true",
        help="train with NABLA sparse attention (any task); NABLA tasks use it by default",
    )
    k.add_argument("--dense_attention", action="store_true", help="dense attention even for NABLA tasks")
    k.add_argument(
        "--nabla_P", "--nabla_p", dest="nabla_P", type=float, default=None, help="NABLA threshold (task P, 0.9 if forced)"
    )
    k.add_argument("--nabla_wT", type=int, default=None, help="NABLA STA window in frames (11)")
    k.add_argument("--nabla_wH", type=int, default=None, help="NABLA STA window in tile rows (3)")
    k.add_argument("--nabla_wW", type=int, default=None, help="NABLA STA window in tile columns (3)")
    k.add_argument("--nabla_method", type=str, default=None, choices=NABLA_METHODS, help="NABLA binarisation (topcdf)")
    k.add_argument(
        "--nabla_add_sta", dest="nabla_add_sta", action="store_const", const=True, default=None, help="OR the STA prior (default)"
    )
    k.add_argument("--no_nabla_add_sta", dest="nabla_add_sta", action="store_const", const=False, help="no STA prior")
    return parser


def setup_parser() -> argparse.ArgumentParser:
    """The ``kandinsky5_train_network.py`` command line: common trainer options + the Kandinsky 5 group."""
    parser = setup_parser_common()
    parser.description = "Train a LoRA for Kandinsky 5 from cached latents and text-encoder outputs"
    return add_k5_train_args(parser)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``kandinsky5_train_network.py`` (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = setup_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args = read_config_from_file(args, parser, argv)
    from musubi_tuner.kandinsky5.trainer import Kandinsky5NetworkTrainer

    Kandinsky5NetworkTrainer().train(args)


if __name__ == "__main__":
    main()
