"""Generate videos and images with Kandinsky 5 (specs/kandinsky5.md §8, §9, §12.4–§12.6; specs/generation.md).

    python kandinsky5_generate_video.py --task k5-lite-t2v-5s-sd --dit dit.safetensors --vae hunyuan_vae/ \
        --text_encoder_qwen Qwen2.5-VL-7B-Instruct/ --text_encoder_clip clip-vit-large-patch14/ \
        --prompt "a cat in the snow" --width 768 --height 512 --video_length 121 --save_path outputs/

The command lines of musubi-tuner and blissful-tuner both work: the aliases of §12.6 are accepted (``--output`` file
or ``--save_path`` directory, ``--guidance``/``--guidance_scale``, ``--flow_shift``/``--scheduler_scale``,
``--i``/``--image``, ``--dtype``/``--dit_dtype``, ``--steps``/``--infer_steps``, ``--attn_mode``/attention flags);
two spellings of one option with different values are an error. ``--video_length`` counts pixel frames (rounded up
to 4n+1), ``--frames`` latent frames.

Memory-aware order: encode every prompt and negative (Qwen + CLIP), keep the embeddings on the CPU and free the
encoders; encode the reference images with the VAE; load the DiT once (LoRAs merged in float32, then fp8), block
swap or move it to the device; sample every job; free the DiT; decode and save. Batch files (``--from_file``) and
``--interactive`` use the shared loops of ``blissful_tuner.generation_loop``.

This script only runs the parts of ``musubi_tuner.kandinsky5.generate``: ``args`` (command line), ``plan`` (per-job
settings), ``generator`` (``K5Generator``: the models and sampling) and ``outputs`` (saving, ``--decode_from_latent``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from blissful_tuner.generation_loop import run_generation
from blissful_tuner.utils import apply_precision_flags
from musubi_tuner.kandinsky5.generate.args import parse_args, setup_parser
from musubi_tuner.kandinsky5.generate.generator import K5Generator
from musubi_tuner.kandinsky5.generate.outputs import decode_saved_latents, write_outputs
from musubi_tuner.kandinsky5.generate.plan import JobPlan, plan_job, validate_job
from musubi_tuner.utils.errors import cli_entry

__all__ = [
    "JobPlan",
    "K5Generator",
    "decode_saved_latents",
    "main",
    "parse_args",
    "plan_job",
    "run",
    "setup_parser",
    "validate_job",
    "write_outputs",
]


def run(args: argparse.Namespace, *, read_line: Callable[[str], str] | None = None) -> list[Path]:
    """Run a parsed command line (single job, ``--from_file`` batch or ``--interactive``); returns the files written.

    ``read_line`` replaces the console input of ``--interactive`` (raise ``EOFError`` to end the session).
    """
    apply_precision_flags(args)
    if args.decode_from_latent:
        return decode_saved_latents(args)
    return run_generation(args, K5Generator, validate=validate_job, read_line=read_line)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``kandinsky5_generate_video.py``."""
    args = parse_args(argv)
    if args.estimate_memory:
        from musubi_tuner.kandinsky5.memory import estimate_k5_generation

        estimate_k5_generation(args)  # headers only: nothing is loaded, no CUDA context
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
