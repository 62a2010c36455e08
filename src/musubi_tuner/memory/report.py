"""The one-glance table of an estimate (specs/memory_estimator.md §6)."""

from __future__ import annotations

from typing import Any

from musubi_tuner.memory.formulas import GiB, MiB


def _units(doc: dict[str, Any]) -> tuple[int, str]:
    """GiB, or MiB for small (tiny-bundle) estimates."""
    return (GiB, "GiB") if doc["device"]["traced"]["peak"] >= GiB // 4 else (MiB, "MiB")


def render(doc: dict[str, Any], title: str) -> str:
    """The text report of an estimate document (``estimate.document``)."""
    d, h, t, f = doc["device"], doc["host"], doc["device"]["traced"], doc["device"]["formula"]
    unit, uname = _units(doc)

    def _g(n: float) -> str:
        return f"{n / unit:8.2f}"

    lines = [title, f"{'(' + uname + ')':34s}{'GPU (peak)':>12s}{'host RAM':>12s}"]

    def row(label: str, gpu: float | None, host: float | None = None) -> None:
        g = _g(gpu) if gpu is not None else "       –"
        hh = _g(host) if host is not None else "       –"
        lines.append(f"{label:34s}{g:>12s}{hh:>12s}")

    row("DiT weights (resident)", t["params"])
    row("trainable parameters", t["trainable"])
    row("activations + inputs at the peak", t["activations"])
    row("grads + backward temporaries", t["grads"])
    if t["optimizer"]:
        row("optimizer state + step temporaries", t["optimizer"])
    lines.append(f"{'  = traced peak':34s}{_g(t['peak']):>12s}")
    if f["swap_saved"]:
        row(f"block swap ({doc['config']['blocks_to_swap']} blocks)", -f["swap_saved"], f["swap_saved"])
    if f["offload_saved"]:
        row("activation CPU offload", -f["offload_saved"])
    if f["bnb_state"]:
        row("optimizer state (formula)", f["bnb_state"])
    row("CUDA context + workspaces", f["context"] + f["workspaces"])
    row("allocator slack", f["slack"])
    row("host baseline (runtime, workers)", None, h["baseline"])
    row("host load peak", None, h["load_peak"])
    gpu_total = d["gpu_total"]
    verdict = "fits" if d["fits"] else "DOES NOT FIT"
    host_avail = h["available"]
    host_verdict = "fits" if h["fits"] else "DOES NOT FIT"
    host_txt = f"{h['peak'] / GiB:.1f} / {host_avail / GiB:.1f} {host_verdict}" if host_avail else f"{h['peak'] / GiB:.1f}"
    lines.append(f"TOTAL  GPU {d['predicted_peak'] / GiB:.2f} / {gpu_total / GiB:.1f} GiB {verdict}    host {host_txt} GiB")
    phases = ", ".join(f"{k} {v / unit:.2f}" for k, v in t["phase_peaks"].items())
    lines.append(f"phase peaks (traced, {uname}): {phases}")
    lines.append(f"largest tensor {t['largest_tensor'] / MiB:.0f} MiB ({t['largest_tensor_op']})")
    for size, fits in doc.get("verdicts", {}).items():
        lines.append(f"  {size:>5s} GiB GPU: {'fits' if fits else 'does not fit'}")
    sweep = doc.get("frames_sweep")
    if sweep:
        if sweep.get("largest_fitting") is not None:
            lines.append(
                f"frames sweep: up to {sweep['largest_fitting']} latent frames fit "
                f"({sweep['predicted_peak'] / GiB:.2f} GiB predicted)"
            )
        else:
            lines.append(f"frames sweep: {sweep.get('note', 'no frame count fits with these settings')}")
    for i, s in enumerate(doc.get("suggestions", [])):
        head = "suggestion" if i == 0 else "alternative"
        flags = " ".join(s["flags"]) or "(no flags)"
        lines.append(
            f"{head}: {s['change']}: {flags} -> {s['predicted_peak'] / GiB:.2f} GiB{'' if s['fits'] else ' (does not fit)'}"
        )
    margin = 1 - d["predicted_peak"] / gpu_total if gpu_total else 0
    if 0 < margin < 0.15:
        lines.append("tip: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces allocator fragmentation (margin < 15 %)")
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(f"calibration: {doc['calibration']['source']}; estimate took {doc['seconds']:.1f} s")
    return "\n".join(lines)
