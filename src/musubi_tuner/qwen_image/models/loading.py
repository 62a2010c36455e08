"""Build the Qwen-Image DiT on the meta device and stream a checkpoint into it (bf16/fp16/fp32 or fp8).

Accepted checkpoints: the released / ComfyUI-repackaged single file (``qwen_image_bf16.safetensors`` ...; keys are
the diffusers module paths, optionally under ``model.diffusion_model.`` or ``diffusion_model.``, and 2511 files carry
ComfyUI's ``__index_timestep_zero__`` marker, which is dropped), split shards, or a diffusers transformer / pipeline
directory. A file that does not fit the chosen ``--model_version`` is a ``UserError`` naming the file and the mismatch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.modules.fp8_optimization import SCALE_SUFFIX, Fp8Config
from musubi_tuner.networks.arch_targets import register_model_class
from musubi_tuner.qwen_image.configs import ModelVersion, dit_params_for
from musubi_tuner.qwen_image.models.dit import QwenImageTransformer
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.key_mapping import KeyMap
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import LoraDeltaHook, load_weights_into_model
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights

logger = get_logger(__name__)

register_model_class(QwenImageTransformer.__name__, "qwen_image")

# specs/qwen_image.md §1 product rule: strip ComfyUI's prefixes, drop the 2511 marker key.
KEY_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")
MARKER_KEY = "__index_timestep_zero__"
DIT_KEY_MAP = KeyMap(
    prefixes=tuple((p, "") for p in KEY_PREFIXES),
    dropped=(rf"(?:{'|'.join(re.escape(p) for p in KEY_PREFIXES)})?{MARKER_KEY}",),
)

# fp8 selection (§8): the transformer blocks, never norms or the time embedding.
FP8_TARGETS: tuple[str, ...] = ("transformer_blocks",)
FP8_EXCLUDES: tuple[str, ...] = ("norm", "time_text_embed")
FP8_BLOCK_SIZE = 64

# A single file may carry its constructor arguments as JSON here (the tiny demo bundles do; released files do not).
DIT_CONFIG_METADATA_KEY = "qwen_image_dit_config"
_DIFFUSERS_ONLY_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path")
_VARIANT_FIELDS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


def qwen_fp8_config(scaled: bool = True, use_scaled_mm: bool = False) -> Fp8Config:
    """fp8 settings of the Qwen-Image DiT: block-wise scaled (``--fp8_scaled``) or plain cast (``--fp8_base``/``--fp8``)."""
    return Fp8Config(
        mode="block",
        block_size=FP8_BLOCK_SIZE,
        targets=FP8_TARGETS,
        excludes=FP8_EXCLUDES,
        scaled=scaled,
        use_scaled_mm=use_scaled_mm,
    )


def strip_dit_key(key: str) -> str:
    """A DiT (or LoRA target) name without ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix."""
    for p in KEY_PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def dit_weights_path(dit_path: str | os.PathLike) -> Path:
    """The file, or the diffusers transformer folder of a pipeline / transformer directory."""
    path = Path(dit_path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path


def _params_from_json(text: str, source: str) -> dict[str, Any]:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: cannot read the transformer config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: expected a JSON object")
    params = {k: v for k, v in cfg.items() if k not in _DIFFUSERS_ONLY_FIELDS}
    if "axes_dims_rope" in params:
        params["axes_dims_rope"] = tuple(params["axes_dims_rope"])
    return params


def _count_blocks(keys: list[str]) -> int:
    pat = re.compile(r"^transformer_blocks\.(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def check_checkpoint_fits(reader: WeightsReader, model: QwenImageTransformer, version: ModelVersion) -> None:
    """Raise a ``UserError`` naming the file and the first mismatch when the checkpoint is not this model version."""
    mapped = DIT_KEY_MAP.map_keys(reader.keys())
    internal = {v: k for k, v in mapped.items() if v is not None}
    if "img_in.weight" not in internal or "txt_in.weight" not in internal:
        raise UserError(f"{reader.name}: not a Qwen-Image DiT checkpoint (no img_in / txt_in weights); check --dit")
    have = _count_blocks(list(internal))
    if have < model.num_layers:
        raise UserError(
            f"{reader.name}: the checkpoint has {have} transformer_blocks, the model has {model.num_layers} "
            "(use --num_layers only with a checkpoint pruned to that many blocks)"
        )
    has_t_cond = "time_text_embed.addition_t_embedding.weight" in internal
    if has_t_cond != model.time_text_embed.use_additional_t_cond:
        what = "a Layered checkpoint" if has_t_cond else "not a Layered checkpoint"
        raise UserError(
            f"{reader.name}: this is {what}, but --model_version {version.name} "
            f"{'is not layered' if has_t_cond else 'is layered'}; pick the matching --model_version or --dit file"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, file_key in internal.items():
        if key.endswith(SCALE_SUFFIX) or key not in expected:
            continue
        shape = tuple(reader.get_shape(file_key))
        if shape != expected[key]:
            raise UserError(
                f"{reader.file_of(file_key)}: checkpoint does not fit Qwen-Image {version.name}: {file_key!r} has shape "
                f"{list(shape)}, the model expects {list(expected[key])}"
            )


def _key_map_for(reader: WeightsReader, num_layers: int) -> KeyMap:
    """``DIT_KEY_MAP``, also dropping the blocks beyond ``num_layers`` (``--num_layers`` on a full checkpoint)."""
    have = _count_blocks([DIT_KEY_MAP.map(k) or "" for k in reader.keys()])
    if have <= num_layers:
        return DIT_KEY_MAP
    extra = "|".join(str(i) for i in range(num_layers, have))
    prefix = "|".join(re.escape(p) for p in KEY_PREFIXES)
    return KeyMap(
        prefixes=DIT_KEY_MAP.prefixes, dropped=(*DIT_KEY_MAP.dropped, rf"(?:{prefix})?transformer_blocks\.(?:{extra})\..*")
    )


def resolve_dit_params(
    version: ModelVersion, reader: WeightsReader, weights: Path, num_layers: int | None = None
) -> dict[str, Any]:
    """Constructor arguments: a diffusers ``config.json``, else the file's metadata, else the release dims.

    The variant switches (``zero_cond_t`` ...) always come from ``--model_version``; the layer count from the file
    unless ``num_layers`` is given.
    """
    if weights.is_dir() and (weights / "config.json").is_file():
        params = _params_from_json((weights / "config.json").read_text(encoding="utf-8"), str(weights / "config.json"))
    elif embedded := reader.metadata().get(DIT_CONFIG_METADATA_KEY):
        params = _params_from_json(embedded, f"{reader.name} metadata {DIT_CONFIG_METADATA_KEY}")
    else:
        params = dit_params_for(version, num_layers=_count_blocks([DIT_KEY_MAP.map(k) or "" for k in reader.keys()]) or None)
    ref = dit_params_for(version)
    params.update({k: ref[k] for k in _VARIANT_FIELDS})
    if num_layers is not None:
        params["num_layers"] = num_layers
    return params


def load_dit(
    version: ModelVersion,
    dit_path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    fp8_base: bool = False,
    fp8_scaled: bool = False,
    fp8_fast: bool = False,
    attn_mode: str = "sdpa",
    lora_deltas: LoraDeltaHook | None = None,
    num_layers: int | None = None,
) -> QwenImageTransformer:
    """Build ``QwenImageTransformer`` for ``version`` on ``meta`` and stream ``dit_path`` into it (``strict=True``).

    ``lora_deltas`` merges LoRA deltas into each weight (keys already stripped of ComfyUI prefixes) before any fp8
    quantisation; ``num_layers`` loads only the first N blocks of a pruned checkpoint (musubi's ``--num_layers``).
    """
    path = Path(dit_path)
    if not path.exists():
        raise UserError(f"{path}: DiT checkpoint not found (--dit)")
    weights = dit_weights_path(path)
    fp8 = qwen_fp8_config(scaled=fp8_scaled or fp8_fast, use_scaled_mm=fp8_fast) if (fp8_base or fp8_scaled or fp8_fast) else None
    reader = open_weights(weights)
    try:
        params = resolve_dit_params(version, reader, weights, num_layers)
        try:
            with torch.device("meta"):
                model = QwenImageTransformer(**params, attn_mode=attn_mode)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: unsupported transformer config ({e})") from None
        check_checkpoint_fits(reader, model, version)
        result = load_weights_into_model(
            model,
            reader,
            key_map=_key_map_for(reader, model.num_layers),
            dtype=dtype,
            device=device,
            fp8=fp8,
            strict=True,
            lora_deltas=lora_deltas,
        )
    finally:
        reader.close()
    if fp8 is not None or result.prequantized:
        logger.info("DiT: %d Linear weights in fp8", len(result.fp8_linears))
    logger.info("loaded Qwen-Image DiT (%s) from %s", version.name, path)
    return model.eval().requires_grad_(False)


def model_keys(dit_path: str | os.PathLike) -> list[str]:
    """The checkpoint's tensor names as model keys (ComfyUI prefixes stripped): what LoRA names are matched against,
    so a LoRA applies fully to a prefixed checkpoint too."""
    with open_weights(dit_weights_path(dit_path)) as reader:
        return [m for k in reader.keys() if (m := DIT_KEY_MAP.map(k)) is not None]
