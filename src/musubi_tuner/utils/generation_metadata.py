"""Generation metadata (``bt_*`` keys, specs/generation.md §5): the dictionary and how files carry it.

One implementation for the generate scripts (``blissful_tuner.metadata`` re-exports it) and the trainer's samples
(``training.sample_output``), so a sample made while training carries the same keys as a generated file.
Carriers: PNG ``iTXt`` chunks (``png_info``); MP4/MKV container tags, plus for MP4 the whole dictionary as JSON in
the ``comment`` tag (``set_container_metadata``, ``MP4_OPTIONS``); see ``blissful_tuner.metadata`` for reading back.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


# the mp4 muxer drops non-standard tags unless asked to keep them
MP4_OPTIONS = {"movflags": "use_metadata_tags"}


def png_info(metadata: dict[str, str] | None) -> Any:
    """A PIL ``PngInfo`` holding each key as a UTF-8 ``iTXt`` chunk (``None`` without metadata)."""
    if not metadata:
        return None
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_itxt(str(k), str(v))
    return info


def set_container_metadata(container: Any, metadata: dict[str, str] | None, *, mp4: bool) -> None:
    """Tag an open PyAV output container: one tag per key, and for MP4 the JSON copy in ``MP4_JSON_TAG``."""
    if not metadata:
        return
    for k, v in metadata.items():
        container.metadata[str(k)] = str(v)
    if mp4:
        container.metadata[MP4_JSON_TAG] = json.dumps(metadata, ensure_ascii=False)
