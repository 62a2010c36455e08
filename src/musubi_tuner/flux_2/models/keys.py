"""FLUX.2 checkpoint key layouts: official BFL names (ours) and diffusers ``Flux2Transformer2DModel`` names.

Importing a diffusers checkpoint is not a 1:1 rename: q/k/v of the double blocks are fused into ``qkv`` and the two
halves of ``final_layer.adaLN_modulation`` are swapped (diffusers stores (scale, shift), BFL (shift, scale)), so the
conversion is a table of recipes ``official key -> (source keys, combine)`` evaluated lazily, one tensor at a time,
by ``ConvertedReader`` (a ``WeightsReader`` the streaming loader accepts). Official files with the ComfyUI-style
``model.diffusion_model.`` prefix load through the same reader with the prefix stripped (specs/flux2.md §5).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from musubi_tuner.networks.convert import DIFFUSERS_RENAMES
from musubi_tuner.utils.safetensors_utils import WeightsReader

OFFICIAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DETECT_OFFICIAL = "single_stream_modulation.lin.weight"
DETECT_DIFFUSERS = "single_stream_modulation.linear.weight"

# official module -> diffusers module. The Linear layers' names live once, in the LoRA conversion table
# (``networks.convert.DIFFUSERS_RENAMES``); the norms (no LoRA targets) are added here. ``.scale`` -> ``.weight`` is
# applied to norms separately; the final adaLN (halves swapped) is ``_FINAL_ADALN``.
_RENAMES = DIFFUSERS_RENAMES["flux_2"]
_MEMBERS = {official: members for official, _, members in _RENAMES.blocks}
_TOP = {o: d for o, (d,) in _RENAMES.top.items() if o not in _RENAMES.swapped}
_DOUBLE = {
    **{o: d for o, (d, *more) in _MEMBERS["double_blocks"].items() if not more},
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_DOUBLE_QKV = {o: d for o, d in _MEMBERS["double_blocks"].items() if len(d) == 3}
_SINGLE = {
    **{o: d for o, (d,) in _MEMBERS["single_blocks"].items()},
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_FINAL_ADALN = ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _param(official_module: str, diffusers_module: str, leaf: str = "weight") -> tuple[str, str]:
    ours = "scale" if official_module.endswith("_norm") else leaf
    return f"{official_module}.{ours}", f"{diffusers_module}.{leaf}"


def module_table(num_double: int, num_single: int) -> dict[str, str | tuple[str, ...]]:
    """Official module path -> diffusers module path(s) (three for the fused double-block qkv), every Linear / norm."""
    table: dict[str, str | tuple[str, ...]] = dict(_TOP)
    for i in range(num_double):
        for o, d in _DOUBLE.items():
            table[f"double_blocks.{i}.{o}"] = f"transformer_blocks.{i}.{d}"
        for o, ds in _DOUBLE_QKV.items():
            table[f"double_blocks.{i}.{o}"] = tuple(f"transformer_blocks.{i}.{d}" for d in ds)
    for i in range(num_single):
        for o, d in _SINGLE.items():
            table[f"single_blocks.{i}.{o}"] = f"single_transformer_blocks.{i}.{d}"
    table["final_layer.adaLN_modulation.1"] = "norm_out.linear"
    return table


def _count(keys: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an official-layout state dict to diffusers names (q/k/v split, final adaLN halves swapped)."""
    keys = list(sd)
    table = module_table(_count(keys, r"double_blocks\.(\d+)\."), _count(keys, r"single_blocks\.(\d+)\."))
    out: dict[str, torch.Tensor] = {}
    for module, target in table.items():
        ours = f"{module}.scale" if module.endswith("_norm") else f"{module}.weight"
        if ours not in sd:
            continue
        t = sd[ours]
        if isinstance(target, tuple):
            for name, part in zip(target, t.chunk(3, dim=0)):
                out[f"{name}.weight"] = part.clone()
        elif ours == _FINAL_ADALN[0]:
            out[_FINAL_ADALN[1]] = _swap_halves(t)
        else:
            out[f"{target}.weight"] = t
    missing = set(sd) - {f"{m}.scale" if m.endswith("_norm") else f"{m}.weight" for m in table}
    if missing:
        raise KeyError(f"keys without a diffusers name: {sorted(missing)[:5]}")
    return out


@dataclass(frozen=True)
class Recipe:
    """How to produce one official tensor from the source file: source keys and a combine function."""

    sources: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None  # None: the single source as-is
    shape: Callable[[list[int]], list[int]] | None = None  # the result's shape from the source shape (1 source)


def _recipes_from_diffusers(keys: list[str], prefix: str) -> dict[str, Recipe]:
    plain = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    table = module_table(_count(plain, r"transformer_blocks\.(\d+)\."), _count(plain, r"single_transformer_blocks\.(\d+)\."))
    present = set(plain)
    recipes: dict[str, Recipe] = {}
    claimed: set[str] = set()
    for module, target in table.items():
        ours = f"{module}.scale" if module.endswith("_norm") else f"{module}.weight"
        if isinstance(target, tuple):
            srcs = tuple(f"{t}.weight" for t in target)
            if all(s in present for s in srcs):
                recipes[ours] = Recipe(tuple(prefix + s for s in srcs), lambda ts: torch.cat(ts, dim=0))
                claimed.update(srcs)
            continue
        src = f"{target}.weight"
        if src in present:
            fn = (lambda ts: _swap_halves(ts[0])) if ours == _FINAL_ADALN[0] else None
            recipes[ours] = Recipe((prefix + src,), fn)
            claimed.add(src)
    for k in plain:  # anything the table does not know stays visible, so strict loading names it
        if k not in claimed:
            recipes[k] = Recipe((prefix + k,))
    return recipes


class ConvertedReader(WeightsReader):
    """A ``WeightsReader`` view with official keys over a diffusers-named or prefixed official checkpoint."""

    def __init__(self, inner: WeightsReader, recipes: dict[str, Recipe], layout: str):
        # no super().__init__: every query is answered from ``inner`` through the recipes
        self.inner = inner
        self.files = inner.files
        self.recipes = recipes
        self.layout = layout

    @property
    def name(self) -> str:
        return self.inner.name

    def keys(self) -> list[str]:
        return list(self.recipes)

    def __contains__(self, key: str) -> bool:
        return key in self.recipes

    def __len__(self) -> int:
        return len(self.recipes)

    def metadata(self) -> dict[str, str]:
        return self.inner.metadata()

    def file_of(self, key: str):
        return self.inner.file_of(self.recipes[key].sources[0])

    def get_dtype(self, key: str) -> torch.dtype:
        return self.inner.get_dtype(self.recipes[key].sources[0])

    def get_shape(self, key: str) -> list[int]:
        r = self.recipes[key]
        shapes = [list(self.inner.get_shape(s)) for s in r.sources]
        if r.shape is not None:
            return r.shape(shapes[0])
        if len(shapes) == 1:
            return shapes[0]
        return [sum(s[0] for s in shapes), *shapes[0][1:]]

    def get_nbytes(self, key: str) -> int:
        return sum(self.inner.get_nbytes(s) for s in self.recipes[key].sources)

    def get_tensor(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        r = self.recipes[key]
        ts = [self.inner.get_tensor(s) for s in r.sources]
        t = ts[0] if r.combine is None else r.combine(ts)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def iter_tensors(self, dtype=None, device="cpu", hook=None, keys=None):
        for k in keys if keys is not None else self.keys():
            t = self.get_tensor(k)
            if hook is not None:
                t = hook(k, t)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield k, t.to(device)

    def close(self) -> None:
        self.inner.close()


def detect_layout(keys: list[str]) -> tuple[str, str]:
    """``("official" | "diffusers" | "unknown", prefix)`` of a FLUX.2 transformer checkpoint's keys."""
    for k in keys:
        if k.endswith(DETECT_OFFICIAL):
            return "official", k[: -len(DETECT_OFFICIAL)]
    for k in keys:
        if k.endswith(DETECT_DIFFUSERS):
            return "diffusers", k[: -len(DETECT_DIFFUSERS)]
    return "unknown", ""


def official_view(reader: WeightsReader) -> WeightsReader:
    """``reader`` itself for a plain official file, else a ``ConvertedReader`` with official keys."""
    keys = reader.keys()
    layout, prefix = detect_layout(keys)
    if layout == "official" and not prefix:
        return reader
    if layout == "official":
        recipes = {k[len(prefix) :] if k.startswith(prefix) else k: Recipe((k,)) for k in keys}
        return ConvertedReader(reader, recipes, f"official with prefix {prefix!r}")
    if layout == "diffusers":
        return ConvertedReader(reader, _recipes_from_diffusers(keys, prefix), "diffusers")
    return reader
