"""Build the Kandinsky 5 DiT on the meta device and stream a checkpoint into it (bf16/fp16/fp32 or fp8).

Accepted checkpoints: an official single ``.safetensors`` file (keys = module paths, specs/kandinsky5.md §4), split
shards, or a diffusers transformer directory (``config.json`` + safetensors with the same keys; a pipeline
directory with a ``transformer/`` sub-folder works too). A file that does not fit the task (another family, I2I
vs T2I input width, ...) is a ``UserError`` naming the file, the task and the first mismatching key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from musubi_tuner.kandinsky5.configs import FAMILIES, TaskConfig, dit_params_for
from musubi_tuner.kandinsky5.models.dit import FP32_MODULES, DiffusionTransformer3D
from musubi_tuner.modules.fp8_optimization import SCALE_SUFFIX, Fp8Config
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import LoraDeltaHook, load_weights_into_model
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights

logger = get_logger(__name__)

# fp8 selection (specs/kandinsky5.md §10): musubi's targets, minus the float32 islands (recommended).
FP8_TARGETS: tuple[str, ...] = ("visual_transformer_blocks", "text_transformer_blocks", "out_layer")
FP8_EXCLUDES: tuple[str, ...] = ("norm", "modulation", "time_embeddings", "pooled_text_embeddings")
FP8_BLOCK_SIZE = 64

_DIFFUSERS_ONLY_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path")

# A single-file checkpoint may carry its constructor arguments as JSON in this metadata key (the tiny demo bundles
# do; official files do not, and then the task's dims apply).
DIT_CONFIG_METADATA_KEY = "k5_dit_config"


def k5_fp8_config(scaled: bool = True, use_scaled_mm: bool = False, block_size: int = FP8_BLOCK_SIZE) -> Fp8Config:
    """fp8 settings for the K5 DiT: block-wise scaled (``--fp8_scaled``) or plain cast (``--fp8_base``)."""
    return Fp8Config(
        mode="block", block_size=block_size, targets=FP8_TARGETS, excludes=FP8_EXCLUDES, scaled=scaled, use_scaled_mm=use_scaled_mm
    )


def _transformer_dir(path: Path) -> Path | None:
    """The diffusers transformer folder of ``path`` (itself or ``path/transformer``), or None for a file."""
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path  # a bare directory of safetensors shards: params come from the task


def dit_weights_path(dit_path: str | os.PathLike) -> Path:
    """What ``--dit`` names on disk to read tensors from: the file itself, or the diffusers transformer folder of a
    pipeline / transformer directory (a bare directory of shards is used as it is)."""
    path = Path(dit_path)
    tdir = _transformer_dir(path)
    return tdir if tdir is not None else path


def read_diffusers_config(config_path: Path) -> dict:
    """DiT constructor arguments from a diffusers ``config.json`` (bookkeeping fields dropped)."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{config_path}: cannot read the transformer config ({e})") from None
    return _params_from_json(text, str(config_path))


def _params_from_json(text: str, source: str) -> dict:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: cannot read the transformer config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: expected a JSON object")
    params = {k: v for k, v in cfg.items() if k not in _DIFFUSERS_ONLY_FIELDS}
    for key in ("patch_size", "axes_dims"):
        if key in params:
            params[key] = tuple(params[key])
    return params


def _family_of(model_dim: int) -> str:
    for fam in FAMILIES.values():
        if fam.model_dim == model_dim:
            return fam.name
    return f"an unknown family (model_dim {model_dim})"


def _count_blocks(keys: list[str], prefix: str) -> int:
    pat = re.compile(rf"^{prefix}\.(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def check_checkpoint_fits(reader: WeightsReader, model: DiffusionTransformer3D, task_name: str) -> None:
    """Raise a ``UserError`` naming the file, task and first mismatching key when the checkpoint is for another model."""
    keys = reader.keys()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    probe = "text_embeddings.in_layer.weight"
    looks_like = _family_of(reader.get_shape(probe)[0]) if probe in reader else "not a Kandinsky 5 DiT"
    for prefix, want in (
        ("text_transformer_blocks", model.num_text_blocks),
        ("visual_transformer_blocks", model.num_visual_blocks),
    ):
        have = _count_blocks(keys, prefix)
        if have != want:
            raise UserError(
                f"{reader.name}: checkpoint does not fit task '{task_name}': it has {have} {prefix}, the task's model "
                f"has {want} (the file looks like {looks_like}; pick the matching --task or --dit file)"
            )
    for key in keys:
        if key.endswith(SCALE_SUFFIX) or key not in expected:
            continue
        shape = tuple(reader.get_shape(key))
        if shape != expected[key]:
            hint = ""
            if key == "visual_embeddings.in_layer.weight":
                hint = " (input width differs: image-conditioned I2V/I2I models take 33 channels, T2I 16)"
            raise UserError(
                f"{reader.file_of(key)}: checkpoint does not fit task '{task_name}': {key!r} has shape {list(shape)}, "
                f"the task expects {list(expected[key])}{hint}; the file looks like {looks_like}"
            )


def check_params_fit_task(params: dict, task: TaskConfig, source: str | os.PathLike) -> None:
    """The checkpoint's own config (diffusers ``config.json`` or ``k5_dit_config`` metadata) against the task.

    The model is built from that config, so a checkpoint of another family would load cleanly and train on the wrong
    inputs; refuse it here: the input layout (``visual_cond``: every video model and the I2I model take 33 channels,
    T2I 16) and, for real-size checkpoints, the family's ``model_dim``.
    """
    file_cond = params.get("visual_cond")
    if file_cond is not None and bool(file_cond) != task.visual_cond:
        kind = "a video or image-edit model (33 input channels)" if file_cond else "a text-to-image model (16 input channels)"
        raise UserError(
            f"{source}: checkpoint does not fit task '{task.name}': its config says visual_cond={bool(file_cond)}, "
            f"i.e. {kind}, but the task's {task.dims.name} model has visual_cond={task.visual_cond}; "
            "pick the matching --task or --dit file"
        )
    dim = params.get("model_dim")
    real_dims = {fam.model_dim for fam in FAMILIES.values()}
    if dim in real_dims and dim != task.dims.model_dim:
        raise UserError(
            f"{source}: checkpoint does not fit task '{task.name}': model_dim {dim} is {_family_of(dim)}, the task needs "
            f"{task.dims.name} (model_dim {task.dims.model_dim}); pick the matching --task or --dit file"
        )


def load_dit(
    task_config: TaskConfig,
    dit_path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    fp8_base: bool = False,
    fp8_scaled: bool = False,
    fp8_fast: bool = False,
    attn_mode: str = "sdpa",
    lora_deltas: LoraDeltaHook | None = None,
    params: dict | None = None,
    overrides: dict | None = None,
) -> DiffusionTransformer3D:
    """Build ``DiffusionTransformer3D`` for a task on ``meta`` and stream ``dit_path`` into it.

    Args:
        task_config: the task (dims, input width); a diffusers directory's ``config.json`` takes precedence.
        dit_path: official single file, shards, or diffusers transformer / pipeline directory.
        device: where the weights end up (block swap moves blocks later).
        dtype: compute dtype of non-fp8 weights (None keeps the file dtype); the float32 islands
            (time embedding, modulations) always load as float32.
        fp8_base / fp8_scaled / fp8_fast: plain fp8 cast, block-scaled fp8, scaled_mm kernels.
        attn_mode: attention backend for dense attention (``modules.attention`` modes).
        lora_deltas: hook merging LoRA deltas into each weight in high precision, before any fp8 quantisation.
        params: explicit constructor arguments; overrides the task dims. Without it: a diffusers directory's
            ``config.json``, else a single file's ``k5_dit_config`` metadata, else the task's dims.
        overrides: fields replacing those of the resolved parameters (``--override_dit``).
    """
    path = Path(dit_path)
    if not path.exists():
        raise UserError(f"{path}: DiT checkpoint not found (--dit)")
    weights = dit_weights_path(path)
    if params is None and weights.is_dir() and (weights / "config.json").is_file():
        params = read_diffusers_config(weights / "config.json")

    fp8 = k5_fp8_config(scaled=fp8_scaled or fp8_fast, use_scaled_mm=fp8_fast) if (fp8_base or fp8_scaled or fp8_fast) else None
    reader = open_weights(weights)
    try:
        if params is None:
            embedded = reader.metadata().get(DIT_CONFIG_METADATA_KEY)
            params = _params_from_json(embedded, f"{path} metadata {DIT_CONFIG_METADATA_KEY}") if embedded else None
        if params is not None:
            check_params_fit_task(params, task_config, path)
        if params is None:
            params = dit_params_for(task_config)
        if overrides:
            params = {**params, **overrides}
        try:
            with torch.device("meta"):
                model = DiffusionTransformer3D(**params, attn_mode=attn_mode)
        except TypeError as e:
            raise UserError(f"{path}: unsupported transformer config ({e})") from None
        check_checkpoint_fits(reader, model, task_config.name)
        result = load_weights_into_model(
            model,
            reader,
            dtype=dtype,
            device=device,
            fp8=fp8,
            strict=True,
            lora_deltas=lora_deltas,
            keep_in_fp32=FP32_MODULES if dtype is not None else (),
        )
    finally:
        reader.close()
    if fp8 is not None or result.prequantized:
        logger.info("DiT: %d Linear weights in fp8", len(result.fp8_linears))
    logger.info("loaded Kandinsky 5 DiT for task %s from %s", task_config.name, path)
    return model.eval().requires_grad_(False)
