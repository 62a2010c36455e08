"""A tiny FLUX.2 editing dataset for tests and the demo: stills of coloured shapes with reference images.

``write_flux2_dataset(out_dir)`` writes ``images/still_XXX.png`` + ``.txt`` captions, ``controls/still_XXX_0.png`` (and
``_1.png`` for half of the items, so reference counts differ per item), and two TOMLs with ``batch_size = 2``:
``t2i.toml`` (no references) and ``edit.toml`` (``control_directory``, ``no_resize_control = true`` so references keep
their own, different sizes — buckets then split by reference count and shapes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from musubi_tuner.demo.synthetic_data import ShapeSpec, _save_png, _toml_str, render_frame, shape_specs
from musubi_tuner.utils.errors import UserError


@dataclass(frozen=True)
class Flux2Dataset:
    root: Path
    image_dir: Path
    control_dir: Path
    t2i_toml: Path
    edit_toml: Path
    t2i_cache_dir: Path
    edit_cache_dir: Path
    captions: dict[str, str]
    reference_counts: dict[str, int]


def _toml(image_dir: Path, cache_dir: Path, size: tuple[int, int], control_dir: Path | None) -> str:
    lines = [
        "[general]",
        f"resolution = [{size[0]}, {size[1]}]",
        'caption_extension = ".txt"',
        "batch_size = 2",
        "enable_bucket = true",
        "",
        "[[datasets]]",
        f"image_directory = {_toml_str(image_dir)}",
        f"cache_directory = {_toml_str(cache_dir)}",
    ]
    if control_dir is not None:
        lines += [f"control_directory = {_toml_str(control_dir)}", "no_resize_control = true"]
    return "\n".join(lines) + "\n"


def write_flux2_dataset(
    out_dir: str | os.PathLike, *, n_images: int = 4, size: tuple[int, int] = (64, 64), seed: int = 0
) -> Flux2Dataset:
    """Write the dataset (an existing non-empty ``out_dir`` is an error)."""
    root = Path(out_dir).resolve()
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root}: exists and is not empty")
    idir, cdir = root / "images", root / "controls"
    for d in (idir, cdir, root / "cache" / "t2i", root / "cache" / "edit"):
        d.mkdir(parents=True, exist_ok=True)
    captions, counts = {}, {}
    for i, spec in enumerate(shape_specs(n_images, seed)):
        stem = f"still_{i:03d}"
        still = ShapeSpec(spec.color, spec.shape, "standing still", spec.background)
        _save_png(idir / f"{stem}.png", render_frame(still, 0.5, size))
        (idir / f"{stem}.txt").write_text(still.caption + "\n", encoding="utf-8")
        captions[stem] = still.caption
        # references: the moving shape at the start (same size) and, for even items, a smaller second view
        _save_png(cdir / f"{stem}_0.png", render_frame(spec, 0.0, size))
        counts[stem] = 1
        if i % 2 == 0:
            _save_png(cdir / f"{stem}_1.png", render_frame(spec, 1.0, (size[0] // 2, size[1] // 2)))
            counts[stem] = 2
    t2i, edit = root / "t2i.toml", root / "edit.toml"
    t2i.write_text(_toml(idir, root / "cache" / "t2i", size, None), encoding="utf-8")
    edit.write_text(_toml(idir, root / "cache" / "edit", size, cdir), encoding="utf-8")
    return Flux2Dataset(root, idir, cdir, t2i, edit, root / "cache" / "t2i", root / "cache" / "edit", captions, counts)
