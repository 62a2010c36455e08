"""Saved-file names (specs/training.md §10), ``--save_last_n_*`` pruning, ``--save_precision``, ``--lora_format``
(specs/networks.md §6.4) and atomic LoRA writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.networks.convert import DIFFUSERS_RENAMES, NAME_TABLES, convert_file_tensors, name_table
from musubi_tuner.utils.atomic import atomic_path, make_temp_dir, save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

LORA_FORMATS = ("kohya", "comfyui", "diffusers")
# key prefix of the dotted layouts, the same as ``convert_lora.py --target other --diffusers_prefix ...``
LORA_FORMAT_PREFIXES = {"comfyui": "diffusion_model", "diffusers": "transformer"}
# architectures whose diffusers module paths are the official ones (specs/networks.md §3); for the others (Wan,
# FLUX.2) the name tables hold official names only, so a "diffusers" file would carry the wrong module names
_DIFFUSERS_PATHS_ARE_OFFICIAL = frozenset({"kandinsky5", "qwen_image"})


def save_dtype(args: Any) -> torch.dtype:
    """``--save_precision`` (default fp32; ``full_fp16``/``full_bf16`` select fp16/bf16 when it is not given)."""
    if args.save_precision:
        return _PRECISIONS[args.save_precision]
    if getattr(args, "full_fp16", False):
        return torch.float16
    if getattr(args, "full_bf16", False):
        return torch.bfloat16
    return torch.float32


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def lora_file(output_dir: str | Path, stem: str) -> Path:
    """``<output_dir>/<stem>.safetensors``."""
    return Path(output_dir) / f"{stem}.safetensors"


def state_dir(output_dir: str | Path, stem: str) -> Path:
    """``<output_dir>/<stem>-state``."""
    return Path(output_dir) / f"{stem}-state"


def check_lora_format(lora_format: str, arch: str) -> None:
    """Argument-time check of ``--lora_format`` for the trainer's architecture (``architecture_full_name``).

    ``kohya`` always works; ``comfyui`` / ``diffusers`` need a conversion name table for ``arch`` (and for
    ``diffusers``, diffusers module paths equal to the official ones). ``UserError`` otherwise.
    """
    if lora_format not in LORA_FORMATS:
        raise UserError(f"--lora_format {lora_format!r}: expected one of {', '.join(LORA_FORMATS)}")
    if lora_format == "kohya":
        return
    if arch not in NAME_TABLES:
        raise UserError(
            f"--lora_format {lora_format}: architecture {arch!r} has no LoRA name table, so only --lora_format kohya "
            f"can be saved (tables exist for {', '.join(sorted(NAME_TABLES))})"
        )
    if lora_format == "diffusers" and arch not in _DIFFUSERS_PATHS_ARE_OFFICIAL and arch not in DIFFUSERS_RENAMES:
        raise UserError(
            f"--lora_format diffusers: renaming {arch} LoRAs to diffusers module names is not implemented; "
            "use --lora_format comfyui (official module names with the diffusion_model. prefix) or kohya"
        )


def check_network_lora_format(network: Any, lora_format: str, arch: str) -> None:
    """Before training: every module of ``network`` must be convertible to ``lora_format`` (``UserError`` otherwise).

    Checks the kohya names of ``network.state_dict()`` against ``arch``'s name table, so a network with modules the
    table does not know (or split ``lora_down.N`` factors, which ``lora_A``/``lora_B`` cannot hold) fails now rather
    than at the first save.
    """
    if lora_format == "kohya":
        return
    if lora_format == "diffusers":
        lycoris = sorted({k.split(".", 1)[0] for k in network.state_dict() if ".hada_" in k or ".lokr_" in k})
        if lycoris:
            raise UserError(
                f"--lora_format diffusers: module(s) {lycoris[:3]} are LoHa/LoKr, which diffusers/PEFT cannot load; "
                "save with --lora_format kohya (or comfyui)"
            )
    table = name_table(arch)
    names = sorted({k.split(".", 1)[0] for k in network.state_dict()})
    unknown = [n for n in names if (p := table.to_dotted(n)) is None or not table.is_module(p)]
    if unknown:
        raise UserError(
            f"--lora_format {lora_format}: {len(unknown)} of {len(names)} network module(s) are not in the {arch} name "
            f"table, e.g. {unknown[:5]}; save with --lora_format kohya"
        )
    split = sorted({k.split(".", 1)[0] for k in network.state_dict() if ".lora_down." in k and not k.endswith(".lora_down.weight")})
    if split:
        raise UserError(
            f"--lora_format {lora_format}: module(s) {split[:5]} have split LoRA factors (lora_down.N), which the "
            "lora_A/lora_B layout cannot hold; save with --lora_format kohya"
        )


def _save_converted(
    network: Any, path: Path, dtype: torch.dtype, metadata: dict[str, str] | None, lora_format: str, arch: str
) -> None:
    """Kohya tensors of ``network`` → ``lora_format`` through ``convert_lora``'s exact conversion, saved atomically."""
    if hasattr(network, "state_dict_for_save"):
        sd = network.state_dict_for_save(dtype)
    else:
        sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in network.state_dict().items()}
    target = "diffusers" if lora_format == "diffusers" else "other"
    out, md = convert_file_tensors(sd, metadata or {}, target, arch, LORA_FORMAT_PREFIXES[lora_format], str(path))
    save_safetensors_atomic(out, path, md if metadata is not None else None)


def save_network_atomic(
    network: Any,
    path: Path,
    dtype: torch.dtype,
    metadata: dict[str, str] | None,
    lora_format: str = "kohya",
    arch: str | None = None,
) -> None:
    """Save the LoRA file atomically in ``lora_format`` (``--lora_format``; ``arch`` names the name table).

    ``kohya``: our networks' ``save_weights`` is atomic itself (hidden ``.tmp`` file + rename); a foreign network module
    (which may pick the format from the suffix) writes ``<name>.safetensors`` inside a hidden temporary directory next
    to ``path`` (``.<name>.<random>.tmp/``), renamed over ``path`` when complete — so no partial file ever ends in
    ``.safetensors`` where a glob or ``--network_weights`` would find it. ``comfyui`` / ``diffusers``:
    the same file as ``convert_lora.py --target other --diffusers_prefix diffusion_model`` / ``transformer`` would
    write from the kohya file (``<prefix>.<path>.lora_A/B.weight``, alpha folded, no ``sshs_*`` hashes).
    """
    if lora_format != "kohya":
        if arch is None:
            raise ValueError(f"lora_format={lora_format!r} needs the architecture")
        _save_converted(network, path, dtype, metadata, lora_format, arch)
        return
    if hasattr(network, "state_dict_for_save"):
        network.save_weights(str(path), dtype, metadata)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = make_temp_dir(path.parent, f".{path.name}.")
    try:
        tmp_dir = tmp_dir.rename(tmp_dir.with_name(tmp_dir.name + ".tmp"))
        with atomic_path(path) as tmp:
            network.save_weights(str(tmp_dir / path.name), dtype, metadata)
            os.replace(tmp_dir / path.name, tmp)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        logger.info(f"removing old state {path}")
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        logger.info(f"removing old checkpoint {path}")
        path.unlink()


def prune_epoch_saves(args: Any, epoch: int) -> None:
    """After saving epoch ``epoch``: delete epoch ``epoch − N·save_every_n_epochs`` (``--save_last_n_epochs[_state]``)."""
    every = args.save_every_n_epochs or 1
    if args.save_last_n_epochs:
        old = epoch - args.save_last_n_epochs * every
        if old > 0:
            _remove(lora_file(args.output_dir, epoch_name(args.output_name, old)))
    if args.save_last_n_epochs_state:
        old = epoch - args.save_last_n_epochs_state * every
        if old > 0:
            _remove(state_dir(args.output_dir, epoch_name(args.output_name, old)))


def _old_step(step: int, keep: int, every: int) -> int:
    """``r = step − keep − 1`` rounded down to a multiple of ``every`` (0 = nothing to delete)."""
    r = step - keep - 1
    return (r // every) * every if r > 0 else 0


def prune_step_saves(args: Any, step: int) -> None:
    """After saving step ``step``: ``--save_last_n_steps[_state]`` keep the saves of the last N **steps**."""
    every = args.save_every_n_steps or 1
    if args.save_last_n_steps:
        old = _old_step(step, args.save_last_n_steps, every)
        if old > 0:
            _remove(lora_file(args.output_dir, step_name(args.output_name, old)))
    if args.save_last_n_steps_state:
        old = _old_step(step, args.save_last_n_steps_state, every)
        if old > 0:
            _remove(state_dir(args.output_dir, step_name(args.output_name, old)))
