"""The table of architectures known to the dataset layer: cache suffixes, metadata names, bucket steps, video fps."""

from __future__ import annotations

from dataclasses import dataclass

from musubi_tuner.utils.errors import UserError


@dataclass(frozen=True)
class ArchInfo:
    """What the dataset layer needs to know about one architecture.

    ``short`` is the cache file suffix (no ``_``), ``full`` the ``architecture`` metadata value, ``resolution_step``
    the bucket granularity in pixels, ``target_fps`` the frame rate video datasets are converted to (``None`` for
    image-only architectures), ``supports_video`` whether video datasets are accepted.
    """

    short: str
    full: str
    resolution_step: int = 16
    target_fps: float | None = None

    @property
    def supports_video(self) -> bool:
        return self.target_fps is not None

    @property
    def image_only(self) -> bool:
        return self.target_fps is None


ARCHITECTURES: dict[str, ArchInfo] = {
    a.short: a
    for a in (
        ArchInfo("hv", "hunyuan_video", 16, 24.0),
        ArchInfo("wan", "wan", 16, 16.0),
        ArchInfo("fp", "framepack", 16, 30.0),
        ArchInfo("fk", "flux_kontext", 16),
        ArchInfo("f2", "flux_2", 16),
        ArchInfo("f2d", "flux_2_dev", 16),
        ArchInfo("f2k4b", "flux_2_klein_4b", 16),
        ArchInfo("f2k9b", "flux_2_klein_9b", 16),
        ArchInfo("qi", "qwen_image", 16),
        ArchInfo("qie", "qwen_image_edit", 16),
        ArchInfo("qil", "qwen_image_layered", 16),
        ArchInfo("k5", "kandinsky5", 16, 24.0),
        ArchInfo("hv15", "hunyuan_video_1_5", 16, 24.0),
        ArchInfo("zi", "z_image", 16),
        ArchInfo("ho1", "hidream_o1_image", 32),
        ArchInfo("i4", "ideogram4", 16),
        ArchInfo("kr2", "krea2", 16),
    )
}

_BY_FULL = {a.full: a for a in ARCHITECTURES.values()}


def arch_info(name: str) -> ArchInfo:
    """Look up an architecture by short name (``k5``) or full name (``kandinsky5``); ``UserError`` if unknown."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name in _BY_FULL:
        return _BY_FULL[name]
    known = ", ".join(sorted(ARCHITECTURES))
    raise UserError(f"unknown architecture {name!r}; known short names: {known}")
