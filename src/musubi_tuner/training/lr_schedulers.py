"""``--lr_scheduler`` and friends → an LR scheduler (specs/training.md §8)."""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from musubi_tuner.training.args import parse_kv_args
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def parse_step_count(value: str | int | float | None, total_steps: int, option: str) -> int:
    """An int step count, a float < 1 (fraction of ``total_steps``) or a percentage string (``"10%"``)."""
    if value is None or value == "":
        return 0
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return int(float(text[:-1]) / 100 * total_steps)
        number = float(text)
    except ValueError:
        raise UserError(f"{option}: expected an integer, a fraction < 1 or a percentage, got {value!r}") from None
    if number < 0:
        raise UserError(f"{option}: must be >= 0, got {value!r}")
    if number < 1 and ("." in text or "e" in text.lower()):
        return int(number * total_steps)
    return int(number)


class RexLR(LambdaLR):
    """Rex schedule: linear warmup from ``min_lr`` to ``max_lr``, then ``m + (1 − m)·z / (0.1 + 0.9·z)`` of ``max_lr``
    with ``z`` the remaining fraction of the post-warmup steps and ``m = min_lr / max_lr``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.01):
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.m = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """LR multiplier at ``step``."""
        m, w, total = self.m, self.warmup_steps, self.total_steps
        if step < w:
            return m + (1 - m) * step / w
        z = max(0.0, 1 - (step - w) / max(1, total - w))
        return m + (1 - m) * z / (0.1 + 0.9 * z)


# transformers' scheduler names: the common ones are computed here (same formulas, checked against transformers in
# tests/test_trainer_options.py) because `from transformers import get_scheduler` pulls in transformers' trainer
# utilities, peft and torch._dynamo (several seconds of start-up); the others come from transformers
OWN_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRANSFORMERS_ONLY_SCHEDULERS = (
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
POLYNOMIAL_LR_END = 1e-7  # transformers' default end of the polynomial decay


def warmup_factor(name: str, warmup: int, total: int, *, num_cycles: int = 1, power: float = 1.0, lr: float = 1.0):
    """The LR multiplier ``f(step)`` of one of ``OWN_SCHEDULERS``: linear warmup over ``warmup`` steps, then the
    schedule over the remaining ``total - warmup`` steps (``cosine``: half a cosine to 0; ``cosine_with_restarts``:
    ``num_cycles`` half cosines; ``polynomial``: ``(1 - progress)^power`` from ``lr`` down to ``1e-7``)."""
    if name == "polynomial" and lr <= POLYNOMIAL_LR_END:
        raise UserError(f"--lr_scheduler polynomial: --learning_rate ({lr}) must be above the end value {POLYNOMIAL_LR_END}")

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
        if name == "polynomial":
            if step > total:
                return POLYNOMIAL_LR_END / lr
            return ((lr - POLYNOMIAL_LR_END) * (1 - progress) ** power + POLYNOMIAL_LR_END) / lr
        raise ValueError(f"not one of {OWN_SCHEDULERS}: {name!r}")

    return factor


def resolve_scheduler_class(dotted: str) -> type:
    """The class of ``--lr_scheduler_type`` (a ``torch.optim.lr_scheduler`` name or a dotted ``module.Class``)."""
    if "." not in dotted:
        cls = getattr(torch.optim.lr_scheduler, dotted, None)
        if cls is None:
            raise UserError(f"--lr_scheduler_type {dotted!r}: not in torch.optim.lr_scheduler")
        return cls
    module_name, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--lr_scheduler_type {dotted!r}: cannot import ({e})") from None


def get_lr_scheduler(args: Any, optimizer: torch.optim.Optimizer, num_processes: int) -> LRScheduler:
    """Build the scheduler. Step counts are multiplied by ``num_processes`` because the accelerate-wrapped
    scheduler steps once per process on every optimizer step (warmup/decay as well, so they mean optimizer steps)."""
    from musubi_tuner.training.optimizers import is_schedule_free

    if is_schedule_free(args.optimizer_type):
        return LambdaLR(optimizer, lambda _step: 1.0)
    total = args.max_train_steps * num_processes
    warmup = parse_step_count(args.lr_warmup_steps, args.max_train_steps, "--lr_warmup_steps") * num_processes
    decay = parse_step_count(args.lr_decay_steps, args.max_train_steps, "--lr_decay_steps") * num_processes
    if warmup > total:
        logger.warning(
            f"--lr_warmup_steps {args.lr_warmup_steps} is {warmup // num_processes} steps, more than the "
            f"{args.max_train_steps} training steps: the learning rate never reaches --learning_rate"
        )
    name = args.lr_scheduler
    if args.lr_scheduler_type:
        cls = resolve_scheduler_class(args.lr_scheduler_type)
        kwargs = parse_kv_args(args.lr_scheduler_args, "--lr_scheduler_args")
        try:
            return cls(optimizer, **kwargs)
        except TypeError as e:
            raise UserError(f"--lr_scheduler_args for {args.lr_scheduler_type}: {e}") from None
    if name.startswith("adafactor"):
        from transformers.optimization import AdafactorSchedule

        initial = float(name.split(":", 1)[1]) if ":" in name else args.learning_rate
        return AdafactorSchedule(optimizer, initial_lr=initial)
    if name == "rex":
        ratio = 0.01 if args.lr_scheduler_min_lr_ratio is None else args.lr_scheduler_min_lr_ratio
        return RexLR(optimizer, total, warmup, ratio)
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        rules = parse_kv_args(args.lr_scheduler_args, "--lr_scheduler_args").get("step_rules")
        if not rules:
            raise UserError("--lr_scheduler piecewise_constant needs --lr_scheduler_args \"step_rules='1:10,0.1:20,0.01'\"")
        return get_piecewise_constant_schedule(optimizer, step_rules=str(rules))
    valid = [*OWN_SCHEDULERS, *TRANSFORMERS_ONLY_SCHEDULERS]
    if name not in valid:
        raise UserError(f"--lr_scheduler {name!r}: unknown; choose one of {valid + ['piecewise_constant', 'rex', 'adafactor']}")
    if decay and name != "warmup_stable_decay":
        raise UserError(f"--lr_decay_steps is used by --lr_scheduler warmup_stable_decay, not {name!r}")
    if name in OWN_SCHEDULERS:
        if warmup and name == "constant":
            raise UserError("--lr_warmup_steps needs a scheduler with warmup (e.g. constant_with_warmup), not 'constant'")
        factor = warmup_factor(
            name, warmup, total, num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power, lr=args.learning_rate
        )
        return LambdaLR(optimizer, factor)
    from transformers import get_scheduler  # the rarer schedules: importing transformers' trainer utilities costs seconds

    specific: dict[str, Any] = {}
    if name == "inverse_sqrt" and args.lr_scheduler_timescale is not None:
        specific["timescale"] = args.lr_scheduler_timescale * num_processes  # in optimizer steps, like warmup
    elif name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        specific["min_lr_rate"] = 0.0 if args.lr_scheduler_min_lr_ratio is None else args.lr_scheduler_min_lr_ratio
    elif name == "warmup_stable_decay":
        specific["num_decay_steps"] = decay
        if args.lr_scheduler_min_lr_ratio is not None:
            specific["min_lr_ratio"] = args.lr_scheduler_min_lr_ratio
    kwargs: dict[str, Any] = {"scheduler_specific_kwargs": specific}
    kwargs["num_warmup_steps"] = warmup
    if name not in ("inverse_sqrt", "reduce_lr_on_plateau"):
        kwargs["num_training_steps"] = total
    return get_scheduler(name, optimizer, **kwargs)


def current_lrs(scheduler: Any, optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each parameter group (Adafactor relative-step lr when applicable)."""
    if hasattr(scheduler, "get_last_lr"):
        try:
            return [float(x) for x in scheduler.get_last_lr()]
        except (AttributeError, TypeError):
            pass
    return [float(g.get("lr", 0.0) or 0.0) for g in optimizer.param_groups]
