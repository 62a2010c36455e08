"""Command-line options shared by the FLUX.2 scripts; imports nothing heavy (the trainer's ``--help`` stays fast)."""

from __future__ import annotations

import argparse

TOKENIZER_HELP = (
    "tokenizer directory for a --text_encoder given as one bare weights file (ComfyUI's qwen_3_4b.safetensors); "
    "default: the file's folder, then <folder>/tokenizer"
)


def add_text_encoder_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--text_encoder``, ``--fp8_text_encoder`` (alias ``--fp8_m3``), ``--text_encoder_cpu``, ``--tokenizer`` (shared by the scripts)."""
    g = parser.add_argument_group("FLUX.2 text encoder")
    g.add_argument(
        "--text_encoder",
        type=str,
        default=None,
        required=required,
        help="Qwen3 (klein) or Mistral 3 (dev): HF directory, or one weights file (a bare Qwen3 file needs no config.json)",
    )
    g.add_argument(
        "--fp8_text_encoder",
        "--fp8_m3",
        dest="fp8_text_encoder",
        action="store_true",
        help="store the text encoder's Linear weights in fp8 (Qwen3 and Mistral 3; --fp8_m3 is an alias)",
    )
    g.add_argument("--text_encoder_cpu", action="store_true", help="run the text encoder on the CPU")
    g.add_argument("--tokenizer", type=str, default=None, help=TOKENIZER_HELP)
