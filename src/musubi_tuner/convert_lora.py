"""Convert LoRA files between the kohya layout and the dotted ``lora_A``/``lora_B`` layout (specs/networks.md §6).

    python convert_lora.py --input my_lora.safetensors --output comfy_lora.safetensors --target other
    python convert_lora.py --input comfy_lora.safetensors --output my_lora.safetensors --target default

Names are mapped through exact per-architecture tables (``networks.convert.NAME_TABLES``); the architecture is read
from the metadata or the key names, or given with ``--architecture``.
"""

from __future__ import annotations

import argparse

from musubi_tuner.networks.convert import NAME_TABLES, convert_file_tensors, resolve_architecture
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """The ``convert_lora.py`` command line (musubi-tuner flags plus ``--architecture``)."""
    p = argparse.ArgumentParser(description="Convert LoRA files: kohya (default) <-> diffusers/ComfyUI lora_A/lora_B (other)")
    p.add_argument("--input", type=str, required=True, help="input LoRA .safetensors")
    p.add_argument("--output", type=str, required=True, help="output .safetensors")
    p.add_argument(
        "--target",
        type=str,
        required=True,
        choices=["default", "other", "diffusers"],
        help="default: kohya layout; other: lora_A/lora_B with official names; diffusers: diffusers module names "
        "(FLUX.2: fused qkv split into to_q/to_k/to_v; use --diffusers_prefix transformer)",
    )
    p.add_argument(
        "--diffusers_prefix", type=str, default="diffusion_model", help="key prefix for --target other (e.g. transformer)"
    )
    p.add_argument("--architecture", type=str, default=None, choices=sorted(NAME_TABLES), help="override the detected architecture")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``convert_lora.py``."""
    args = setup_parser().parse_args(argv)
    if not args.output.endswith(".safetensors"):
        raise UserError(f"--output {args.output}: the output must be a .safetensors file")
    with open_weights(args.input) as reader:
        sd = {k: reader.get_tensor(k) for k in reader.keys()}
        metadata = reader.metadata()
    arch = resolve_architecture(sd, metadata, args.architecture, args.input)
    out, md = convert_file_tensors(sd, metadata, args.target, arch, args.diffusers_prefix, args.input)
    save_safetensors_atomic(out, args.output, md)
    logger.info(f"{args.input} ({arch}) -> {args.output}: {len(out)} tensors, --target {args.target}")


if __name__ == "__main__":
    main()
