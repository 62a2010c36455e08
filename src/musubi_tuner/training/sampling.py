"""Sample images/videos during training (specs/training.md §9): triggers, prompt defaults, RNG isolation, names.

Prompts are parsed by ``musubi_tuner.utils.prompt_lines.load_prompt_file`` and encoded once per run by the
architecture's ``process_sample_prompts``; ``sample_images`` runs ``do_inference`` per prompt and saves the result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musubi_tuner.training.fsdp import is_sharded
from musubi_tuner.training.sample_output import save_sample
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

DEFAULT_SIZE = 256
DEFAULT_STEPS = 20
DEFAULT_FLOW_SHIFT = 14.5


def load_sample_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompt file as a list of dicts (the fields of ``PromptSpec``), each with its ``enum`` index."""
    from musubi_tuner.utils.prompt_lines import load_prompt_file

    specs = load_prompt_file(path)
    out = []
    for i, spec in enumerate(specs):
        d = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
        d["enum"] = i
        out.append(d)
    return out


def resolve_sample_parameters(
    prompt: dict[str, Any],
    *,
    resolution_step: int = 16,
    frame_stride: int = 4,
    default_guidance_scale: float = 1.0,
    default_flow_shift: float = DEFAULT_FLOW_SHIFT,
) -> dict[str, Any]:
    """Fill defaults: 256×256 rounded down to the resolution step, 1 frame rounded to ``((n−1)//stride)·stride + 1``,
    20 steps clamped to 1..1000, the architecture's guidance scale and flow shift."""
    p = dict(prompt)
    for key in ("width", "height"):
        value = int(p.get(key) or DEFAULT_SIZE)
        p[key] = max(resolution_step, value // resolution_step * resolution_step)
    frames = int(p.get("frame_count") or 1)
    p["frame_count"] = ((max(1, frames) - 1) // frame_stride) * frame_stride + 1
    p["sample_steps"] = min(1000, max(1, int(p.get("sample_steps") or DEFAULT_STEPS)))
    if p.get("guidance_scale") is None:
        p["guidance_scale"] = default_guidance_scale
    if p.get("discrete_flow_shift") is None:
        p["discrete_flow_shift"] = default_flow_shift
    return p


def should_sample(args: Any, *, step: int | None = None, epoch: int | None = None) -> bool:
    """Step trigger (``--sample_every_n_steps``, step 0 = ``--sample_at_first``) or epoch trigger."""
    if not args.sample_prompts:
        return False
    if step is not None:
        if step == 0:
            return bool(args.sample_at_first)
        return bool(args.sample_every_n_steps) and step % args.sample_every_n_steps == 0
    if epoch is not None:
        return bool(args.sample_every_n_epochs) and epoch % args.sample_every_n_epochs == 0
    return False


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Save and restore the Python, NumPy, torch CPU and CUDA RNG states (sampling never shifts training noise)."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def sample_tag(*, step: int | None, epoch: int | None) -> str:
    """``e000001`` for an epoch trigger, ``000100`` (6 digits) for a step trigger."""
    return f"e{epoch:06d}" if epoch is not None else f"{step:06d}"


def sample_base_path(output_dir: str | Path, output_name: str, tag: str, idx: int, seed: int | None) -> Path:
    """``<output_dir>/sample/<output_name>_<tag>_<idx:02d>_<YYYYmmddHHMMSS>[_<seed>]`` (extension added later)."""
    ts = time.strftime("%Y%m%d%H%M%S", time.localtime())
    name = f"{output_name}_{tag}_{idx:02d}_{ts}" + (f"_{seed}" if seed is not None else "")
    return Path(output_dir) / "sample" / name


def sample_images(
    trainer: Any,
    accelerator: Any,
    args: Any,
    *,
    epoch: int | None,
    step: int,
    vae: Any,
    transformer: Any,
    sample_parameters: list[dict[str, Any]],
    dit_dtype: torch.dtype,
) -> list[Path]:
    """Generate every prompt (split across processes) and save it; returns this process's saved files."""
    tag = sample_tag(step=None if epoch is not None else step, epoch=epoch)
    model = accelerator.unwrap_model(transformer)
    saved: list[Path] = []
    trainer.on_before_sample_images(accelerator, args, epoch, step, vae, model)
    swap = getattr(model, "blocks_to_swap", 0) and hasattr(model, "switch_block_swap_for_inference")
    was_training = model.training
    model.eval()
    if swap:
        model.switch_block_swap_for_inference()
    try:
        # a sharded DiT runs collectives in every forward: every process generates every prompt, process 0 saves
        sharded = is_sharded(model)
        split = contextlib.nullcontext(sample_parameters) if sharded else accelerator.split_between_processes(sample_parameters)
        with preserved_rng(), torch.no_grad(), split as mine:
            for raw in mine:
                params = resolve_sample_parameters(
                    raw,
                    resolution_step=trainer.resolution_step,
                    frame_stride=trainer.vae_frame_stride,
                    default_guidance_scale=trainer.default_guidance_scale,
                    default_flow_shift=trainer.default_discrete_flow_shift,
                )
                seed = params.get("seed")
                generator = torch.Generator(device=accelerator.device)
                if seed is not None:
                    generator.manual_seed(int(seed))
                else:
                    generator.seed()
                video = trainer.do_inference(accelerator, args, params, vae, dit_dtype, model, generator)
                if video is None or (sharded and not accelerator.is_main_process):
                    continue
                base = sample_base_path(args.output_dir, args.output_name, tag, int(params.get("enum", 0)), seed)
                metadata = _sample_metadata(trainer, args, params, generator.initial_seed(), step)
                for i, item in enumerate(video if video.ndim == 5 else video.unsqueeze(0)):
                    target = base if i == 0 else base.with_name(f"{base.name}_{i}")
                    saved.extend(save_sample(item, target, metadata=metadata))
                logger.info(f"sample saved: {', '.join(str(p) for p in saved[-1:])}")
    finally:
        if swap:
            model.switch_block_swap_for_training()
        model.train(was_training)
    _log_to_wandb(accelerator, saved, step)
    trainer.on_after_sample_images(accelerator, args, epoch, step, vae, model)
    return saved


def sample_generation_metadata(
    args: Any, params: dict[str, Any], *, model_type: str, seed: int, step: int, extra: dict[str, Any] | None = None
) -> dict[str, str]:
    """The ``bt_*`` metadata of a training sample: the keys a generate script writes for the same settings
    (``utils.generation_metadata.prepare_metadata``), plus ``bt_training_output_name`` / ``bt_training_step``."""
    from musubi_tuner.utils.generation_metadata import prepare_metadata

    cfg = params.get("cfg_scale") if params.get("cfg_scale") is not None else params.get("guidance_scale")
    keys: dict[str, Any] = {
        "bt_width": params.get("width"),
        "bt_height": params.get("height"),
        "bt_video_length": params.get("frame_count"),
        "bt_infer_steps": params.get("sample_steps"),
        "bt_guidance_scale": cfg,
        "bt_flow_shift": params.get("discrete_flow_shift"),
        "bt_training_output_name": args.output_name,
        "bt_training_step": step,
        **(extra or {}),
    }
    return prepare_metadata(
        argparse.Namespace(),
        model_type=model_type,
        seeds=int(seed),
        prompt=params.get("prompt") or "",
        negative_prompt=params.get("negative_prompt"),
        extra=keys,
    )


def _sample_metadata(trainer: Any, args: Any, params: dict[str, Any], seed: int, step: int) -> dict[str, str] | None:
    hook = getattr(trainer, "sample_metadata", None)
    if callable(hook):
        return hook(args, params, seed=seed, step=step)
    return sample_generation_metadata(args, params, model_type=getattr(trainer, "architecture", "unknown"), seed=seed, step=step)


def _log_to_wandb(accelerator: Any, files: list[Path], step: int) -> None:
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name != "wandb" or not files:
            continue
        import wandb  # type: ignore[import-not-found]

        media = {f"sample_{i}": (wandb.Video(str(p)) if p.suffix == ".mp4" else wandb.Image(str(p))) for i, p in enumerate(files)}
        tracker.log(media, step=step)
