"""Batch (``--from_file``) and interactive (``--interactive``) generation, shared by every generate script.

A *job* is a deep copy of the command-line arguments with one prompt line's overrides applied, its integer seed
and its wildcard-expanded prompt and negative prompt. ``load_jobs`` parses and validates every line before any
model is loaded; ``run_jobs`` implements the batch execution model of specs/generation.md §8.3 with the script's own
functions:

1. ``encode_fn(job)`` for every job, through an ``EncodeCache`` keyed by (prompt, negative prompt, control
   inputs, size), then ``after_encode()`` (free the text encoders);
2. ``generate_fn(job, encoded)`` for every job (the DiT is loaded once, by the script, on first use), then
   ``after_generate()`` (free the DiT);
3. ``decode_save_fn(job, latent) -> list[Path]`` for every job.

A job that fails in any stage is logged and skipped; the others go on. ``run_interactive`` runs one job at a time
with the same cache (encoders and DiT stay loaded), Ctrl+C abandons the current job, Ctrl+D (EOF) exits.

Per-line options can only change per-job settings (the prompt-line letters); a line naming a command-line-only
option (``--task``, ``--lora_weight``, ``--fp8_scaled`` ...) is rejected: model-level settings come from the command
line and are the same for every job.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blissful_tuner.blissful_logger import get_logger
from blissful_tuner.prompt_management import WildcardExpander, expand_prompts
from blissful_tuner.seeds import resolve_seed
from blissful_tuner.utils import ring_bell
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.prompt_lines import PromptSpec, load_prompt_file, parse_prompt_line

logger = get_logger(__name__)

# PromptSpec field → argument attributes it sets (every one the script defines; alias groups are kept in step).
DEFAULT_FIELD_MAP: dict[str, tuple[str, ...]] = {
    "width": ("width",),
    "height": ("height",),
    "frame_count": ("video_length",),
    "sample_steps": ("infer_steps", "steps"),
    "guidance_scale": ("guidance_scale", "guidance"),
    "cfg_scale": ("guidance_scale", "guidance"),
    "discrete_flow_shift": ("flow_shift", "scheduler_scale"),
    "image_path": ("image_path", "image"),
    "end_image_path": ("end_image_path", "image_last"),
    "control_image_path": ("control_image_path",),
    "control_image_mask_path": ("control_image_mask_path",),
    "control_video_path": ("control_path", "control_video_path"),
    "mask_path": ("mask_path",),
    "cfg_schedule": ("cfg_schedule",),
    "one_frame": ("one_frame_inference",),
    "rcm_threshold": ("rcm_threshold",),
    "rcm_relative_threshold": ("rcm_relative_threshold",),
    "rcm_kernel_size": ("rcm_kernel_size",),
    "rcm_dilate_size": ("rcm_dilate_size",),
}
_PATH_FIELDS = ("image_path", "end_image_path", "control_image_path", "control_image_mask_path", "control_video_path", "mask_path")
_STEP_ATTRS = ("infer_steps", "steps", "sample_steps")
_SCALE_ATTRS = ("guidance_scale", "guidance", "cfg_scale")


@dataclass
class Job:
    """One generation: ``args`` is the job's own argument copy (``prompt``, ``negative_prompt`` expanded and
    ``seed`` an int there too)."""

    index: int
    args: argparse.Namespace
    seed: int
    prompt: str
    negative_prompt: str | None
    raw_prompt: str
    raw_negative_prompt: str | None
    location: str
    spec: PromptSpec | None = None


@dataclass
class JobResult:
    """What became of one job: the files written, or the stage and message of its failure."""

    job: Job
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    failed_stage: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _first_attr(args: Any, names: Sequence[str]) -> Any:
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            return v
    return None


def _reject_cli_only(args: argparse.Namespace, strict: bool) -> Callable[[str, str], None]:
    """The unknown-option handler: a command-line option named on a line is an error; other names warn."""

    def handler(name: str, where: str) -> None:
        attr = name.lstrip("-")
        if hasattr(args, attr):
            raise UserError(
                f"{where}: --{attr} cannot be changed per line (model-level and run-level settings come from the command "
                "line and apply to every job)"
            )
        if strict:
            raise UserError(f"{where}: unknown option {name}")
        logger.warning(f"{where}: unknown option {name}; ignored")

    return handler


def _apply_overrides(job_args: argparse.Namespace, spec: PromptSpec, field_map: Mapping[str, Sequence[str]]) -> None:
    for name, value in spec.overrides().items():
        if name in ("prompt", "negative_prompt", "seed"):
            continue  # handled by make_job
        attrs = [a for a in field_map.get(name, ()) if hasattr(job_args, a)]
        if not attrs:
            raise UserError(f"{spec.location}: the option for '{name}' is not supported by this script")
        for a in attrs:
            setattr(job_args, a, value)


def _validate_job(job: Job, size_multiple: int | None) -> None:
    a = job.args
    for name in ("width", "height"):
        v = getattr(a, name, None)
        if v is not None and size_multiple and int(v) % size_multiple:
            raise UserError(f"{job.location}: {name} {v} is not a multiple of {size_multiple}")
    for fname in _PATH_FIELDS:
        for attr in DEFAULT_FIELD_MAP[fname]:
            value = getattr(a, attr, None)
            for p in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(p, str) and p and not Path(p).exists():
                    raise UserError(f"{job.location}: file not found: {p} ({attr})")
    schedule = getattr(a, "cfg_schedule", None)
    steps = _first_attr(a, _STEP_ATTRS)
    if schedule is not None and steps is not None:
        from blissful_tuner.guidance import parse_cfg_schedule_map

        try:
            parse_cfg_schedule_map(schedule, int(steps), float(_first_attr(a, _SCALE_ATTRS) or 1.5))
        except UserError as e:
            raise UserError(f"{job.location}: {e}") from None


def make_job(
    args: argparse.Namespace,
    spec: PromptSpec | None,
    index: int,
    *,
    location: str = "command line",
    field_map: Mapping[str, Sequence[str]] | None = None,
    expander: WildcardExpander | None = None,
    size_multiple: int | None = None,
    validate: Callable[[Job], None] | None = None,
) -> Job:
    """One job from the command-line ``args`` and an optional prompt line ``spec``.

    Order: overrides → seed (the line's ``--d``, else ``--seed``, else a fresh random seed) → wildcards expanded with
    an RNG seeded from that seed (prompt, then negative prompt) → validation (sizes, files, CFG schedule, then the
    script's ``validate(job)``).
    """
    fmap = DEFAULT_FIELD_MAP if field_map is None else field_map
    job_args = copy.deepcopy(args)
    where = spec.location if spec is not None else location
    raw_prompt = spec.prompt if spec is not None and spec.prompt is not None else getattr(args, "prompt", None)
    if not raw_prompt:
        raise UserError(f"{where}: no prompt on this line and no --prompt on the command line")
    raw_negative = getattr(args, "negative_prompt", None)
    if spec is not None:
        _apply_overrides(job_args, spec, fmap)
        if spec.negative_prompt is not None:
            raw_negative = spec.negative_prompt
    seed = spec.seed if spec is not None and spec.seed is not None else resolve_seed(getattr(args, "seed", None))
    prompt, negative = raw_prompt, raw_negative
    if expander is not None:
        prompt, negative = expand_prompts(None, seed, raw_prompt, raw_negative, expander=expander)
    job_args.prompt, job_args.negative_prompt, job_args.seed = prompt, negative, seed
    job = Job(index, job_args, seed, prompt, negative, raw_prompt, raw_negative, where, spec)
    _validate_job(job, size_multiple)
    if validate is not None:
        try:
            validate(job)
        except UserError as e:
            msg = str(e)
            raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    return job


def load_jobs(
    args: argparse.Namespace,
    *,
    field_map: Mapping[str, Sequence[str]] | None = None,
    size_multiple: int | None = None,
    validate: Callable[[Job], None] | None = None,
) -> list[Job]:
    """All jobs of a run: one per line of ``--from_file``, else the single command-line job.

    Every line is parsed and validated first; all errors are reported together in one ``UserError`` (each naming
    its file and line).
    """
    expander = WildcardExpander(args.prompt_wildcards) if getattr(args, "prompt_wildcards", None) else None
    from_file = getattr(args, "from_file", None)
    if not from_file:
        return [make_job(args, None, 0, field_map=field_map, expander=expander, size_multiple=size_multiple, validate=validate)]
    strict = bool(getattr(args, "strict_prompts", False))
    handler = _reject_cli_only(args, strict)
    errors: list[str] = []
    specs = load_prompt_file(from_file, strict=strict, unknown=handler, errors=errors)
    if not specs and not errors:
        raise UserError(f"--from_file {from_file}: no prompt lines")
    jobs = []
    for spec in specs:
        try:
            jobs.append(
                make_job(
                    args, spec, spec.index, field_map=field_map, expander=expander, size_multiple=size_multiple, validate=validate
                )
            )
        except UserError as e:
            errors.append(str(e))
    if errors:
        raise UserError(f"{len(errors)} invalid line(s) in {from_file}:\n  " + "\n  ".join(errors))
    return jobs


def _default_read_line() -> Callable[[str], str]:
    try:
        from prompt_toolkit import PromptSession

        session = PromptSession()
        return session.prompt
    except ImportError:
        return input


def interactive_jobs(
    args: argparse.Namespace,
    read_line: Callable[[str], str] | None = None,
    *,
    field_map: Mapping[str, Sequence[str]] | None = None,
    size_multiple: int | None = None,
    validate: Callable[[Job], None] | None = None,
    prompt_text: str = "> ",
) -> Iterator[Job]:
    """Jobs from prompt lines typed at the console (``prompt_toolkit`` when installed, else ``input``).

    Blank lines and ``#`` comments are skipped; a bad line is reported and the next line is read; Ctrl+C at the
    prompt clears the line; Ctrl+D (EOF), ``exit`` or ``quit`` ends the session.
    """
    read = read_line or _default_read_line()
    expander = WildcardExpander(args.prompt_wildcards) if getattr(args, "prompt_wildcards", None) else None
    strict = bool(getattr(args, "strict_prompts", False))
    handler = _reject_cli_only(args, strict)
    count = 0
    while True:
        try:
            line = read(prompt_text)
        except EOFError:
            return
        except KeyboardInterrupt:
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.lower() in ("exit", "quit"):
            return
        count += 1
        try:
            spec = parse_prompt_line(stripped, source="interactive", line_number=count, strict=strict, unknown=handler)
            spec.index = count - 1
            job = make_job(
                args, spec, count - 1, field_map=field_map, expander=expander, size_multiple=size_multiple, validate=validate
            )
        except UserError as e:
            logger.error(str(e))
            continue
        yield job


def default_cache_key(job: Job) -> Hashable:
    """(prompt, negative prompt, control inputs, size): jobs that share it share their text encodings."""
    a = job.args

    def paths(*attrs: str) -> tuple:
        out = []
        for attr in attrs:
            v = getattr(a, attr, None)
            out.extend(v if isinstance(v, (list, tuple)) else [v])
        return tuple(str(p) for p in out if p)

    size = (getattr(a, "width", None), getattr(a, "height", None))
    return (job.prompt, job.negative_prompt, paths("image_path", "image", "control_image_path"), size)


class EncodeCache:
    """Text (and control) encodings by ``key_fn(job)``; counts hits and misses."""

    def __init__(self, encode_fn: Callable[[Job], Any], key_fn: Callable[[Job], Hashable] = default_cache_key) -> None:
        self.encode_fn = encode_fn
        self.key_fn = key_fn
        self._store: dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, job: Job) -> Any:
        """The encoding of ``job``, computed on first use."""
        key = self.key_fn(job)
        if key in self._store:
            self.hits += 1
            return self._store[key]
        self.misses += 1
        value = self.encode_fn(job)
        self._store[key] = value
        return value

    def clear(self) -> None:
        self._store.clear()


def _fail(result: JobResult, stage: str, exc: BaseException) -> None:
    result.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)
    result.failed_stage = stage
    logger.error(f"job {result.job.index + 1} ({result.job.location}) failed while {stage}: {result.error}; skipped")


def run_jobs(
    jobs: Sequence[Job],
    encode_fn: Callable[[Job], Any],
    generate_fn: Callable[[Job, Any], Any],
    decode_save_fn: Callable[[Job, Any], Sequence[Path] | None],
    *,
    cache_key: Callable[[Job], Hashable] = default_cache_key,
    after_encode: Callable[[], None] | None = None,
    after_generate: Callable[[], None] | None = None,
    bell: bool = False,
) -> list[JobResult]:
    """Run a batch in three stages (encode all → generate all → decode and save all); see the module docstring.

    Returns one ``JobResult`` per job, in job order. ``KeyboardInterrupt`` stops the batch.
    """
    results = [JobResult(job) for job in jobs]
    cache = EncodeCache(encode_fn, cache_key)
    encoded: dict[int, Any] = {}
    for r in results:
        try:
            encoded[r.job.index] = cache.get(r.job)
        except Exception as e:
            _fail(r, "encoding the prompt", e)
    logger.info(f"encoded {cache.misses} distinct prompt(s) for {len(jobs)} job(s) ({cache.hits} cache hit(s))")
    if after_encode is not None:
        after_encode()
    cache.clear()

    latents: dict[int, Any] = {}
    for r in results:
        if not r.ok:
            continue
        logger.info(f"generating job {r.job.index + 1}/{len(jobs)} (seed {r.job.seed}): {r.job.prompt}")
        try:
            latents[r.job.index] = generate_fn(r.job, encoded.pop(r.job.index))
        except Exception as e:
            _fail(r, "generating", e)
    if after_generate is not None:
        after_generate()

    for r in results:
        if not r.ok:
            continue
        try:
            r.outputs = list(decode_save_fn(r.job, latents.pop(r.job.index)) or [])
        except Exception as e:
            _fail(r, "decoding and saving", e)
    failed = sum(not r.ok for r in results)
    logger.info(f"batch done: {len(results) - failed} succeeded, {failed} failed")
    if bell:
        ring_bell()
    return results


def run_interactive(
    jobs: Iterator[Job],
    encode_fn: Callable[[Job], Any],
    generate_fn: Callable[[Job, Any], Any],
    decode_save_fn: Callable[[Job, Any], Sequence[Path] | None],
    *,
    cache_key: Callable[[Job], Hashable] = default_cache_key,
    bell: bool = False,
) -> list[JobResult]:
    """Run jobs one at a time as they arrive (``interactive_jobs``); encodings are cached across jobs.

    Ctrl+C during a job abandons that job and returns to the prompt; failures are logged and the session goes on.
    """
    cache = EncodeCache(encode_fn, cache_key)
    results = []
    for job in jobs:
        r = JobResult(job)
        stage = "encoding the prompt"
        try:
            enc = cache.get(job)
            stage = "generating"
            latent = generate_fn(job, enc)
            stage = "decoding and saving"
            r.outputs = list(decode_save_fn(job, latent) or [])
        except KeyboardInterrupt:
            r.error, r.failed_stage = "interrupted", stage
            logger.warning("job abandoned (Ctrl+C); back to the prompt")
        except Exception as e:
            _fail(r, stage, e)
        results.append(r)
        if bell:
            ring_bell()
    return results


def run_generation(
    args: argparse.Namespace,
    make_generator: Callable[..., Any],
    *,
    validate: Callable[[Job], None] | None = None,
    read_line: Callable[[str], str] | None = None,
    field_map: Mapping[str, Sequence[str]] | None = None,
) -> list[Path]:
    """The run of a generate script: one job, a ``--from_file`` batch or ``--interactive``; returns the files written.

    ``make_generator(args, interactive=bool)`` builds the script's generator, which offers ``encode(job)``,
    ``generate(job, encoded)``, ``decode_save(job, latent) -> list[Path]``, ``cache_key(job)``, ``free_dit()`` and
    optionally ``after_encode(jobs)`` (e.g. encode reference images once the text encoders are freed). A single job
    runs encode → generate → free the DiT → decode; a batch runs each stage for every job (``run_jobs``) and fails
    with one ``UserError`` listing the jobs that failed; ``read_line`` replaces the console of ``--interactive``.
    """
    if getattr(args, "interactive", False):
        gen = make_generator(args, interactive=True)
        jobs_iter = interactive_jobs(args, read_line, field_map=field_map, validate=validate)
        results = run_interactive(
            jobs_iter, gen.encode, gen.generate, gen.decode_save, cache_key=gen.cache_key, bell=getattr(args, "bell", False)
        )
        return [p for r in results for p in r.outputs]

    jobs = load_jobs(args, field_map=field_map, validate=validate)
    gen = make_generator(args, interactive=False)
    after = getattr(gen, "after_encode", None)
    if not getattr(args, "from_file", None):
        job = jobs[0]
        encoded = gen.encode(job)
        if after is not None:
            after(jobs)
        latent = gen.generate(job, encoded)
        gen.free_dit()
        files = list(gen.decode_save(job, latent))
        if getattr(args, "bell", False):
            ring_bell()
        return files

    results = run_jobs(
        jobs,
        gen.encode,
        gen.generate,
        gen.decode_save,
        cache_key=gen.cache_key,
        after_encode=(lambda: after(jobs)) if after is not None else None,
        after_generate=gen.free_dit,
        bell=getattr(args, "bell", False),
    )
    return outputs_or_failure_summary(results)


def outputs_or_failure_summary(results: list) -> list:
    """Every output path of ``results``; when any job failed, one ``UserError`` listing each failed job's location."""
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "\n  ".join(f"{r.job.location}: {r.error}" for r in failed)
        raise UserError(f"{len(failed)} of {len(results)} job(s) failed:\n  {lines}")
    return [p for r in results for p in r.outputs]
