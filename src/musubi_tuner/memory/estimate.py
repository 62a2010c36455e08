"""Predictions from traces + formulas, the suggestion rule (§7), the frame sweep and the estimate document (§6)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any

from musubi_tuner.memory import formulas
from musubi_tuner.memory.formulas import Calibration, GiB, MiB
from musubi_tuner.memory.hooks import ArchMemoryHooks, StepShape
from musubi_tuner.memory.training import Settings, StepTrace, _optimizer_kind, trace_training_step

SCHEMA = 1
HOST_FRACTION = 0.85  # host RAM budget: 85 % of MemAvailable
EXPANDABLE_HINT_MARGIN = 0.15


@dataclass
class Prediction:
    """Device and host memory for one set of settings (bytes)."""

    settings: Settings
    trace: StepTrace
    formula: dict[str, int]
    predicted_peak: int
    host: dict[str, int]
    notes: list[str]

    def fits(self, budget: int) -> bool:
        return self.predicted_peak <= budget


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def mem_available() -> int:
    """Host memory available to a new process (``MemAvailable``), 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def detect_gpu() -> tuple[float | None, float, str]:
    """``(total GiB, GiB used by other processes, name)`` of GPU 0 from ``nvidia-smi`` (no CUDA context in this
    process), or ``(None, 0, "")`` when there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, 0.0, ""
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total,memory.used,name", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        total, used, name = (s.strip() for s in out.split(",", 2))
        return float(total) / 1024, float(used) / 1024, name
    except (OSError, ValueError, subprocess.SubprocessError):
        return None, 0.0, ""


class TrainingEstimator:
    """Traces (cached per distinct trace configuration) and predictions for one training command line."""

    def __init__(self, trainer: Any, args: Any, hooks: ArchMemoryHooks, shape: StepShape, calibration: Calibration):
        self.trainer = trainer
        self.args = args
        self.hooks = hooks
        self.shape = shape
        self.calibration = calibration
        self._traces: dict[tuple, StepTrace] = {}
        self.base_rss = _rss()

    def trace(self, s: Settings) -> StepTrace:
        latent = s.latent or self.shape.latent
        kind = _optimizer_kind(s.optimizer)
        key = (s.mixed_precision, s.gradient_checkpointing, s.fp8, tuple(latent), s.optimizer if kind == "torch" else "")
        if key not in self._traces:
            self._traces[key] = trace_training_step(self.trainer, self.args, self.hooks, self.shape, s)
        return self._traces[key]

    def _run_notes(self) -> list[str]:
        """Options of the command line the estimate does not model (spec §11), said rather than guessed."""
        a, notes = self.args, []
        if getattr(a, "compile", False):
            notes.append("--compile is not traced: this is the eager-mode estimate, an upper bound")
        if getattr(a, "sample_prompts", None):
            notes.append("sampling during training (--sample_prompts: text encoders, VAE decode) is not modelled")
        if self.shape.buckets > 1:
            notes.append(f"{self.shape.buckets} bucket shapes: +{self.calibration.multi_bucket_slack:.0%} allocator slack")
        if getattr(a, "network_module", "") and not str(a.network_module).split(".")[-1].startswith(("lora", "loha")):
            notes.append(f"--network_module {a.network_module}: traced as created; its own memory tricks are not known")
        return notes

    def predict(self, s: Settings) -> Prediction:
        """Traced peak + the §8 formulas for ``s``."""
        t = self.trace(s)
        c = self.calibration
        notes = list(t.notes) + self._run_notes()
        kind = _optimizer_kind(s.optimizer)
        bnb = formulas.bnb_8bit_state_bytes(t.trainable_numels) if kind == "bnb8" else 0
        unknown_opt = 8 * sum(t.trainable_numels) if kind == "unknown" else 0
        if kind == "unknown":
            notes.append(f"optimizer {s.optimizer}: not pure PyTorch, its state is not traced: assumed 8 B/param")
        swap_s = min(s.blocks_to_swap, len(t.swap_saved) - 1) if t.swap_saved else 0
        if s.blocks_to_swap > swap_s:
            notes.append(f"--blocks_to_swap {s.blocks_to_swap} exceeds what the model can swap in training; counted as {swap_s}")
        swap_saved = t.swap_saved[swap_s] if t.swap_saved else 0
        offload_saved = formulas.activation_offload_saved(t.result.kept_block_inputs) if s.activation_offload else 0
        heads, head_dim, tokens = t.attention
        attention = formulas.attention_workspace(self.shape.batch, heads, tokens, head_dim, True, c)
        allocated = t.result.peak - swap_saved - offload_saved + bnb + unknown_opt + c.cublas_workspace + attention
        expandable = "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        slack = formulas.allocator_slack(allocated, c, expandable, self.shape.buckets > 1)
        predicted = allocated + slack + c.cuda_context
        formula = {
            "swap_saved": swap_saved,
            "offload_saved": offload_saved,
            "bnb_state": bnb + unknown_opt,
            "fsdp": 0,
            "context": c.cuda_context,
            "workspaces": c.cublas_workspace + attention,
            "slack": slack,
        }
        workers = max(0, min(int(getattr(self.args, "max_data_loader_n_workers", 0) or 0), os.cpu_count() or 1))
        baseline = self.base_rss + c.host_runtime + workers * c.worker_rss
        staging = 2 * (t.largest_block[swap_s] if t.largest_block else 0) if swap_s else 0
        kept_host = sum(t.result.kept_block_inputs) if s.activation_offload else 0
        load_peak = baseline + (t.weights if swap_s else 0) + 2 * t.largest_weight + 64 * MiB
        steady = baseline + swap_saved + staging + kept_host
        host = {
            "baseline": baseline,
            "load_peak": load_peak,
            "steady": steady,
            "pinned": staging + (swap_saved if s.pinned else 0),
            "peak": max(load_peak, steady),
        }
        return Prediction(s, t, formula, predicted, host, notes)


def budget(gpu_total: int, margin: float) -> int:
    return int((1 - margin) * gpu_total)


def suggest(est: TrainingEstimator, user: Settings, gpu_total: int, margin: float) -> list[dict[str, Any]]:
    """§7: cumulative candidates in order of cost; the first that fits and two alternatives, each with its peak."""
    limit = budget(gpu_total, margin)
    steps: list[tuple[str, Settings]] = [("your settings", user)]
    s = user
    if s.mixed_precision == "no":
        s = replace(s, mixed_precision="bf16")
        steps.append(("--mixed_precision bf16", s))
    if not s.gradient_checkpointing:
        s = replace(s, gradient_checkpointing=True)
        steps.append(("--gradient_checkpointing", s))
    if not s.fp8:
        s = replace(s, fp8=True)  # only after checkpointing (§7.3)
        steps.append(("--fp8_base --fp8_scaled", s))
    if s.optimizer == "AdamW":
        s8 = replace(s, optimizer="AdamW8bit")
        if est.predict(s8).fits(limit) and not est.predict(s).fits(limit):
            s = s8
            steps.append(("--optimizer_type AdamW8bit", s))
    found = None
    for i, (_label, cand) in enumerate(steps):
        if est.predict(cand).fits(limit):
            found = i
            break
    out: list[dict[str, Any]] = []

    def entry(label: str, cand: Settings) -> dict[str, Any]:
        p = est.predict(cand)
        return {"change": label, "flags": cand.flags(), "predicted_peak": p.predicted_peak, "fits": p.fits(limit)}

    def min_swap(base: Settings) -> Settings | None:
        t = est.trace(base)
        for n in range(1, len(t.swap_saved)):
            cand = replace(base, blocks_to_swap=n)
            if est.predict(cand).fits(limit):
                return cand
        return None

    if found is not None:
        out.append(entry(steps[found][0], steps[found][1]))
        if found > 0:  # alternative: the previous settings plus the smallest block swap that fits
            alt = min_swap(steps[found - 1][1])
            if alt is not None:
                out.append(entry(f"{steps[found - 1][0]} + --blocks_to_swap {alt.blocks_to_swap}", alt))
        if found + 1 < len(steps):
            out.append(entry(steps[found + 1][0], steps[found + 1][1]))
        return out[:3]
    last = steps[-1][1]
    swapped = min_swap(last)
    if swapped is not None:
        out.append(entry(f"--blocks_to_swap {swapped.blocks_to_swap}", swapped))
        if swapped.blocks_to_swap > 1:
            more = replace(swapped, activation_offload=True)
            out.append(entry("+ --gradient_checkpointing_cpu_offload", more))
        return out
    offload = replace(last, activation_offload=True, blocks_to_swap=len(est.trace(last).swap_saved) - 1)
    if est.predict(offload).fits(limit):
        out.append(entry(f"--blocks_to_swap {offload.blocks_to_swap} + --gradient_checkpointing_cpu_offload", offload))
        return out
    sweep = frames_sweep(est, offload, gpu_total, margin)
    if sweep.get("largest_fitting") is not None:
        out.append(
            {
                "change": f"fewer frames: latent frames {sweep['largest_fitting']} (data change)",
                "flags": offload.flags(),
                "predicted_peak": sweep["predicted_peak"],
                "fits": True,
            }
        )
    else:
        p = est.predict(offload)
        terms = dict(p.trace.result.at_peak)
        terms.update({f"CUDA {k}": p.formula[k] for k in ("context", "workspaces")}, **{"allocator slack": p.formula["slack"]})
        dominant = max(terms.items(), key=lambda kv: kv[1])
        out.append(
            {
                "change": f"nothing fits: the largest term at the peak is {dominant[0]} ({dominant[1] / GiB:.2f} GiB)",
                "flags": offload.flags(),
                "predicted_peak": p.predicted_peak,
                "fits": False,
            }
        )
    return out


def frames_sweep(est: TrainingEstimator, s: Settings, gpu_total: int, margin: float) -> dict[str, Any]:
    """The largest latent frame count that fits with ``s``: linear in tokens from two traces, confirmed by a third."""
    choices = est.hooks.frame_choices(est.shape)
    if not choices:
        return {"largest_fitting": None, "note": "this task has a fixed frame count"}
    limit = budget(gpu_total, margin)
    shape = est.shape

    def peak(frames: int) -> int:
        latent = (shape.latent[0], frames, *shape.latent[2:])
        return est.predict(replace(s, latent=latent)).predicted_peak

    lo, hi = choices[0], choices[-1]
    p_lo, p_hi = peak(lo), peak(hi)
    per_frame = (p_hi - p_lo) / max(1, hi - lo)
    guess = None
    for f in choices:
        if p_lo + per_frame * (f - lo) <= limit:
            guess = f
    tried: dict[int, int] = {lo: p_lo, hi: p_hi}
    while guess is not None:
        if guess not in tried:
            tried[guess] = peak(guess)
        if tried[guess] <= limit:
            break
        smaller = [f for f in choices if f < guess]
        guess = smaller[-1] if smaller else None
    return {
        "largest_fitting": guess,
        "predicted_peak": tried.get(guess) if guess is not None else None,
        "traced": {str(k): v for k, v in sorted(tried.items())},
    }


def document(
    mode: str,
    arch: str,
    args: Any,
    shape: StepShape,
    pred: Prediction,
    gpu_total: int,
    gpu_name: str,
    margin: float,
    calibration: Calibration,
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document of §6 (schema pinned by tests/test_memory_estimator.py)."""
    r = pred.trace.result
    at = r.at_peak
    host_total = mem_available()
    doc = {
        "schema": SCHEMA,
        "mode": mode,
        "architecture": arch,
        "config": {
            "task": getattr(args, "task", None),
            "dit": str(getattr(args, "dit", "")),
            "flags": pred.settings.flags(),
            "network_module": getattr(args, "network_module", None),
            "network_dim": getattr(args, "network_dim", None),
            "mixed_precision": pred.settings.mixed_precision,
            "gradient_checkpointing": pred.settings.gradient_checkpointing,
            "activation_offload": pred.settings.activation_offload,
            "fp8": pred.settings.fp8,
            "optimizer": pred.settings.optimizer,
            "blocks_to_swap": pred.settings.blocks_to_swap,
        },
        "shapes": {
            "batch": shape.batch,
            "latent": list(pred.settings.latent or shape.latent),
            "text_len": shape.text_len,
            "buckets": shape.buckets,
        },
        "device": {
            "traced": {
                "params": at.get("weights", 0),
                "buffers": 0,
                "grads": at.get("backward", 0),
                "activations": at.get("forward", 0) + at.get("inputs", 0),
                "temp": 0,
                "optimizer": at.get("optimizer", 0),
                "trainable": at.get("trainable", 0),
                "peak": r.peak,
                "phase_peaks": dict(r.phase_peaks),
                "largest_tensor": r.largest_tensor,
                "largest_tensor_op": r.largest_op,
            },
            "formula": dict(pred.formula),
            "predicted_peak": pred.predicted_peak,
            "gpu_total": gpu_total,
            "gpu_name": gpu_name,
            "budget": budget(gpu_total, margin),
            "fits": pred.fits(budget(gpu_total, margin)),
        },
        "host": {
            **pred.host,
            "available": host_total,
            "fits": host_total == 0 or pred.host["peak"] <= HOST_FRACTION * host_total,
        },
        "calibration": {"source": calibration.source, "constants": calibration.to_dict()},
        "suggestions": [],
        "notes": list(pred.notes),
        "seconds": round(time.time() - started, 2),
    }
    if extra:
        doc.update(extra)
    return doc
