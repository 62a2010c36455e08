"""Stream a checkpoint into a model tensor by tensor (model built on ``meta`` or CPU), optionally to fp8.

Each tensor goes: read (file dtype) → optional LoRA delta hook (high precision, before any quantisation) → dtype
conversion → optional fp8 quantisation → moved to ``device`` → assigned as the module's parameter/buffer. The model
never holds a second copy, so peak memory stays near the final model size (bench/load_peak_memory.py).

fp8 rules (training.md §16): a checkpoint with ``*.scale_weight`` keys (ComfyUI's scaled-fp8 layout, its markers and
input scales included: ``utils.scaled_fp8_keys``) is pre-quantised and used as-is (or dequantised on request); with
``Fp8Config(scaled=True)`` targeted Linear weights are quantised while streaming; with ``scaled=False`` (plain
``--fp8_base``) they are cast to fp8 and upcast per layer at compute time. Every Linear that ends with an fp8 weight
gets a patched forward, so the model runs on any device.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from musubi_tuner.modules.fp8_optimization import (
    Fp8Config,
    apply_fp8_monkey_patch,
    cast_to_fp8,
    check_scaled_mm_supported,
    dequantize_weight,
    is_fp8_dtype,
    is_fp8_target,
    patch_fp8_upcast_forward,
    quantize_weight,
)
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.key_mapping import KeyMap
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights
from musubi_tuner.utils.scaled_fp8_keys import check_comfy_quant, ignored_companion_module, is_marker, weight_scale_module

logger = get_logger(__name__)

LoraDeltaHook = Callable[[str, torch.Tensor], torch.Tensor]
MAX_EXAMPLES = 5


@dataclass
class LoadResult:
    """What ``load_weights_into_model`` did (with ``strict=False`` the missing/unexpected lists may be non-empty)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    prequantized: bool = False
    fp8_linears: list[str] = field(default_factory=list)
    dequantized: list[str] = field(default_factory=list)


def _examples(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_EXAMPLES])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > MAX_EXAMPLES else "")


def _module_and_name(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    mod_name, _, leaf = key.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), leaf


def _assign(module: nn.Module, leaf: str, t: torch.Tensor, requires_grad: bool) -> None:
    if leaf in module._parameters:
        old = module._parameters[leaf]
        grad = requires_grad and old is not None and old.requires_grad and t.is_floating_point() and not is_fp8_dtype(t.dtype)
        module._parameters[leaf] = nn.Parameter(t, requires_grad=grad)
    else:
        module._buffers[leaf] = t


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere), e.g. after a model was sharded."""
    _release_freed_heap()


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS after a converted tensor replaced its read buffer.

    glibc raises its mmap threshold after the first large free, so later read buffers and float32 temporaries come
    from the heap; interleaved with the long-lived converted tensors they leave holes that stay resident. Measured on
    a 2 GB checkpoint loaded to fp8 this doubled the peak RSS; trimming costs ~1-5 ms per tensor.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _rescale_merge(hook: LoraDeltaHook, key: str, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge into a pre-quantised weight: dequantise, let the hook add its delta, re-quantise with a fresh scale."""
    w = dequantize_weight(q, scale, torch.float32)
    merged = hook(key, w)
    if merged is w:
        return q, scale
    if scale.numel() == 1:
        mode, block = "tensor", 1
    elif scale.ndim == 2:
        mode, block = "channel", 1
    else:
        mode, block = "block", q.shape[1] // scale.shape[1]
    new_q, new_scale = quantize_weight(merged.to(scale.dtype), mode, block, q.dtype)
    return new_q, new_scale


def _per_tensor_shape(scale: torch.Tensor) -> torch.Tensor:
    """ComfyUI stores per-tensor scales as scalars (shape ``[]``); ours are ``[1]`` (fp8_optimization's tensor mode)."""
    return scale.reshape(1) if scale.ndim == 0 else scale


def _scaled_fp8_keys(
    model: nn.Module,
    reader: WeightsReader,
    file_to_model: dict[str, str],
    model_to_file: dict[str, str],
    expected: dict[str, torch.Tensor],
) -> tuple[dict[str, str], set[str]]:
    """The weight scales of a pre-quantised file (model weight key → file scale key) and the file keys consumed
    without effect (marker, input scales, ``comfy_quant``; see ``utils.scaled_fp8_keys``). A scale whose Linear
    weight the file lacks, or whose weight is not fp8, is a ``UserError`` naming the scale key."""
    scales: dict[str, str] = {}
    for fk, mk in file_to_model.items():
        module_name = weight_scale_module(mk)
        if mk in expected or module_name is None:
            continue
        weight_key = module_name + ".weight"
        if weight_key not in expected or not isinstance(_module_and_name(model, weight_key)[0], nn.Linear):
            continue  # not a Linear of this model: reported as an unexpected key
        weight_fk = model_to_file.get(weight_key)
        if weight_fk is None:
            raise UserError(
                f"{reader.file_of(fk)}: fp8 scale {fk!r} has no weight {weight_key!r} in the checkpoint "
                "(a truncated or wrongly converted file?)"
            )
        if not is_fp8_dtype(reader.get_dtype(weight_fk)):
            raise UserError(
                f"{reader.file_of(fk)}: fp8 scale {fk!r} belongs to {weight_fk!r}, which is "
                f"{reader.get_dtype(weight_fk)}, not fp8 (a wrongly converted file?)"
            )
        if weight_key in scales:
            raise UserError(f"{reader.file_of(fk)}: {weight_fk!r} has two fp8 scales, {scales[weight_key]!r} and {fk!r}")
        scales[weight_key] = fk
    ignored: set[str] = set()
    for fk, mk in file_to_model.items():
        if mk in expected:
            continue
        module_name = ignored_companion_module(mk)
        if is_marker(mk) or (module_name is not None and module_name + ".weight" in scales):
            check_comfy_quant(reader, fk)
            ignored.add(fk)
    return scales, ignored


def load_weights_into_model(
    model: nn.Module,
    path: str | os.PathLike | Iterable[str | os.PathLike] | WeightsReader,
    *,
    key_map: KeyMap | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    fp8: Fp8Config | None = None,
    strict: bool = True,
    lora_deltas: LoraDeltaHook | None = None,
    keep_in_fp32: tuple[str, ...] = (),
    progress: bool = True,
    dequantize_prequantized: bool = False,
) -> LoadResult:
    """Load a checkpoint into ``model`` one tensor at a time, assigning (not copying into) its parameters.

    ``path``: anything ``open_weights`` accepts, or an open ``WeightsReader``. ``key_map`` maps file keys to model
    keys. ``dtype``: floating tensors are converted to it (None keeps the file dtype); keys containing a
    ``keep_in_fp32`` substring load as float32. ``lora_deltas(key, weight) -> weight`` receives each tensor (model
    key, high precision: fp8 weights are dequantised to float32 first) and returns it merged, or the same object
    when it has nothing for that key. ``fp8`` selects fp8 storage (see module docstring); ``dequantize_prequantized``
    turns the fp8 weights of a pre-quantised file into ``dtype`` (``W = q · scale``, one weight at a time) instead of
    keeping them (text encoders without their ``--fp8_*`` flag). With ``strict``, missing or
    unexpected keys are a ``UserError`` naming the file and examples; shape mismatches always are. Tensors the
    checkpoint does not provide must not be left on the ``meta`` device.
    """
    reader = path if isinstance(path, WeightsReader) else open_weights(path)
    try:
        return _load(
            model, reader, key_map, dtype, torch.device(device), fp8, strict, lora_deltas, keep_in_fp32, progress,
            dequantize_prequantized,
        )  # fmt: skip
    finally:
        if reader is not path:
            reader.close()


def _load(
    model: nn.Module,
    reader: WeightsReader,
    key_map: KeyMap | None,
    dtype: torch.dtype | None,
    device: torch.device,
    fp8: Fp8Config | None,
    strict: bool,
    hook: LoraDeltaHook | None,
    keep_in_fp32: tuple[str, ...],
    progress: bool,
    dequantize_prequantized: bool,
) -> LoadResult:
    if fp8 is not None and fp8.use_scaled_mm:
        check_scaled_mm_supported(device)
    expected = model.state_dict(keep_vars=True)
    file_to_model = (key_map or KeyMap()).map_keys(reader.keys())
    model_to_file = {v: k for k, v in file_to_model.items()}
    result = LoadResult()

    scales, ignored = _scaled_fp8_keys(model, reader, file_to_model, model_to_file, expected)
    result.prequantized = bool(scales)
    scale_file_keys = set(scales.values())

    result.missing = [k for k in expected if k not in model_to_file]
    consumed = scale_file_keys | ignored
    result.unexpected = [fk for fk, mk in file_to_model.items() if mk not in expected and fk not in consumed]
    if strict and (result.missing or result.unexpected):
        parts = []
        if result.missing:
            parts.append(f"{len(result.missing)} model key(s) missing from the file: {_examples(result.missing)}")
        if result.unexpected:
            where = reader.file_of(result.unexpected[0])
            parts.append(f"{len(result.unexpected)} unexpected key(s) in {where}: {_examples(result.unexpected)}")
        raise UserError(f"{reader.name}: checkpoint does not match the model: " + "; ".join(parts))
    for fk, mk in file_to_model.items():
        if mk in expected and tuple(reader.get_shape(fk)) != tuple(expected[mk].shape):
            raise UserError(
                f"{reader.file_of(fk)}: tensor {fk!r} has shape {list(reader.get_shape(fk))}, "
                f"the model expects {list(expected[mk].shape)} for {mk!r} (wrong checkpoint or model config?)"
            )
    if result.prequantized:
        how = f"dequantised to {dtype or torch.bfloat16}" if dequantize_prequantized else "used as-is"
        logger.info("%s: pre-quantised fp8 checkpoint (%d scaled Linear weights), %s", reader.name, len(scales), how)

    tensor_fp8 = None if result.prequantized else fp8  # a pre-quantised file is used as-is, never quantised further
    keys = [fk for fk in file_to_model if fk not in scale_file_keys and file_to_model[fk] in expected]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), desc="loading weights", unit="tensor", leave=False)
    for fk in keys:
        mk = file_to_model[fk]
        module, leaf = _module_and_name(model, mk)
        t = reader.get_tensor(fk)
        requires_grad = True
        if mk in scales and dequantize_prequantized:
            scale = _per_tensor_shape(reader.get_tensor(scales[mk]))
            target = torch.float32 if any(s in mk for s in keep_in_fp32) else (dtype or torch.bfloat16)
            w = dequantize_weight(t, scale, torch.float32 if hook is not None else target)
            del t
            if hook is not None:
                w = hook(mk, w).to(target)
            _assign(module, leaf, w.to(device), requires_grad=True)
            result.dequantized.append(mk)
            del w
            _release_freed_heap()
        elif mk in scales:
            scale = _per_tensor_shape(reader.get_tensor(scales[mk]))
            if hook is not None:
                t, scale = _rescale_merge(hook, mk, t, scale)
                _release_freed_heap()
            _assign(module, leaf, t.to(device), requires_grad=False)
            module.register_buffer("scale_weight", scale.to(device))
            result.fp8_linears.append(mk[: -len(".weight")])
        else:
            converted = _convert(t, mk, module, leaf, dtype, tensor_fp8, hook, keep_in_fp32, reader, fk, device, result)
            _assign(module, leaf, converted, requires_grad)
            replaced = converted is not t  # (identity, not data_ptr: the memory estimator loads fake tensors, which have none)
            # drop the read buffer now: held until the next read it would sit next to that tensor (for an fp8 load
            # that is the largest bf16 weight, about 6 % of a 1536-wide encoder) and the trim could not return it
            del t, converted
            if replaced:
                _release_freed_heap()
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    scaled_names = [
        n for n in result.fp8_linears if isinstance(getattr(model.get_submodule(n), "scale_weight", None), torch.Tensor)
    ]
    if scaled_names:
        apply_fp8_monkey_patch(model, scaled_names, use_scaled_mm=bool(fp8 and fp8.use_scaled_mm))
    for name in result.fp8_linears:
        if name not in scaled_names:
            patch_fp8_upcast_forward(model.get_submodule(name))

    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise UserError(
            f"{reader.name}: after loading, {len(leftover)} tensor(s) are still on the meta device: {_examples(leftover)} "
            "(the checkpoint does not provide them; non-persistent buffers must be created on a real device)"
        )
    return result


def _convert(
    t: torch.Tensor,
    key: str,
    module: nn.Module,
    leaf: str,
    dtype: torch.dtype | None,
    fp8: Fp8Config | None,
    hook: LoraDeltaHook | None,
    keep_in_fp32: tuple[str, ...],
    reader: WeightsReader,
    file_key: str,
    device: torch.device,
    result: LoadResult,
) -> torch.Tensor:
    """dtype/fp8 handling for one tensor that has no pre-quantised scale."""
    is_linear_weight = isinstance(module, nn.Linear) and leaf == "weight" and t.ndim == 2
    stored_fp8 = is_fp8_dtype(t.dtype)
    if fp8 is not None:
        fp8_target = is_linear_weight and is_fp8_target(key, fp8)
    else:  # no fp8 requested: an fp8 Linear weight stays fp8 only when no dtype was asked for
        fp8_target = is_linear_weight and stored_fp8 and dtype is None
    target_dtype = torch.float32 if any(s in key for s in keep_in_fp32) else dtype
    hp_dtype = target_dtype or (torch.bfloat16 if stored_fp8 else t.dtype)

    if stored_fp8 and fp8_target and fp8 is not None and fp8.scaled and not fp8.allow_unscaled_fp8:
        raise UserError(
            f"{reader.file_of(file_key)}: {file_key!r} is already {t.dtype} without a scale_weight; "
            "--fp8_scaled refuses unscaled fp8 weights (load this file with --fp8_base alone, or use a bf16/fp16 checkpoint)"
        )
    stored_dtype = t.dtype
    if hook is not None and t.is_floating_point():
        src = t.float() if stored_fp8 else t
        merged = hook(key, src)
        if merged is not src:
            t, stored_fp8 = merged, False

    if fp8_target and stored_fp8:
        if fp8 is not None and fp8.scaled:  # allowed unscaled fp8: unit per-tensor scale keeps the values exact
            module.register_buffer("scale_weight", torch.ones(1, dtype=hp_dtype, device=device))
        result.fp8_linears.append(key[: -len(".weight")])
        return t.to(device)
    if fp8_target:
        w = t.to(device=device, dtype=hp_dtype)
        if fp8 is not None and fp8.scaled:
            q, scale = quantize_weight(w, fp8.mode, fp8.block_size, fp8.fp8_dtype)
            module.register_buffer("scale_weight", scale)
        else:  # plain fp8 (--fp8_base), or an fp8 weight from the file that a LoRA delta was merged into
            q = cast_to_fp8(w, fp8.fp8_dtype if fp8 is not None else stored_dtype)
        result.quantized.append(key)
        result.fp8_linears.append(key[: -len(".weight")])
        return q
    if t.is_floating_point() and (stored_fp8 or (target_dtype is not None and t.dtype != target_dtype)):
        t = t.to(hp_dtype)
    return t.to(device)
