"""Generation metadata (``bt_*`` keys, specs/generation.md §5): building the dictionary and reading it back.

Carriers (all UTF-8; non-ASCII text round-trips unchanged):
- PNG: one ``iTXt`` chunk per key (written by ``media_output.save_png``).
- MKV: one container tag per key. Matroska tag names read back upper-case; ``read_metadata`` lower-cases them.
- MP4: the mp4 muxer drops non-standard tags unless ``movflags=use_metadata_tags`` is set, which we do (keys are
  stored as ``mdta`` items that ffmpeg/PyAV read back); because other tools may drop those, the whole dictionary is
  also stored as a JSON object in the standard ``comment`` tag (``MP4_JSON_TAG``). Readers merge both.
- Latent safetensors: the safetensors header metadata (same dictionary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.generation_metadata import (  # noqa: F401  (re-exported: the public API of this module)
    MP4_JSON_TAG,
    lora_entries,
    prepare_metadata,
    tuner_version,
)

_MUSUBI_KEYS = {
    "seeds": "bt_seeds",
    "prompt": "bt_prompt",
    "negative_prompt": "bt_negative_prompt",
    "height": "bt_height",
    "width": "bt_width",
    "infer_steps": "bt_infer_steps",
    "guidance_scale": "bt_guidance_scale",
    "embedded_cfg_scale": "bt_embedded_cfg_scale",
}


def normalize_metadata(raw: dict[str, str]) -> dict[str, str]:
    """Lower-case the keys (Matroska upper-cases tag names) and map musubi-style latent keys to ``bt_*``.

    Existing ``bt_*`` values win over mapped musubi keys.
    """
    out: dict[str, str] = {}
    for k, v in raw.items():
        out[k.lower()] = v
    for plain, bt in _MUSUBI_KEYS.items():
        if plain in out and bt not in out:
            out[bt] = out[plain]
    return out


def _read_png(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        text = dict(getattr(im, "text", {}) or {})
    return {k: str(v) for k, v in text.items()}


def _read_av(path: Path) -> dict[str, str]:
    import av

    with av.open(str(path)) as container:
        tags = dict(container.metadata)
    out: dict[str, str] = {}
    blob = tags.get(MP4_JSON_TAG) or tags.get(MP4_JSON_TAG.upper())
    if blob:
        try:
            data = json.loads(blob)
        except ValueError:
            data = None
        if isinstance(data, dict):
            out.update({str(k): str(v) for k, v in data.items()})
            tags = {k: v for k, v in tags.items() if k.lower() != MP4_JSON_TAG}
    out.update(tags)  # individual tags win over the JSON copy
    return out


def _read_safetensors(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_metadata(path: str | os.PathLike, *, bt_only: bool = False) -> dict[str, str]:
    """The metadata of a PNG, MP4, MKV (or other PyAV-readable video) or safetensors file, keys lower-cased.

    musubi-style latent keys (``seeds``, ``prompt``, ...) are also exposed under their ``bt_*`` names.
    ``bt_only`` keeps only ``bt_*`` keys. Unreadable files raise ``UserError`` naming the path.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".png":
            raw = _read_png(p)
        elif suffix == ".safetensors":
            raw = _read_safetensors(p)
        else:
            raw = _read_av(p)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read metadata from {p}: {e}") from None
    md = normalize_metadata(raw)
    if bt_only:
        md = {k: v for k, v in md.items() if k.startswith("bt_")}
    return md
