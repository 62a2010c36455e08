"""LoRA training for Wan 2.1 / 2.2 on the common trainer (specs/wan.md §9, specs/training.md).

    accelerate launch wan_train_network.py --task t2v-1.3B --dit wan2.1_t2v_1.3B_bf16.safetensors \\
        --dataset_config dataset.toml --network_module networks.lora_wan --network_dim 32 --sdpa \\
        --timestep_sampling shift --discrete_flow_shift 3.0 --output_dir out --output_name my_wan_lora

Wan 2.2 A14B (two experts) needs an explicit ``--expert``: ``both`` trains one LoRA per expert in one run (each batch
routed by its timesteps to one expert; files ``<name>_high_noise`` and ``<name>_low_noise``), ``high`` / ``low``
train one expert on its side of ``--timestep_boundary`` (0.875 and 875 mean the same).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from musubi_tuner.training.args import read_config_from_file, setup_parser_common
from musubi_tuner.utils.errors import cli_entry
from musubi_tuner.wan.configs import EXPERT_CHOICES, TRAIN_REFUSED_FLAGS, parse_timestep_boundary, task_names

# the trainer itself (torch, the model code) is imported after parsing: ``--help`` and option errors stay fast
_TRAINER_NAMES = ("WanNetworkTrainer", "ARCH", "ARCH_FULL")


def __getattr__(name: str) -> Any:
    """``WanNetworkTrainer`` (and its constants) from ``wan.trainer``, imported on first use."""
    if name in _TRAINER_NAMES:
        from musubi_tuner.wan import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _boundary_arg(value: str) -> float:
    b = parse_timestep_boundary(value)
    assert b is not None
    return b


def add_wan_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Wan options of the trainer (upstream names); the common ones come from the base parser."""
    w = parser.add_argument_group("Wan")
    w.add_argument("--task", type=str, default="t2v-14B", help=f"task: {', '.join(task_names())} (default t2v-14B)")
    w.add_argument("--dit_dtype", type=str, default=None, choices=("bfloat16", "float16", "float32"), help="DiT compute dtype")
    w.add_argument("--t5", type=str, default=None, help="UMT5 (official .pth or HF dir) to encode the sample prompts")
    w.add_argument("--t5_tokenizer", type=str, default=None, help="UMT5 tokenizer dir (default: google/umt5-xxl next to --t5)")
    w.add_argument("--fp8_t5", action="store_true", help="sample prompts: T5 Linear weights in fp8")
    w.add_argument("--clip", type=str, default=None, help="CLIP image encoder for 2.1 I2V sample images")
    w.add_argument("--vae_cache_cpu", action="store_true", help="sample videos: VAE causal cache in CPU memory")
    w.add_argument(
        "--one_frame",
        action="store_true",
        help="one-frame mode (I2V tasks): sample prompts are generated one-frame with their --of options; "
        "one-frame caches (wan_cache_latents.py --one_frame) train without it",
    )
    w.add_argument(
        "--force_v2_1_time_embedding",
        action="store_true",
        help="accepted; every task but TI2V-5B already uses one timestep per sample (the 2.1 embedding)",
    )
    w.add_argument(
        "--dit_high_noise", type=str, default=None, help="Wan 2.2 A14B: the high-noise expert (--dit is the low-noise one)"
    )
    w.add_argument(
        "--timestep_boundary",
        type=_boundary_arg,
        default=None,
        help="A14B expert boundary in [0, 1] (0.875) or (1, 1000] (875); default: the task's (t2v 0.875, i2v 0.900)",
    )
    w.add_argument("--offload_inactive_dit", action="store_true", help="--expert both: keep the inactive expert on the CPU")
    w.add_argument(
        "--expert",
        type=str,
        default=None,
        choices=EXPERT_CHOICES,
        help="Wan 2.2 A14B (required there): both = one LoRA per expert in one run (<name>_high_noise / <name>_low_noise); "
        "high / low = train that expert only, on its side of the boundary",
    )
    b = parser.add_argument_group("Wan (blissful-tuner options)")
    b.add_argument(
        "--rope_func",
        type=str,
        default="default",
        choices=("default", "comfy"),
        help="accepted: our RoPE is real-valued either way",
    )
    for flag, why in TRAIN_REFUSED_FLAGS.items():
        b.add_argument(flag, action="store_true", help=f"refused: {why}")
    b.add_argument("--compile_args", nargs=4, default=None, help="refused: use --compile / --compile_backend / --compile_mode ...")
    return parser


def setup_parser() -> argparse.ArgumentParser:
    """The ``wan_train_network.py`` command line: common trainer options + the Wan groups."""
    parser = setup_parser_common()
    parser.description = "Train a LoRA for Wan 2.1 / 2.2 from cached latents and text-encoder outputs"
    return add_wan_train_args(parser)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``wan_train_network.py``."""
    parser = setup_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args = read_config_from_file(args, parser, argv)
    from musubi_tuner.wan.trainer import WanNetworkTrainer

    WanNetworkTrainer().train(args)


if __name__ == "__main__":
    main()
