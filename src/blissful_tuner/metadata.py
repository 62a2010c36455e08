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
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from musubi_tuner.utils.errors import UserError

MP4_JSON_TAG = "comment"

# bt_key → candidate argument attributes (first one present and not None wins).
_ARG_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bt_prompt", ("prompt",)),
    ("bt_negative_prompt", ("negative_prompt",)),
    ("bt_prompt_2", ("prompt_2",)),
    ("bt_infer_steps", ("infer_steps", "steps", "sample_steps")),
    ("bt_guidance_scale", ("guidance_scale", "guidance", "cfg_scale")),
    ("bt_embedded_cfg_scale", ("embedded_cfg_scale",)),
    ("bt_flow_shift", ("flow_shift", "scheduler_scale", "discrete_flow_shift")),
    ("bt_scheduler", ("scheduler", "sample_solver")),
    ("bt_fps", ("fps",)),
    ("bt_task", ("task",)),
    ("bt_width", ("width",)),
    ("bt_height", ("height",)),
    ("bt_video_length", ("video_length", "frame_count")),
    ("bt_hidden_state_skip_layer", ("hidden_state_skip_layer",)),
    ("bt_apply_final_norm", ("apply_final_norm",)),
    ("bt_cfg_schedule", ("cfg_schedule",)),
    ("bt_cfg_skip_last_step", ("cfg_skip_last_step",)),
    ("bt_perp_neg", ("perp_neg",)),
    ("bt_cfgzerostar_scaling", ("cfgzerostar_scaling",)),
    ("bt_cfgzerostar_init_steps", ("cfgzerostar_init_steps",)),
    ("bt_cfgzerostar_multiplier", ("cfgzerostar_multiplier",)),
    ("bt_nag_scale", ("nag_scale",)),
    ("bt_nag_tau", ("nag_tau",)),
    ("bt_nag_alpha", ("nag_alpha",)),
    ("bt_nag_prompt", ("nag_prompt",)),
    ("bt_te_multiplier", ("te_multiplier",)),
    ("bt_riflex_index", ("riflex_index",)),
)

# Values meaning "feature off" are not recorded.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "bt_riflex_index": (0,),
    "bt_cfgzerostar_init_steps": (-1, 0),
    "bt_cfgzerostar_scaling": (False,),
    "bt_cfg_skip_last_step": (False,),
    "bt_apply_final_norm": (False,),
}
_NAG_DEPENDENT = ("bt_nag_tau", "bt_nag_alpha", "bt_nag_prompt")

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


def tuner_version() -> str:
    """The installed package version (``bt_tunerver``)."""
    try:
        from importlib.metadata import version

        return version("blissful-tuner")
    except Exception:  # not installed as a distribution (running from a checkout)
        return "unknown"


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_to_text(v) for v in value)
    return str(value)


def lora_entries(
    weights: Sequence[str | os.PathLike] | None, multipliers: Sequence[float] | None, prefix: str = "bt_lora"
) -> dict[str, str]:
    """``{prefix}_{i}: "<basename>: <multiplier>"`` for each LoRA (basename only; missing multipliers are 1.0)."""
    out = {}
    for i, w in enumerate(weights or []):
        mult = 1.0
        if multipliers is not None and i < len(multipliers) and multipliers[i] is not None:
            mult = float(multipliers[i])
        out[f"{prefix}_{i}"] = f"{Path(os.fspath(w)).name}: {mult:g}"
    return out


def prepare_metadata(
    args: Any,
    *,
    model_type: str,
    seeds: int | Iterable[int],
    prompt: str | None = None,
    negative_prompt: str | None = None,
    raw_prompt: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The ``bt_*`` dictionary for one output (every value a string).

    Always ``bt_model_type``, ``bt_seeds``, ``bt_creation_timestamp``, ``bt_tunerver``; the other keys come from
    the attributes of ``args`` that exist and are not ``None``/off. ``prompt``/``negative_prompt`` override the
    argument values (pass the wildcard-expanded text); ``raw_prompt`` (the unexpanded prompt) is recorded as
    ``bt_prompt_unexpanded`` when it differs. LoRAs come from ``lora_weight``/``lora_multiplier`` (and
    ``lora_weight_high``/``lora_multiplier_high``). ``extra`` adds or replaces keys (``None`` values are dropped).
    """
    seed_list = [seeds] if isinstance(seeds, int) else list(seeds)
    md: dict[str, str] = {
        "bt_model_type": model_type,
        "bt_seeds": ", ".join(str(s) for s in seed_list),
        "bt_creation_timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bt_tunerver": tuner_version(),
    }
    for key, attrs in _ARG_KEYS:
        for attr in attrs:
            value = getattr(args, attr, None)
            if value is not None:
                if value not in _OFF_VALUES.get(key, ()):
                    md[key] = _to_text(value)
                break
    if getattr(args, "nag_scale", None) is None:
        for key in _NAG_DEPENDENT:
            md.pop(key, None)
    if "bt_cfgzerostar_init_steps" not in md:  # the multiplier only acts on zero-init steps
        md.pop("bt_cfgzerostar_multiplier", None)
    if prompt is not None:
        md["bt_prompt"] = prompt
    if negative_prompt is not None:
        md["bt_negative_prompt"] = negative_prompt
    if raw_prompt is not None and raw_prompt != md.get("bt_prompt"):
        md["bt_prompt_unexpanded"] = raw_prompt
    md.update(lora_entries(getattr(args, "lora_weight", None), getattr(args, "lora_multiplier", None)))
    md.update(lora_entries(getattr(args, "lora_weight_high", None), getattr(args, "lora_multiplier_high", None), "bt_lora_high"))
    for key, value in (extra or {}).items():
        if value is None:
            md.pop(key, None)
        else:
            md[key] = _to_text(value)
    return md


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
