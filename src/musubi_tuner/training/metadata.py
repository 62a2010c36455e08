"""Metadata of saved LoRAs: kohya ``ss_*`` keys and SAI ModelSpec keys (specs/training.md §12). All values are
strings; non-ASCII text is kept as UTF-8 (safetensors metadata is JSON)."""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

MINIMAL_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")

MODELSPEC_ARCH = {
    "kandinsky5": ("Kandinsky-5", "https://github.com/kandinskylab/kandinsky-5"),
    "flux_2": ("Flux.2-dev", "https://github.com/black-forest-labs/flux2"),
    "qwen_image": ("Qwen-Image", "https://github.com/QwenLM/Qwen-Image"),
    "qwen_image_edit": ("Qwen-Image-Edit", "https://github.com/QwenLM/Qwen-Image"),
    "wan": ("wan2.1", "https://github.com/Wan-Video/Wan2.1"),
    "hunyuan_video": ("hunyuan-video", "https://github.com/Tencent/HunyuanVideo"),
}
_RESOLUTIONS = {"qwen_image": "1328x1328", "qwen_image_edit": "1024x1024", "z_image": "1024x1024"}


def _number(x: float) -> str:
    """``100.0`` → ``100`` (the options are floats; integral values are written like the reference's ints)."""
    return str(int(x)) if float(x).is_integer() else str(x)


def _basename(path: str | None) -> str:
    return os.path.basename(path) if path else ""


def dataset_metadata(group: Any) -> str:
    """``ss_datasets``: a JSON list with the main parameters of each training dataset."""
    out = []
    for d in getattr(group, "datasets", []):
        p = d.params
        entry: dict[str, Any] = {
            "is_video": p.is_video,
            "resolution": list(p.resolution),
            "caption_extension": p.caption_extension,
            "batch_size_per_device": p.batch_size,
            "num_repeats": p.num_repeats,
            "enable_bucket": p.enable_bucket,
            "bucket_no_upscale": p.bucket_no_upscale,
            p.source_key: _basename(str(p.source_path)),
        }
        if p.is_video:
            entry.update(
                frame_extraction=p.frame_extraction,
                frame_stride=p.frame_stride,
                frame_sample=p.frame_sample,
                target_frames=list(p.target_frames),
                max_frames=p.max_frames,
                source_fps=p.source_fps,
                has_control=bool(p.control_directory),
            )
        out.append(entry)
    return json.dumps(out, ensure_ascii=False)


def training_metadata(
    args: Any,
    *,
    arch_full_name: str,
    session_id: int,
    training_started_at: float,
    num_train_items: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    optimizer_desc: str,
    datasets_json: str,
    network_args: dict[str, Any],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The ``ss_*`` keys known at the start of training (``finalize_metadata`` adds the per-save ones)."""
    md: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_num_train_items": num_train_items,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_checkpointing_cpu_offload": args.gradient_checkpointing_cpu_offload,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_base_model_version": arch_full_name,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_seed": args.seed,
        "ss_training_comment": args.training_comment,
        "ss_optimizer": optimizer_desc,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_fp8_base": bool(args.fp8_base),
        "ss_full_fp16": False,
        "ss_full_bf16": False,
        "ss_weighting_scheme": args.weighting_scheme,
        "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std,
        "ss_mode_scale": args.mode_scale,
        "ss_guidance_scale": args.guidance_scale,
        "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale,
        "ss_discrete_flow_shift": args.discrete_flow_shift,
        "ss_image_flow_shift": getattr(args, "image_flow_shift", None),
        "ss_datasets": datasets_json,
        "ss_network_args": json.dumps(network_args, ensure_ascii=False),
        "ss_noise_offset": getattr(args, "noise_offset", None),
        "ss_adaptive_noise_scale": getattr(args, "adaptive_noise_scale", None),
        "ss_multires_noise_iterations": getattr(args, "multires_noise_iterations", None),
        "ss_multires_noise_discount": getattr(args, "multires_noise_discount", None)
        if getattr(args, "multires_noise_iterations", None)
        else None,
        "ss_sd_model_name": _basename(args.dit),
        "ss_vae_name": _basename(args.vae),
    }
    md.update(extra or {})
    result = {k: str(v) for k, v in md.items() if v is not None}
    if args.no_metadata:
        result = {k: v for k, v in result.items() if k in MINIMAL_KEYS}
    return result


def bucket_resolution(group: Any) -> str | None:
    """``WxH`` of the bucket holding most training items (repeats counted; ties: the larger area), or None."""
    counts: dict[tuple[int, int], int] = {}
    for d in getattr(group, "datasets", []):
        for item in getattr(d, "items", []):
            bucket = tuple(item.bucket)
            counts[bucket] = counts.get(bucket, 0) + max(1, int(getattr(d.params, "num_repeats", 1) or 1))
    if not counts:
        return None
    w, h = max(counts, key=lambda b: (counts[b], b[0] * b[1], b))
    return f"{w}x{h}"


def modelspec_metadata(args: Any, arch_full_name: str, timestamp: float, resolution: str | None = None) -> dict[str, str]:
    """SAI ModelSpec keys (always written). ``modelspec.resolution``: ``--metadata_reso``, else ``resolution`` (the
    trained buckets, ``bucket_resolution``), else the architecture's nominal size."""
    arch, impl = MODELSPEC_ARCH.get(arch_full_name, (arch_full_name, ""))
    reso = resolution or _RESOLUTIONS.get(arch_full_name, "1280x720")
    if args.metadata_reso:
        parts = [p.strip() for p in str(args.metadata_reso).replace("x", ",").split(",")]
        reso = f"{parts[0]}x{parts[-1]}"
    date = datetime.datetime.fromtimestamp(timestamp).isoformat()
    title = args.metadata_title or args.output_name or f"LoRA@{date}"
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": args.metadata_arch or f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.date": date,
        "modelspec.resolution": reso,
    }
    optional = (
        ("author", args.metadata_author),
        ("description", args.metadata_description),
        ("license", args.metadata_license),
        ("tags", args.metadata_tags),
    )
    for key, value in optional:
        if value:
            md[f"modelspec.{key}"] = str(value)
    if args.min_timestep is not None or args.max_timestep is not None:
        lo = 0 if args.min_timestep is None else args.min_timestep
        hi = 1000 if args.max_timestep is None else args.max_timestep
        md["modelspec.timestep_range"] = f"{_number(lo)},{_number(hi)}"
    return md


def finalize_metadata(
    base: dict[str, str], args: Any, arch_full_name: str, *, steps: int, epoch: int, resolution: str | None = None
) -> dict[str, str]:
    """The metadata of one save: the run's keys plus step, epoch, finish time and ModelSpec (``resolution``: see
    ``modelspec_metadata``)."""
    now = time.time()
    md = dict(base)
    if not args.no_metadata:
        md.update(ss_training_finished_at=str(now), ss_steps=str(steps), ss_epoch=str(epoch))
    md.update(modelspec_metadata(args, arch_full_name, now, resolution))
    return md
