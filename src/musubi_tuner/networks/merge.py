"""Merge LoRA / LoHa / LoKr files into DiT weights (specs/networks.md §5), architecture-independent.

- ``LoraDeltaSet`` resolves the modules of several adapter files (each with its multiplier) against the weight keys
  of a checkpoint or model, by exact name: kohya ``lora_unet_<path with _>`` or a dotted path (diffusers/ComfyUI
  layout). Unmatched modules, a shape mismatch, or an adapter for another architecture are ``UserError``s. It is
  also the ``lora_deltas`` hook of ``utils.model_loading.load_weights_into_model`` (merge while loading).
- ``merge_lora_files`` streams a checkpoint tensor by tensor into a new file (``StreamingSafetensorsWriter``):
  the merged model is never held in memory, let alone twice. Scaled fp8 weights are dequantised, merged and
  re-quantised in the same mode (``weight_merge``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musubi_tuner.modules.fp8_optimization import SCALE_SUFFIX, is_fp8_dtype
from musubi_tuner.networks.convert import official_modules
from musubi_tuner.networks.formats import (
    MAX_EXAMPLES,
    AdapterModule,
    adapter_delta,
    detect_adapter_architecture,
    detect_checkpoint_architecture,
    parse_adapter_state_dict,
    strip_dotted_prefix,
    with_peft_alphas,
)
from musubi_tuner.networks.stream_writer import StreamingSafetensorsWriter
from musubi_tuner.networks.weight_merge import merge_delta_into_weight
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

KOHYA_PREFIXES = ("lora_unet_",)


@dataclass
class Adapter:
    """One adapter file: its modules, multiplier, metadata and detected architecture family."""

    source: str
    multiplier: float
    modules: dict[str, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)
    architecture: str | None = None


def pad_multipliers(n: int, multipliers: Sequence[float] | None) -> list[float]:
    """One multiplier per adapter, missing ones 1.0; more multipliers than adapters is a ``UserError``."""
    mults = list(multipliers or [])
    if len(mults) > n:
        raise UserError(f"--lora_multiplier has {len(mults)} values for {n} LoRA file(s)")
    return mults + [1.0] * (n - len(mults))


def load_adapter(path: str | os.PathLike, multiplier: float = 1.0) -> Adapter:
    """Read an adapter file completely (adapters are small) and parse its modules."""
    with open_weights(path) as reader:
        sd = {k: reader.get_tensor(k) for k in reader.keys()}
        metadata = reader.metadata()
    sd = with_peft_alphas(sd, metadata, str(path))
    modules = parse_adapter_state_dict(sd, str(path))
    if not modules:
        raise UserError(f"{path}: no LoRA/LoHa/LoKr tensors in the file")
    return Adapter(str(path), multiplier, modules, metadata, detect_adapter_architecture(sd.keys(), metadata))


def per_adapter_patterns(n: int, patterns: Sequence[str | None] | None, flag: str) -> list[re.Pattern | None]:
    """Pattern i applies to adapter i (missing ones: no filter), compiled; a bad regex is a ``UserError``."""
    pats = list(patterns or [])
    if len(pats) > n:
        raise UserError(f"{flag} has {len(pats)} patterns for {n} LoRA file(s) (one regex per --lora_weight)")
    out: list[re.Pattern | None] = []
    for p in pats + [None] * (n - len(pats)):
        try:
            out.append(None if p is None else re.compile(p))
        except re.error as e:
            raise UserError(f"{flag}: {p!r} is not a valid regular expression: {e}") from None
    return out


def filter_adapter(adapter: Adapter, include: re.Pattern | None, exclude: re.Pattern | None) -> Adapter:
    """Generator ``--include_patterns`` / ``--exclude_patterns`` for one adapter (upstream semantics): keep the modules
    whose name an include regex finds (``re.search``), then drop those an exclude regex finds."""
    if include is None and exclude is None:
        return adapter
    kept = {
        name: m
        for name, m in adapter.modules.items()
        if (include is None or include.search(name)) and (exclude is None or not exclude.search(name))
    }
    logger.info("%s: %d of %d LoRA modules kept by the include/exclude patterns", adapter.source, len(kept), len(adapter.modules))
    return Adapter(adapter.source, adapter.multiplier, kept, adapter.metadata, adapter.architecture)


def load_adapters(
    paths: Sequence[str | os.PathLike],
    multipliers: Sequence[float] | None = None,
    include_patterns: Sequence[str | None] | None = None,
    exclude_patterns: Sequence[str | None] | None = None,
) -> list[Adapter]:
    """``load_adapter`` for each path with its (padded) multiplier, filtered by its include / exclude pattern."""
    includes = per_adapter_patterns(len(paths), include_patterns, "--include_patterns")
    excludes = per_adapter_patterns(len(paths), exclude_patterns, "--exclude_patterns")
    mults = pad_multipliers(len(paths), multipliers)
    return [filter_adapter(load_adapter(p, m), inc, exc) for p, m, inc, exc in zip(paths, mults, includes, excludes, strict=True)]


class TargetIndex:
    """Adapter module name → checkpoint weight key, from the checkpoint's ``*.weight`` keys (exact, never guessed)."""

    def __init__(self, keys: Iterable[str]):
        self.kohya: dict[str, str] = {}
        self.dotted: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        for key in keys:
            if not key.endswith(".weight"):
                continue
            path = strip_dotted_prefix(key[: -len(".weight")])
            self.dotted[path] = key
            name = path.replace(".", "_")
            if name in self.kohya and self.kohya[name] != key:
                self.ambiguous.setdefault(name, [self.kohya[name]]).append(key)
            self.kohya[name] = key

    def resolve(self, module_name: str) -> str | None:
        """The checkpoint key adapted by ``module_name``, or None."""
        if "." in module_name or module_name in self.dotted:  # (official top-level paths have no dot: ``img_in``)
            return self.dotted.get(strip_dotted_prefix(module_name))
        for prefix in KOHYA_PREFIXES:
            if module_name.startswith(prefix):
                name = module_name[len(prefix) :]
                if name in self.ambiguous:
                    raise UserError(f"adapter module {module_name!r} could mean any of {self.ambiguous[name]}")
                return self.kohya.get(name)
        return None


class LoraDeltaSet:
    """Adapter deltas resolved against the weight keys of one checkpoint or model; callable as a load hook."""

    def __init__(
        self,
        adapters: Sequence[Adapter],
        keys: Iterable[str],
        target_name: str = "the model",
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ):
        keys = list(keys)
        self.target_name = target_name
        ckpt_arch = detect_checkpoint_architecture(keys)
        index = TargetIndex(keys)
        self.by_key: dict[str, list[tuple[AdapterModule, float, str]]] = {}
        for adapter in adapters:
            if ckpt_arch and adapter.architecture and adapter.architecture != ckpt_arch:
                raise UserError(
                    f"{adapter.source} is a LoRA for {adapter.architecture}, but {target_name} is a {ckpt_arch} checkpoint"
                )
            unmatched = []
            # diffusers-named modules (split q/k/v ...) → the official modules of this checkpoint
            modules = official_modules(adapter.modules, ckpt_arch, adapter.source) if ckpt_arch else adapter.modules
            for name, module in modules.items():
                key = index.resolve(name)
                if key is None:
                    unmatched.append(name)
                    continue
                self.by_key.setdefault(key, []).append((module, adapter.multiplier, adapter.source))
            if unmatched:
                hint = f" (the LoRA looks like {adapter.architecture})" if adapter.architecture else ""
                raise UserError(
                    f"{adapter.source}: {len(unmatched)} of {len(modules)} LoRA modules match no weight of "
                    f"{target_name}{hint}, e.g. {unmatched[:MAX_EXAMPLES]}"
                )
            logger.info(f"{adapter.source}: {len(modules)} modules x {adapter.multiplier}")
        if shapes is not None:
            for key in self.by_key:
                self._check_shape(key, tuple(shapes[key]))

    def _check_shape(self, key: str, shape: tuple[int, ...]) -> None:
        for module, _, source in self.by_key[key]:
            expected = _delta_shape(module)
            if expected is not None and tuple(expected) != shape:
                raise UserError(
                    f"{source}: module {module.name!r} has shape {list(expected)} but {key} in {self.target_name} is {list(shape)}"
                )

    def __contains__(self, key: str) -> bool:
        return key in self.by_key

    def keys(self) -> list[str]:
        """The weight keys that receive a delta."""
        return list(self.by_key)

    def delta(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Σ multiplier · ΔW over every adapter for ``key``, in float32 on ``device``."""
        total = None
        for module, mult, _ in self.by_key[key]:
            d = adapter_delta(module, device) * mult
            total = d if total is None else total.add_(d)
        return total

    def merge_weight(
        self, key: str, weight: torch.Tensor, scale: torch.Tensor | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(merged weight, new scale)`` stored like ``weight`` (fp8-aware; see ``weight_merge``)."""
        self._check_shape(key, tuple(weight.shape))
        delta = self.delta(key, device).reshape(weight.shape)
        return merge_delta_into_weight(weight.to(device), delta, None if scale is None else scale.to(device))

    def __call__(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``load_weights_into_model`` hook: the merged high-precision weight, or ``weight`` itself when no delta."""
        if key not in self.by_key:
            return weight
        return self.merge_weight(key, weight, None, weight.device)[0]


def _delta_shape(module: AdapterModule) -> tuple[int, ...] | None:
    t = module.tensors
    kind = module.kind
    if kind == "lora":
        ups = [v for s, v in t.items() if s.startswith("lora_up")]
        down = next(v for s, v in t.items() if s.startswith("lora_down"))
        return (sum(u.shape[0] for u in ups), *down.shape[1:])
    if kind == "peft":
        return (t["lora_B.weight"].shape[0], *t["lora_A.weight"].shape[1:])
    if kind == "loha":
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
    return None  # LoKr: checked when merging


def build_lora_delta_hook(
    lora_paths: Sequence[str | os.PathLike],
    multipliers: Sequence[float] | None,
    model_keys: Iterable[str],
    target_name: str = "the model",
    include_patterns: Sequence[str | None] | None = None,
    exclude_patterns: Sequence[str | None] | None = None,
) -> LoraDeltaSet:
    """The ``lora_deltas`` hook for ``load_weights_into_model``: LoRAs merged while loading, before any fp8 step.

    ``include_patterns`` / ``exclude_patterns``: one regex per LoRA (``filter_adapter``)."""
    adapters = load_adapters(lora_paths, multipliers, include_patterns, exclude_patterns)
    return LoraDeltaSet(adapters, model_keys, target_name)


def merge_lora_into_state_dict(
    state_dict: dict[str, torch.Tensor],
    adapters: Sequence[Adapter],
    device: torch.device | str = "cpu",
    target_name: str = "the state dict",
) -> dict[str, torch.Tensor]:
    """Merge adapters into an in-memory state dict (in place, also returned); scaled fp8 entries stay scaled fp8."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    deltas = LoraDeltaSet(adapters, state_dict.keys(), target_name, shapes)
    for key in deltas.keys():
        scale_key = key[: -len(".weight")] + SCALE_SUFFIX
        scale = state_dict.get(scale_key)
        w, s = deltas.merge_weight(key, state_dict[key], scale, device)
        state_dict[key] = w.to(state_dict[key].device)
        if s is not None:
            state_dict[scale_key] = s.to(scale.device)
    return state_dict


@dataclass
class MergeReport:
    """What ``merge_lora_files`` did."""

    output: Path
    merged_keys: int
    fp8_requantized: int
    tensors: int


def _output_order(keys: list[str]) -> list[str]:
    """Reader order, but every ``*.scale_weight`` directly after its ``*.weight`` (so one pending scale suffices)."""
    keyset = set(keys)
    order = []
    for key in keys:
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] + ".weight" in keyset:
            continue
        order.append(key)
        scale_key = key[: -len(".weight")] + SCALE_SUFFIX if key.endswith(".weight") else None
        if scale_key in keyset:
            order.append(scale_key)
    return order


def merge_lora_files(
    base: str | os.PathLike | Sequence[str | os.PathLike],
    lora_paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    multipliers: Sequence[float] | None = None,
    *,
    save_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    architecture: str | None = None,
    progress: bool = True,
    include_patterns: Sequence[str | None] | None = None,
    exclude_patterns: Sequence[str | None] | None = None,
) -> MergeReport:
    """Stream ``base`` (file, shards, index or directory) into ``output`` with the adapters merged.

    ``save_dtype`` converts high-precision float tensors (fp8 weights and their scales are kept as fp8 + scale).
    ``architecture`` (a family name such as ``kandinsky5``) must then match the checkpoint and every adapter.
    Peak memory: the adapters plus about one base tensor. ``include_patterns`` / ``exclude_patterns``: as
    ``filter_adapter``, one regex per adapter.
    """
    adapters = load_adapters(lora_paths, multipliers, include_patterns, exclude_patterns)
    out_path = Path(output)
    with open_weights(base) as reader:
        keys = reader.keys()
        if architecture:
            found = detect_checkpoint_architecture(keys)
            for what, arch in [(reader.name, found)] + [(a.source, a.architecture) for a in adapters]:
                if arch and arch != architecture:
                    raise UserError(f"{what} is {arch}, not --architecture {architecture}")
        shapes = {k: reader.get_shape(k) for k in keys}
        deltas = LoraDeltaSet(adapters, keys, reader.name, shapes)
        order = _output_order(keys)
        layout = {}
        for key in order:
            dtype = reader.get_dtype(key)
            if save_dtype is not None and dtype.is_floating_point and not is_fp8_dtype(dtype) and not key.endswith(SCALE_SUFFIX):
                dtype = save_dtype
            layout[key] = (dtype, tuple(shapes[key]))
        metadata = reader.metadata()
        metadata["modelspec.merged_from"] = ", ".join(f"{Path(a.source).name}:{a.multiplier:g}" for a in adapters)
        merged = requantized = 0
        pending_scale: dict[str, torch.Tensor] = {}
        iterator = order
        if progress:
            from tqdm import tqdm

            iterator = tqdm(order, desc="merging", unit="tensor")
        with StreamingSafetensorsWriter(out_path, layout, metadata) as writer:
            for key in iterator:
                if key in pending_scale:
                    t = pending_scale.pop(key)
                else:
                    t = reader.get_tensor(key)
                    if key in deltas:
                        scale_key = key[: -len(".weight")] + SCALE_SUFFIX
                        scale = reader.get_tensor(scale_key) if scale_key in shapes else None
                        t, new_scale = deltas.merge_weight(key, t, scale, device)
                        t = t.cpu()
                        merged += 1
                        if new_scale is not None:
                            pending_scale[scale_key] = new_scale.cpu()
                            requantized += 1
                t = t.to(layout[key][0])
                writer.write(key, t)
    logger.info(f"merged {merged} weights ({requantized} scaled fp8 re-quantised) into {out_path}")
    return MergeReport(out_path, merged, requantized, len(order))
