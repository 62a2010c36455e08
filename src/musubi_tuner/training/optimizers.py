"""``--optimizer_type`` / ``--optimizer_args`` → a torch optimizer (specs/training.md §7)."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from musubi_tuner.training.args import parse_kv_args
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def is_schedule_free(optimizer_type: str | None) -> bool:
    """Schedule-free optimizers need a dummy scheduler and ``train()``/``eval()`` switching."""
    return (optimizer_type or "").lower().endswith("schedulefree")


def _import_class(dotted: str) -> type:
    module_name, _, cls_name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--optimizer_type {dotted}: cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise UserError(f"--optimizer_type {dotted}: module {module_name!r} has no class {cls_name!r}")
    return cls


def resolve_optimizer_class(optimizer_type: str | None) -> type:
    """The optimizer class for ``--optimizer_type`` (empty → ``torch.optim.AdamW``; built-ins case-insensitive)."""
    name = (optimizer_type or "AdamW").strip()
    lower = name.lower()
    if lower == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise UserError(
                "--optimizer_type AdamW8bit needs bitsandbytes, which is not installed (pip install bitsandbytes, "
                "or use --optimizer_type AdamW)"
            ) from None
        return bnb.optim.AdamW8bit
    if lower == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if "." in name:
        return _import_class(name)
    by_lower = {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)}
    real = by_lower.get(lower)
    cls = getattr(torch.optim, real, None) if real else None
    if cls is None or not issubclass(cls, torch.optim.Optimizer):
        raise UserError(f"--optimizer_type {name!r}: not a torch.optim optimizer; use a dotted module.Class for others")
    return cls


def get_optimizer(args: Any, params: list[dict[str, Any]] | list[torch.nn.Parameter]) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer; returns ``(module.Class, "k=v,..." description, optimizer)``.

    ``Adafactor`` defaults to ``relative_step=True``: ``--learning_rate`` becomes the initial lr and the LR scheduler is
    forced to ``adafactor:<lr>`` (``args.lr_scheduler`` is updated).
    """
    cls = resolve_optimizer_class(args.optimizer_type)
    kwargs = parse_kv_args(args.optimizer_args, "--optimizer_args")
    lr: float | None = args.learning_rate
    if cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers"):
        kwargs.setdefault("relative_step", True)
        if kwargs["relative_step"]:
            kwargs.setdefault("scale_parameter", True)
            kwargs.setdefault("warmup_init", False)
            if args.lr_scheduler != "adafactor" and not str(args.lr_scheduler).startswith("adafactor:"):
                logger.info("Adafactor with relative_step: using the adafactor LR scheduler")
            args.lr_scheduler = f"adafactor:{lr}"
            lr = None
            for group in params:
                if isinstance(group, dict):
                    group.pop("lr", None)
    try:
        optimizer = cls(params, lr=lr, **kwargs) if lr is not None else cls(params, **kwargs)
    except TypeError as e:
        raise UserError(f"--optimizer_args for {cls.__name__}: {e}") from None
    name = f"{cls.__module__}.{cls.__name__}"
    desc = ",".join(f"{k}={v}" for k, v in kwargs.items())
    logger.info(f"optimizer {name}({desc}), learning rate {args.learning_rate}")
    return name, desc, optimizer
