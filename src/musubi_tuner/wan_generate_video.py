"""Generate videos and images with Wan 2.1 / 2.2 (specs/wan.md §7, §8, §10; specs/generation.md).

    python wan_generate_video.py --task t2v-1.3B --dit wan2.1_t2v_1.3B_bf16.safetensors --vae Wan2.1_VAE.pth \\
        --t5 models_t5_umt5-xxl-enc-bf16.pth --prompt "a cat in the snow" --video_size 480 832 --video_length 81 \\
        --save_path outputs/

Wan 2.2 A14B: ``--dit`` (low-noise) and ``--dit_high_noise``, ``--lora_weight`` (low) / ``--lora_weight_high_noise``,
``--guidance_scale`` / ``--guidance_scale_high_noise``, ``--timestep_boundary`` (0.875 or 875). Batch files
(``--from_file``) and ``--interactive`` use the shared loops of ``blissful_tuner.generation_loop``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from blissful_tuner.generation_loop import interactive_jobs, load_jobs, outputs_or_failure_summary, run_interactive, run_jobs
from blissful_tuner.utils import apply_precision_flags, ring_bell
from musubi_tuner.utils.errors import cli_entry
from musubi_tuner.wan.generate.args import parse_args, setup_parser
from musubi_tuner.wan.generate.generator import WanGenerator, decode_saved_latents, validate_job

__all__ = ["WanGenerator", "main", "parse_args", "run", "setup_parser"]


def run(args: argparse.Namespace, *, read_line: Callable[[str], str] | None = None) -> list[Path]:
    """Run a parsed command line (single job, ``--from_file`` batch or ``--interactive``); returns the files written."""
    apply_precision_flags(args)
    if args.decode_from_latent:
        return decode_saved_latents(args)
    if args.interactive:
        gen = WanGenerator(args, interactive=True)
        jobs = interactive_jobs(args, read_line, validate=validate_job)
        results = run_interactive(jobs, gen.encode, gen.generate, gen.decode_save, cache_key=gen.cache_key, bell=args.bell)
        return [p for r in results for p in r.outputs]
    jobs = load_jobs(args, validate=validate_job, size_multiple=args.task_config.resolution_step)
    gen = WanGenerator(args)
    if not args.from_file:
        job = jobs[0]
        encoded = gen.encode(job)
        gen.encode_all_conditions(jobs)
        latent = gen.generate(job, encoded)
        gen.free_dit()
        files = gen.decode_save(job, latent, encoded["negative"])
        if args.bell:
            ring_bell()
        return files
    results = run_jobs(
        jobs,
        gen.encode,
        gen.generate,
        gen.decode_save,
        cache_key=gen.cache_key,
        after_encode=lambda: gen.encode_all_conditions(jobs),
        after_generate=gen.free_dit,
        bell=args.bell,
    )
    return outputs_or_failure_summary(results)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``wan_generate_video.py``."""
    args = parse_args(argv)
    if args.estimate_memory:
        from musubi_tuner.wan.memory import estimate_wan_generation

        estimate_wan_generation(args)  # headers only: nothing is loaded, no CUDA context
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
