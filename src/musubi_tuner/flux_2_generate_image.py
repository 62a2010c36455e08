"""Generate and edit images with FLUX.2 (dev, klein 4B/9B distilled and base; specs/flux2.md §8, docs/flux_2.md).

    python flux_2_generate_image.py --model_version klein-9b --dit flux2-klein-9b.safetensors --vae ae.safetensors \\
        --text_encoder Qwen3-8B/ --prompt "a cat in the snow" --image_size 1024 1024 --save_path outputs/ \\
        [--control_image_path a.png b.png] [--lora_weight my_lora.safetensors --lora_multiplier 0.8]

Distilled klein variants run their few steps without CFG; klein base variants run true CFG with
``--negative_prompt`` (and the Blissful CFG schedule / CFG-Zero*); dev uses its embedded guidance
(``--embedded_cfg_scale``). ``--from_file`` batch files (with ``__wildcards__``) and ``--interactive`` run through
``blissful_tuner.generation_loop.run_generation``; the parts live in ``musubi_tuner.flux_2.generate``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from blissful_tuner.generation_loop import run_generation
from blissful_tuner.utils import apply_precision_flags
from musubi_tuner.flux_2.generate.args import parse_args, setup_parser, validate_job
from musubi_tuner.flux_2.generate.generator import Flux2Generator, decode_saved_latents
from musubi_tuner.utils.errors import cli_entry

__all__ = ["Flux2Generator", "decode_saved_latents", "main", "parse_args", "run", "setup_parser", "validate_job"]


def run(args: argparse.Namespace, *, read_line: Callable[[str], str] | None = None) -> list[Path]:
    """Run a parsed command line (one job, ``--from_file`` batch or ``--interactive``); returns the files written."""
    apply_precision_flags(args)
    if args.decode_from_latent:
        return decode_saved_latents(args)
    return run_generation(args, Flux2Generator, validate=validate_job, read_line=read_line)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``flux_2_generate_image.py``."""
    args = parse_args(argv)
    if args.estimate_memory:
        from musubi_tuner.flux_2.memory import estimate_flux2_generation

        estimate_flux2_generation(args)  # headers only: nothing is loaded, no CUDA context
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
