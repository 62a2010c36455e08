"""Merge LoRA / LoHa / LoKr files into a DiT checkpoint, for every architecture (specs/networks.md §5.3).

    python merge_lora.py --dit dit.safetensors --lora_weight a.safetensors b.safetensors \
        --lora_multiplier 1.0 0.5 --save_merged_model merged.safetensors

The checkpoint is streamed tensor by tensor into the output (never held in memory); scaled fp8 checkpoints
(``*.scale_weight`` keys) are merged exactly (dequantise, add, re-quantise in the same mode).
"""

from __future__ import annotations

import argparse

import torch

from musubi_tuner.networks.merge import merge_lora_files
from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

SAVE_PRECISIONS = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
ARCHITECTURES = ("kandinsky5", "flux_2", "qwen_image", "wan", "hunyuan_video")


def setup_parser() -> argparse.ArgumentParser:
    """The ``merge_lora.py`` command line (musubi-tuner flags plus ``--save_precision`` and ``--architecture``)."""
    p = argparse.ArgumentParser(description="Merge LoRA/LoHa/LoKr weights into a DiT checkpoint (streaming)")
    p.add_argument("--dit", type=str, required=True, help="DiT checkpoint: .safetensors file, any shard, index json or directory")
    p.add_argument("--dit_in_channels", type=int, default=None, help="accepted for musubi-tuner compatibility; not needed")
    p.add_argument("--lora_weight", type=str, nargs="+", required=True, help="LoRA files, merged in order")
    p.add_argument("--lora_multiplier", type=float, nargs="*", default=None, help="one multiplier per LoRA (missing: 1.0)")
    p.add_argument("--save_merged_model", type=str, required=True, help="output .safetensors path")
    p.add_argument("--device", type=str, default="cpu", help="device for the delta computation (cpu, cuda, ...)")
    p.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=sorted(SAVE_PRECISIONS),
        help="dtype of the high-precision tensors in the output (default: as stored); fp8 weights stay scaled fp8",
    )
    p.add_argument(
        "--architecture", type=str, default=None, choices=ARCHITECTURES, help="check the checkpoint and LoRAs against it"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``merge_lora.py``."""
    args = setup_parser().parse_args(argv)
    if not args.save_merged_model.endswith(".safetensors"):
        raise UserError(f"--save_merged_model {args.save_merged_model}: the output must be a .safetensors file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available")
    if args.dit_in_channels is not None:
        logger.info("--dit_in_channels is not needed: the checkpoint is merged as stored")
    merge_lora_files(
        args.dit,
        args.lora_weight,
        args.save_merged_model,
        args.lora_multiplier,
        save_dtype=SAVE_PRECISIONS[args.save_precision] if args.save_precision else None,
        device=args.device,
        architecture=args.architecture,
        progress=not args.no_progress,
    )
    logger.info(f"saved {args.save_merged_model}")


if __name__ == "__main__":
    main()
