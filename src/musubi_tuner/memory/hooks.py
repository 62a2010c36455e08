"""The per-architecture part of the memory estimator, and the registry of architectures that provide it.

An architecture package provides a module (e.g. ``kandinsky5/memory.py``) with a module-level ``MEMORY_HOOKS``
object implementing ``ArchMemoryHooks`` and adds one line to ``ARCHITECTURES`` below. Everything else — tracing,
formulas, suggestions, the report and the CLI — lives in ``musubi_tuner.memory`` and knows no architecture.

The hooks (see docs/memory.md, "Adding an architecture"):

- ``step_shape(args, trainer, train_group)``: the largest training step from the dataset's cache *headers*.
- ``make_fake_batch(args, shape)``: a batch of the layout the data loader yields for ``shape`` (called inside the
  fake-tensor mode, so factory functions return fake tensors).
- ``prepare_trace(trainer, transformer)``: what the traced step calls as the DiT, and the notes (§11 limits) to report —
  e.g. attention masks and sparse attention that need data-dependent Python.
- ``attention_dims(transformer, shape)``: ``(heads, head_dim, tokens)`` of the largest attention call (workspaces §8.2).
- ``with_frames(shape, frames)`` / ``frame_choices(shape)``: the same step at another latent frame count (``--frames_sweep``).
- ``generation(args)``: the generation estimate of the architecture's generate script (``GenerationPlan``), or None.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from musubi_tuner.utils.errors import UserError

# architecture name -> module holding MEMORY_HOOKS; later architectures add their line here
ARCHITECTURES: dict[str, str] = {
    "kandinsky5": "musubi_tuner.kandinsky5.memory",
    "flux_2": "musubi_tuner.flux_2.memory",
    "wan": "musubi_tuner.wan.memory",
    "qwen_image": "musubi_tuner.qwen_image.memory",
}


@dataclass(frozen=True)
class StepShape:
    """One training step's input shape: batch, latent ``(C, F, H, W)``, text length, and arch-specific details."""

    batch: int
    latent: tuple[int, ...]
    text_len: int
    buckets: int = 1  # distinct bucket shapes in the dataset (allocator fragmentation, §11)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.latent[1]) if len(self.latent) == 4 else 1

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.latent)
        return f"batch {self.batch}, latent {dims}, text {self.text_len} tokens"

    def with_latent(self, latent: tuple[int, ...]) -> StepShape:
        return replace(self, latent=tuple(latent))


class ArchMemoryHooks(Protocol):
    """What an architecture provides to the estimator (module docstring)."""

    name: str
    train_script: str  # "module:function" of the train script's main(argv)
    generate_script: str

    def detect(self, argv: list[str]) -> bool: ...

    def step_shape(self, args: argparse.Namespace, trainer: Any, train_group: Any) -> StepShape: ...

    def make_fake_batch(self, args: argparse.Namespace, shape: StepShape) -> dict[str, Any]: ...

    def prepare_trace(self, trainer: Any, transformer: Any) -> tuple[Any, list[str]]: ...

    def attention_dims(self, transformer: Any, shape: StepShape) -> tuple[int, int, int]: ...

    def frame_choices(self, shape: StepShape) -> list[int]: ...


class TracedDiT:
    """Base of what a ``prepare_trace`` hook returns as the DiT: a subclass overrides ``__call__`` (e.g. to drop a
    data-dependent mask); attribute reads go to the wrapped module, so its parameters stay registered."""

    def __init__(self, dit: Any):
        self._dit = dit

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._dit(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dit, name)


def argv_names_one_of(argv: list[str], flag: str, names: set[str] | list[str]) -> bool:
    """Whether ``argv`` gives ``flag`` a value among ``names`` (``--flag VALUE`` or ``--flag=VALUE``): ``detect``."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith(flag + "=") else None
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        if value in names:
            return True
    return False


def load_hooks(name: str) -> ArchMemoryHooks:
    """The hooks of architecture ``name``."""
    if name not in ARCHITECTURES:
        raise UserError(f"the memory estimator does not cover architecture {name!r} (covered: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(ARCHITECTURES[name]).MEMORY_HOOKS


def hooks_for_argv(argv: list[str], arch: str | None = None) -> ArchMemoryHooks:
    """The architecture a command line is for: ``--arch`` when given, else the first whose ``detect`` accepts it."""
    if arch:
        return load_hooks(arch)
    for name in ARCHITECTURES:
        hooks = load_hooks(name)
        if hooks.detect(argv):
            return hooks
    raise UserError(
        "cannot tell the architecture from these arguments (e.g. no --task); pass --arch "
        f"({', '.join(ARCHITECTURES)}). Architectures without an estimator hook cannot be estimated yet."
    )
