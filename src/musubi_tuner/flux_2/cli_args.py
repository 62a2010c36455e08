"""Command-line options shared by the FLUX.2 scripts; imports nothing heavy (the trainer's ``--help`` stays fast)."""

from __future__ import annotations

import argparse


def add_text_encoder_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--text_encoder``, ``--fp8_text_encoder`` (alias ``--fp8_m3``), ``--text_encoder_cpu`` (shared by the scripts)."""
    g = parser.add_argument_group("FLUX.2 text encoder")
    g.add_argument(
        "--text_encoder", type=str, default=None, required=required, help="Qwen3 (klein) or Mistral 3 (dev) directory or file"
    )
    g.add_argument(
        "--fp8_text_encoder",
        "--fp8_m3",
        dest="fp8_text_encoder",
        action="store_true",
        help="store the text encoder's Linear weights in fp8 (Qwen3 and Mistral 3; --fp8_m3 is an alias)",
    )
    g.add_argument("--text_encoder_cpu", action="store_true", help="run the text encoder on the CPU")
