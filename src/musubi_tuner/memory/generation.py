"""Generation estimate (specs/memory_estimator.md §8.10): the DiT forward traced at each job's size, text encoders and
VAE from their headers, phases that free models between them taking the maximum."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.memory import formulas
from musubi_tuner.memory.estimate import HOST_FRACTION, _rss, budget, mem_available
from musubi_tuner.memory.formulas import GiB, MiB
from musubi_tuner.memory.options import gpu_sizes
from musubi_tuner.memory.tracker import CUDA_ALLOCATION_GRANULARITY, LiveTensorTracker
from musubi_tuner.utils.atomic import atomic_write_text
from musubi_tuner.utils.safetensors_utils import open_weights


@dataclass
class GenerationPlan:
    """What an architecture's generate script will hold, per phase (from its validated arguments)."""

    title: str
    build_dit: Callable[[], torch.nn.Module]  # the generator's DiT load, run header-only on fake tensors
    dit_inputs: list[Callable[[torch.nn.Module], dict[str, Any]]]  # one per distinct job size: DiT kwargs (fake)
    call_dit: Callable[[torch.nn.Module, dict[str, Any]], Any]
    sampler_state: list[int]  # bytes the sampler keeps next to the DiT per job (latents, velocities)
    blocks_to_swap: int = 0
    text_encoders: dict[str, tuple[int, bool]] = field(default_factory=dict)  # name -> (bytes, on GPU)
    vae: int = 0
    notes: list[str] = field(default_factory=list)
    dit_copies: int = 1  # DiTs of the same dims resident together (Wan 2.2 A14B experts): each adds its resident weights


def weights_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint (file, shards or HF directory of safetensors) from its headers."""
    p = Path(path)
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    total = 0
    for f in files:
        with open_weights(f) as reader:
            total += sum(reader.get_nbytes(k) for k in reader.keys())
    return total


def scaled_fp8_bytes(path: str | Path) -> int:
    """Bytes of the fp8 Linear weights that carry a scale (a ComfyUI scaled-fp8 file; 0 for other files), from headers."""
    from musubi_tuner.utils.scaled_fp8_keys import weight_scale_module

    p = Path(path)
    total = 0
    for f in sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]:
        with open_weights(f) as reader:
            keys = set(reader.keys())
            scaled = {f"{m}.weight" for k in keys if (m := weight_scale_module(k)) is not None}
            total += sum(reader.get_nbytes(k) for k in scaled & keys)
    return total


def text_encoder_bytes(path: str | Path, fp8: bool) -> int:
    """A text encoder's weights as loaded: a plain file at its header size, halved with its ``--fp8_*`` flag (the
    Linears quantised to one byte); a scaled-fp8 file at its size with the flag (used as stored) and with its fp8
    weights dequantised to two bytes (bf16) without it."""
    total, scaled = weights_bytes(path), scaled_fp8_bytes(path)
    if fp8:
        return total if scaled else total // 2
    return total + scaled


def estimate_generation(args: Any, plan: GenerationPlan, gpu_total: int, gpu_name: str, arch: str) -> dict[str, Any]:
    """Trace the DiT forward for every job size and print the generation estimate."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from musubi_tuner.memory.run import load_calibration
    from musubi_tuner.memory.training import quiet_logs
    from musubi_tuner.utils.safetensors_utils import header_only_reads

    started = time.time()
    c = load_calibration()
    peaks = []
    with quiet_logs(), header_only_reads(), FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        dit = plan.build_dit()
        weights = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()])
        max_swap = formulas.max_blocks_to_swap(dit, training=False) if hasattr(dit, "_split_blocks_to_swap") else 0
        swap_s = min(plan.blocks_to_swap, max_swap)
        swap_saved, largest_block, _ = formulas.block_swap_saved(dit, swap_s, training=False) if swap_s else (0, 0, [])
        for make_inputs, state in zip(plan.dit_inputs, plan.sampler_state):
            inputs = make_inputs(dit)
            tracker = LiveTensorTracker(round_to=CUDA_ALLOCATION_GRANULARITY)
            tracker.register_module(dit)
            tracker.register(inputs, "inputs")
            with tracker:
                out = plan.call_dit(dit, inputs)
            del out
            peaks.append(tracker.result.peak + state)
    if plan.blocks_to_swap > swap_s:
        plan.notes.append(f"--blocks_to_swap {plan.blocks_to_swap} is more than the model can swap; counted as {swap_s}")
    denoise = max(peaks) - swap_saved + (plan.dit_copies - 1) * (weights - swap_saved)
    te_gpu = sum(b for b, on_gpu in plan.text_encoders.values() if on_gpu)
    phases = {"text encoding": te_gpu, "denoising": denoise + c.cublas_workspace, "decoding (VAE weights only)": plan.vae}
    allocated = max(phases.values())
    slack = formulas.allocator_slack(allocated, c, False, False)
    predicted = allocated + slack + c.cuda_context
    host_baseline = _rss() + c.host_runtime
    te_host = sum(b for b, on_gpu in plan.text_encoders.values() if not on_gpu)
    host_peak = host_baseline + max(te_host, swap_saved + 2 * largest_block, weights if swap_s else 0) + 64 * MiB
    available = mem_available()
    doc = {
        "schema": 1,
        "mode": "generate",
        "architecture": arch,
        "config": {"task": getattr(args, "task", None), "dit": str(getattr(args, "dit", "")), "blocks_to_swap": swap_s},
        "device": {
            "phases": phases,
            "dit_weights": weights * plan.dit_copies,
            "formula": {"swap_saved": swap_saved, "context": c.cuda_context, "workspaces": c.cublas_workspace, "slack": slack},
            "predicted_peak": predicted,
            "gpu_total": gpu_total,
            "gpu_name": gpu_name,
            "fits": predicted <= budget(gpu_total, args.memory_margin),
        },
        "host": {
            "peak": host_peak,
            "available": available,
            "fits": available == 0 or host_peak <= HOST_FRACTION * available,
        },
        "calibration": {"source": c.source, "constants": c.to_dict()},
        "notes": plan.notes,
        "seconds": round(time.time() - started, 2),
    }
    sizes = gpu_sizes(args)
    if sizes:
        doc["verdicts"] = {f"{s:g}": predicted <= budget(int(s * GiB), args.memory_margin) for s in sizes}
    lines = [plan.title]
    for name, b in phases.items():
        lines.append(f"  {name:34s}{b / GiB:8.2f} GiB")
    if swap_saved:
        lines.append(f"  block swap ({swap_s} blocks) saves   {swap_saved / GiB:8.2f} GiB on the GPU")
    lines.append(f"  CUDA context + slack{'':14s}{(c.cuda_context + slack) / GiB:8.2f} GiB")
    verdict = "fits" if doc["device"]["fits"] else "DOES NOT FIT"
    lines.append(f"TOTAL  GPU {predicted / GiB:.2f} / {gpu_total / GiB:.1f} GiB {verdict}    host {host_peak / GiB:.1f} GiB")
    for size, fits in doc.get("verdicts", {}).items():
        lines.append(f"  {size:>5s} GiB GPU: {'fits' if fits else 'does not fit'}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"calibration: {c.source}; estimate took {doc['seconds']:.1f} s")
    print("\n".join(lines))
    if args.estimate_json:
        atomic_write_text(args.estimate_json, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc
