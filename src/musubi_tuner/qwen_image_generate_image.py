"""Generate images with Qwen-Image (specs/qwen_image.md §7, §9; docs/qwen_image.md).

    python qwen_image_generate_image.py --dit qwen_image_bf16.safetensors --vae qwen_image_vae.safetensors \
        --text_encoder Qwen2.5-VL-7B-Instruct/ --prompt "a cat in the snow" --image_size 1328 1328 --save_path outputs/

Edit: ``--model_version edit|edit-2509|edit-2511 --control_image_path a.png [b.png]``; Layered: ``--model_version
layered --control_image_path input.png --output_layers 4`` (one RGBA PNG per layer). Batch files (``--from_file``) and
``--interactive`` run through ``blissful_tuner.generation_loop``: every line is parsed and validated before a model
loads, options-only lines inherit ``--prompt``, wildcards expand per line from the line's seed, failures are listed at
the end and make the exit status non-zero.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from blissful_tuner.generation_loop import interactive_jobs, load_jobs, outputs_or_failure_summary, run_interactive, run_jobs
from blissful_tuner.utils import apply_precision_flags, ring_bell
from musubi_tuner.qwen_image.configs import PIXEL_STEP
from musubi_tuner.qwen_image.generate.args import parse_args, setup_parser
from musubi_tuner.qwen_image.generate.generator import QwenImageGenerator, decode_saved_latents, save_merged_model
from musubi_tuner.qwen_image.generate.plan import FIELD_MAP, validate_job
from musubi_tuner.utils.errors import cli_entry

__all__ = ["QwenImageGenerator", "main", "parse_args", "run", "setup_parser"]


def run(args: argparse.Namespace, *, read_line: Callable[[str], str] | None = None) -> list[Path]:
    """Run a parsed command line (one-off, ``--from_file`` batch or ``--interactive``); returns the files written.

    ``read_line`` replaces the console input of ``--interactive`` (raise ``EOFError`` to end the session).
    """
    apply_precision_flags(args)
    if args.save_merged_model:
        return save_merged_model(args)
    if args.decode_from_latent:
        return decode_saved_latents(args)
    loop = {"field_map": FIELD_MAP, "size_multiple": PIXEL_STEP, "validate": validate_job}
    if args.interactive:
        gen = QwenImageGenerator(args, interactive=True)
        jobs = interactive_jobs(args, read_line, **loop)
        results = run_interactive(jobs, gen.encode, gen.generate, gen.decode_save, cache_key=gen.cache_key, bell=args.bell)
        return [p for r in results for p in r.outputs]
    jobs = load_jobs(args, **loop)
    gen = QwenImageGenerator(args)
    if not args.from_file:
        job = jobs[0]
        latent = gen.generate(job, gen.encode(job))
        gen.free_dit()
        files = gen.decode_save(job, latent)
        if args.bell:
            ring_bell()
        return files
    results = run_jobs(
        jobs,
        gen.encode,
        gen.generate,
        gen.decode_save,
        cache_key=gen.cache_key,
        after_encode=gen.free_text_encoder,
        after_generate=gen.free_dit,
        bell=args.bell,
    )
    return outputs_or_failure_summary(results)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``qwen_image_generate_image.py``."""
    args = parse_args(argv)
    if args.estimate_memory:
        from musubi_tuner.qwen_image.memory import estimate_qwen_image_generation

        estimate_qwen_image_generation(args)  # headers only: nothing is loaded, no CUDA context
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
