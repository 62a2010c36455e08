"""Scaled fp8 weights for Linear layers (training.md §16).

A quantised weight is a pair ``(q, scale)``: ``q`` has the weight's shape and an fp8 dtype, ``scale`` is stored in the
original dtype with shape ``[1]`` (tensor mode), ``[out, 1]`` (channel mode) or ``[out, num_blocks, 1]`` (block mode),
and the weight is ``W = q · scale`` (block scales broadcast over ``W`` viewed as ``[out, num_blocks, block_size]``).
In a state dict the original key holds ``q`` and ``<module>.scale_weight`` holds ``scale``.

Patched Linear layers keep their class (``nn.Linear``) so adapter code that looks for Linear modules still finds them;
only the instance's ``forward`` is replaced.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

Fp8Mode = Literal["block", "channel", "tensor"]
FP8_MODES: tuple[str, ...] = ("block", "channel", "tensor")
FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
FP8_DTYPES: frozenset[torch.dtype] = frozenset(
    d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")) if d
)
SCALE_SUFFIX = ".scale_weight"
MIN_SCALE = 1e-8
SCALED_MM_MIN_CAPABILITY = (8, 9)
# Row-chunk size of the float32 work copies in ``quantize_weight``. On the CPU they are host memory next to the weight
# being quantised: 1 Mi elements (4 MiB) keeps an fp8 load's host peak near the final size (4 Mi elements cost about
# 26 MB more on a 1536-wide FLUX.2 text encoder, docs/performance.md); devices take larger chunks (fewer kernel launches).
_CHUNK_ELEMENTS = 1 << 20
_DEVICE_CHUNK_FACTOR = 16


@dataclass(frozen=True)
class Fp8Config:
    """How to store Linear weights in fp8 while loading.

    ``scaled=True`` is ``--fp8_scaled`` (offline quantisation with scales); ``scaled=False`` is plain ``--fp8_base``
    (weights cast to fp8, upcast to the input dtype at compute time). ``targets`` / ``excludes`` are key substrings
    (empty ``targets`` = every Linear weight). ``allow_unscaled_fp8`` accepts checkpoints whose target weights are
    already fp8 without ``scale_weight`` keys in scaled mode (they get a unit per-tensor scale); otherwise they are
    refused, because their values were cast without a scale and re-quantising would silently lose precision.
    """

    mode: Fp8Mode = "block"
    block_size: int = 64
    targets: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    use_scaled_mm: bool = False
    scaled: bool = True
    allow_unscaled_fp8: bool = False

    def __post_init__(self) -> None:
        if self.mode not in FP8_MODES:
            raise UserError(f"fp8 quantisation mode {self.mode!r} is not one of {', '.join(FP8_MODES)}")
        if self.block_size < 1:
            raise UserError(f"fp8 block size must be >= 1, got {self.block_size}")
        if self.fp8_dtype not in FP8_MAX:
            raise UserError(f"fp8 dtype {self.fp8_dtype} is not supported (use torch.float8_e4m3fn or torch.float8_e5m2)")
        if self.use_scaled_mm and not self.scaled:
            raise UserError("--fp8_fast needs --fp8_scaled (scaled_mm multiplies scaled fp8 weights)")
        if self.use_scaled_mm and self.mode != "tensor":
            # torch._scaled_mm takes per-tensor scales only; architectures pass their usual mode (block), and no
            # command line option selects the mode, so --fp8_fast implies per-tensor quantisation.
            logger.info("--fp8_fast: fp8 weights use per-tensor scales (torch._scaled_mm supports no %s scales)", self.mode)
            object.__setattr__(self, "mode", "tensor")
        if self.use_scaled_mm and self.fp8_dtype != torch.float8_e4m3fn:
            raise UserError("--fp8_fast needs float8_e4m3fn weights")


def is_fp8_dtype(dtype: torch.dtype) -> bool:
    """True for the float8 dtypes."""
    return dtype in FP8_DTYPES


def is_fp8_target(key: str, config: Fp8Config) -> bool:
    """Whether the state-dict ``key`` (a ``.weight``) is selected for fp8 by ``config``'s target/exclude substrings."""
    if not key.endswith(".weight"):
        return False
    if config.targets and not any(t in key for t in config.targets):
        return False
    return not any(e in key for e in config.excludes)


def _scale_from_amax(amax: torch.Tensor, fp8_max: float, dtype: torch.dtype) -> torch.Tensor:
    return (amax / fp8_max).clamp(min=MIN_SCALE).to(dtype)


def quantize_weight(
    w: torch.Tensor, mode: Fp8Mode = "block", block_size: int = 64, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w`` to ``(q, scale)``; see the module docstring for shapes.

    ``scale = max|w| / fp8_max`` per tensor/row/block (clamped to >= 1e-8, NaN weights ignored), rounded to ``w``'s
    dtype; ``q = clamp(w / scale, ±fp8_max)`` with NaN → 0, computed in float32 from the rounded scale so that
    ``q · scale`` reproduces ``w`` up to fp8 rounding. Block mode falls back to channel mode when the input width is
    not a multiple of ``block_size``; non-2-D weights always use tensor mode.
    """
    if mode not in FP8_MODES:
        raise ValueError(f"unknown fp8 mode {mode!r}")
    if fp8_dtype not in FP8_MAX:
        raise ValueError(f"unsupported fp8 dtype {fp8_dtype}")
    if not w.is_floating_point() or is_fp8_dtype(w.dtype):
        raise ValueError(f"quantize_weight expects a high-precision float tensor, got {w.dtype}")
    fp8_max = FP8_MAX[fp8_dtype]
    if w.ndim != 2:
        mode = "tensor"
    elif mode == "block" and w.shape[1] % block_size != 0:
        mode = "channel"
    w2 = w.reshape(w.shape[0], -1) if w.ndim >= 2 else w.reshape(1, -1)
    rows, cols = w2.shape
    nb = cols // block_size if mode == "block" else 1
    # Work on row chunks so the float32 temporaries stay small next to a multi-hundred-MB weight.
    chunk = _CHUNK_ELEMENTS if w.device.type == "cpu" else _CHUNK_ELEMENTS * _DEVICE_CHUNK_FACTOR
    step = max(1, chunk // max(cols, 1))
    spans = [(r, min(rows, r + step)) for r in range(0, rows, step)]

    def chunk_f32(r0: int, r1: int) -> torch.Tensor:
        x = w2[r0:r1].to(torch.float32, copy=True)
        return x.view(r1 - r0, nb, cols // nb) if mode == "block" else x

    if mode == "tensor":
        amax = torch.zeros((), dtype=torch.float32, device=w.device)
        for r0, r1 in spans:
            amax = torch.maximum(amax, chunk_f32(r0, r1).abs_().nan_to_num_(nan=0.0).amax())
        scale = _scale_from_amax(amax.reshape(1), fp8_max, w.dtype)
    else:
        scale_shape = (rows, nb, 1) if mode == "block" else (rows, 1)
        scale = torch.empty(scale_shape, dtype=w.dtype, device=w.device)
        for r0, r1 in spans:
            scale[r0:r1] = _scale_from_amax(
                chunk_f32(r0, r1).abs_().nan_to_num_(nan=0.0).amax(dim=-1, keepdim=True), fp8_max, w.dtype
            )

    q = torch.empty(w2.shape, dtype=fp8_dtype, device=w.device)
    for r0, r1 in spans:
        s = scale.float() if mode == "tensor" else scale[r0:r1].float()
        x = chunk_f32(r0, r1).div_(s).nan_to_num_(nan=0.0).clamp_(-fp8_max, fp8_max)
        q[r0:r1] = x.view(r1 - r0, cols).to(fp8_dtype)
    return q.view(w.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W = q · scale`` computed in ``promote(dtype, scale.dtype)`` and returned in ``dtype`` (default: scale's)."""
    dtype = dtype or scale.dtype
    compute = torch.promote_types(dtype, scale.dtype)
    s = scale.to(compute)
    # one weight-sized temporary (the copy), scaled in place
    w = q.to(compute, copy=True)
    if scale.ndim == 3:
        out_features, nb, _ = scale.shape
        w.view(out_features, nb, -1).mul_(s)
    else:
        w.mul_(s)
    return w.to(dtype)


class _Fp8Linear(torch.autograd.Function):
    """``y = x · Wᵀ + b`` with ``W`` dequantised from its fp8 storage in forward *and again in backward*.

    Plain ``F.linear(x, dequantize(q, scale), b)`` makes autograd keep the dequantised high-precision copy of every
    frozen weight until backward (without gradient checkpointing fp8 then needs more memory than bf16). This function
    saves only ``q`` and ``scale`` (both already resident) and never the input: the base weight is frozen, so no weight
    gradient needs it. Input gradients are the same matmul the plain path runs, in the same compute dtype.
    """

    @staticmethod
    def forward(ctx, x, q, scale, bias, use_scaled_mm):  # noqa: D102 - see the class docstring
        compute = _compute_dtype(x)
        ctx.compute_dtype = compute
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(q, scale)
        if use_scaled_mm:
            return _scaled_mm_linear(x, q, scale, bias)
        w = _dequantize_or_upcast(q, scale, compute)
        return F.linear(x, w, bias.to(compute) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - see the class docstring
        q, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        grad_out = grad_out.to(ctx.compute_dtype)
        if ctx.needs_input_grad[0]:
            w = _dequantize_or_upcast(q, scale, ctx.compute_dtype)
            grad_x = grad_out.matmul(w)
            del w
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes in for ``x``: the autocast dtype when autocast is on for ``x``'s device."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _dequantize_or_upcast(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_weight(q, scale, dtype) if scale is not None else q.to(dtype)


def fp8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, use_scaled_mm: bool = False
) -> torch.Tensor:
    """Linear layer on an fp8 weight ``q`` (scaled when ``scale`` is given, plain fp8 otherwise).

    Numerically ``F.linear(x, W, b)`` with ``W = q · scale`` (or ``q`` upcast) in ``x``'s compute dtype, but autograd
    keeps no dequantised copy of ``W`` for backward (see ``_Fp8Linear``).
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        if use_scaled_mm:
            return _scaled_mm_linear(x, q, scale, bias)
        compute = _compute_dtype(x)
        return F.linear(x, _dequantize_or_upcast(q, scale, compute), bias.to(compute) if bias is not None else None)
    return _Fp8Linear.apply(x, q, scale, bias, use_scaled_mm)


def _fp8_scaled_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    fast = self.fp8_use_scaled_mm and x.shape[-1] % 16 == 0 and self.weight.shape[0] % 16 == 0
    return fp8_linear(x, self.weight, self.scale_weight, self.bias, use_scaled_mm=fast)


def _fp8_upcast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return fp8_linear(x, self.weight, None, self.bias)


def _scaled_mm_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``torch._scaled_mm`` with per-tensor scales: the input is quantised to e4m3 with its own per-tensor scale."""
    fp8_max = FP8_MAX[torch.float8_e4m3fn]
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = (x2.abs().amax().float() / fp8_max).clamp(min=1e-12)
    xq = (x2.float() / x_scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
    # q is [out, in] row-major; .t() gives the column-major [in, out] operand _scaled_mm requires.
    y = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=scale.float().reshape(()), out_dtype=x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], q.shape[0])


def scaled_mm_unsupported_reason(device: torch.device | str, capability: tuple[int, int] | None = None) -> str | None:
    """Why ``--fp8_fast`` cannot run on ``device`` (None when it can). ``capability`` overrides the CUDA query."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"--fp8_fast uses torch._scaled_mm, which needs a CUDA GPU; the model runs on {device.type}"
    if capability is None:
        if not torch.cuda.is_available():
            return "--fp8_fast needs a CUDA GPU, but CUDA is not available"
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < SCALED_MM_MIN_CAPABILITY:
        need = ".".join(map(str, SCALED_MM_MIN_CAPABILITY))
        have = ".".join(map(str, capability))
        return f"--fp8_fast needs compute capability >= {need} (Ada/Hopper or newer); this GPU has {have}"
    return None


def check_scaled_mm_supported(device: torch.device | str, capability: tuple[int, int] | None = None) -> None:
    """Raise ``UserError`` when ``--fp8_fast`` cannot run on ``device``."""
    reason = scaled_mm_unsupported_reason(device, capability)
    if reason:
        raise UserError(reason + " (drop --fp8_fast; --fp8_scaled alone works everywhere)")


def _linear(model: nn.Module, module_name: str) -> nn.Linear:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise UserError(f"fp8 scale for {module_name!r} has no matching module in the model") from None
    if not isinstance(module, nn.Linear):
        raise UserError(f"fp8 scale for {module_name!r} belongs to a {type(module).__name__}, not a Linear layer")
    return module


def apply_fp8_monkey_patch(
    model: nn.Module, scaled: Mapping[str, torch.Tensor] | Iterable[str], use_scaled_mm: bool = False
) -> list[str]:
    """Patch the Linear layers that have fp8 scales so that they dequantise on the fly.

    ``scaled`` is either a state dict (its ``*.scale_weight`` entries are registered as buffers on their Linear
    modules) or an iterable of module names / ``*.scale_weight`` keys whose modules already hold a ``scale_weight``
    buffer. With ``use_scaled_mm`` (``--fp8_fast``) the layers with per-tensor scales use ``torch._scaled_mm``; layers
    with per-channel or block scales (e.g. from a pre-quantised file) cannot, and dequantise instead (one warning).
    Returns the patched module names.
    """
    if isinstance(scaled, Mapping):
        for key, scale in scaled.items():
            if key.endswith(SCALE_SUFFIX):
                _linear(model, key[: -len(SCALE_SUFFIX)]).register_buffer("scale_weight", scale)
        names = [k[: -len(SCALE_SUFFIX)] for k in scaled if k.endswith(SCALE_SUFFIX)]
    else:
        names = [k[: -len(SCALE_SUFFIX)] if k.endswith(SCALE_SUFFIX) else k for k in scaled]
    not_fast = []
    for name in names:
        module = _linear(model, name)
        scale = getattr(module, "scale_weight", None)
        if not isinstance(scale, torch.Tensor):
            raise UserError(f"Linear {name!r} has no scale_weight buffer to dequantise with")
        if use_scaled_mm and scale.numel() != 1:
            not_fast.append(f"{name} {list(scale.shape)}")
        module.fp8_use_scaled_mm = use_scaled_mm and scale.numel() == 1
        module.forward = types.MethodType(_fp8_scaled_forward, module)
    if not_fast:
        logger.warning(
            "--fp8_fast: %d Linear layer(s) have per-channel/block fp8 scales, which torch._scaled_mm cannot use; "
            "they dequantise instead (e.g. %s)",
            len(not_fast),
            ", ".join(not_fast[:3]),
        )
    logger.debug("fp8 scaled forward patched on %d Linear layers", len(names))
    return names


def patch_fp8_upcast_forward(module: nn.Linear) -> None:
    """Make a Linear with a plain (unscaled) fp8 weight upcast it to the input dtype at compute time."""
    module.forward = types.MethodType(_fp8_upcast_forward, module)


def cast_to_fp8(t: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Plain fp8 cast (no scale), saturating at ±fp8_max instead of producing NaN for out-of-range values."""
    fp8_max = FP8_MAX[fp8_dtype]
    return t.clamp(-fp8_max, fp8_max).to(fp8_dtype)


def cast_to_fp8_base(
    model: nn.Module,
    dtype: torch.dtype = torch.float8_e4m3fn,
    targets: tuple[str, ...] = (),
    excludes: tuple[str, ...] = (),
) -> list[str]:
    """Plain ``--fp8_base`` on an already-loaded model: cast selected Linear weights to fp8 and patch their forward.

    Selection follows ``is_fp8_target`` on ``<module>.weight``. Returns the cast module names.
    """
    config = Fp8Config(targets=targets, excludes=excludes, fp8_dtype=dtype, scaled=False)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_fp8_target(f"{name}.weight", config):
            continue
        w = module.weight
        if not is_fp8_dtype(w.dtype):
            module.weight = nn.Parameter(cast_to_fp8(w.detach(), dtype), requires_grad=False)
        patch_fp8_upcast_forward(module)
        names.append(name)
    return names


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Fp8Config, linear_weight_keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Quantise the targeted weights of a state dict, adding ``*.scale_weight`` entries (a pre-quantised checkpoint).

    ``linear_weight_keys`` restricts quantisation to the weights of Linear layers (pass the model's); by default every
    2-D ``.weight`` selected by ``config`` is quantised.
    """
    allowed = set(linear_weight_keys) if linear_weight_keys is not None else None
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        selectable = allowed is None and t.ndim == 2 or allowed is not None and key in allowed
        if selectable and t.is_floating_point() and not is_fp8_dtype(t.dtype) and is_fp8_target(key, config):
            q, scale = quantize_weight(t, config.mode, config.block_size, config.fp8_dtype)
            out[key] = q
            out[key[: -len(".weight")] + SCALE_SUFFIX] = scale
        else:
            out[key] = t
    return out
