"""``--estimate_memory`` for a training command line: shapes from headers, traces, formulas, report, JSON."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from musubi_tuner.memory.estimate import TrainingEstimator, budget, detect_gpu, document, frames_sweep, suggest
from musubi_tuner.memory.formulas import DEFAULT_CALIBRATION, Calibration, GiB
from musubi_tuner.memory.hooks import load_hooks
from musubi_tuner.memory.options import DEFAULT_GPU_GB, gpu_sizes
from musubi_tuner.memory.report import render
from musubi_tuner.memory.training import Settings, quiet_logs
from musubi_tuner.utils.atomic import atomic_write_text
from musubi_tuner.utils.errors import UserError


def resolve_gpu_total(args: Any) -> tuple[int, str]:
    """Bytes of the target GPU (``--gpu_memory``, else GPU 0 less what other processes use, else 24 GiB) and its name."""
    if args.gpu_memory:
        return int(args.gpu_memory * GiB), f"--gpu_memory {args.gpu_memory:g}"
    total, used, name = detect_gpu()
    if total:
        return int((total - used) * GiB), f"{name} ({used:.1f} GiB used by other processes)"
    return int(DEFAULT_GPU_GB * GiB), f"default {DEFAULT_GPU_GB:g} GiB (no GPU found)"


CALIBRATION_FILE = Path(__file__).with_name("calibration.json")  # written by bench/memory_calibration.py


def load_calibration(gpu_name: str | None = None) -> Calibration:
    """The measured constants shipped for this GPU (``CALIBRATION_FILE``), else the defaults (said in the report)."""
    if gpu_name is None:
        gpu_name = detect_gpu()[2]
    if not gpu_name or not CALIBRATION_FILE.is_file():
        return DEFAULT_CALIBRATION
    for entry in json.loads(CALIBRATION_FILE.read_text(encoding="utf-8")):
        if entry.get("gpu") and entry["gpu"] in gpu_name:
            known = {k: v for k, v in entry.get("constants", {}).items() if k in Calibration.__dataclass_fields__}
            source = f"measured on {entry['gpu']} (torch {entry.get('torch')}, CUDA {entry.get('cuda')})"
            return replace(DEFAULT_CALIBRATION, source=source, **known)
    return DEFAULT_CALIBRATION


def estimate_training(trainer: Any, run: Any) -> dict[str, Any]:
    """Print the training estimate for ``run.args`` (validated, datasets indexed from headers) and return the document."""
    started = time.time()
    args = run.args
    if args.sample_prompts and not Path(args.sample_prompts).is_file():
        raise UserError(f"--sample_prompts: file not found: {args.sample_prompts}")
    hooks = load_hooks(trainer.architecture_full_name)
    shape = hooks.step_shape(args, trainer, run.train_group)
    calibration = load_calibration(detect_gpu()[2])
    gpu_total, gpu_name = resolve_gpu_total(args)
    margin = args.memory_margin
    with quiet_logs():
        est = TrainingEstimator(trainer, args, hooks, shape, calibration)
        user = Settings.from_args(args)
        pred = est.predict(user)
        extra: dict[str, Any] = {}
        sizes = gpu_sizes(args)
        if sizes:
            extra["verdicts"] = {f"{s:g}": pred.fits(budget(int(s * GiB), margin)) for s in sizes}
        if args.frames_sweep:
            extra["frames_sweep"] = frames_sweep(est, user, gpu_total, margin)
        suggestions = suggest(est, user, gpu_total, margin) if args.suggest else []
    doc = document("train", hooks.name, args, shape, pred, gpu_total, gpu_name, margin, calibration, started, extra)
    doc["suggestions"] = suggestions
    title = (
        f"{hooks.name} {getattr(args, 'task', '') or ''} — {args.network_module} r{args.network_dim} — {shape.describe()} — "
        f"{' '.join(user.flags()) or 'default settings'} — GPU {gpu_name}"
    )
    print(render(doc, title))
    if args.estimate_json:
        atomic_write_text(args.estimate_json, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc
