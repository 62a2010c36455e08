"""Build the Wan DiT on the meta device and stream a checkpoint into it (bf16/fp16/fp32 or fp8).

Accepted: an official / ComfyUI-repackaged single ``.safetensors`` (keys = module paths, an optional
``model.diffusion_model.`` prefix is stripped), pre-cast fp8_e4m3fn files (with ``--fp8_base``), split shards, a
diffusers ``WanTransformer3DModel`` directory (``config.json``, or a pipeline with ``transformer/``; Wan 2.2 A14B
pipelines keep the low-noise expert in ``transformer_2/``) or a diffusers-named single file; diffusers names go
through ``DIFFUSERS_TO_OFFICIAL`` (specs/wan.md §4). A file that does not fit the task is one ``UserError`` naming
the file, the task and the first mismatch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from musubi_tuner.modules.fp8_optimization import SCALE_SUFFIX, Fp8Config
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.key_mapping import KeyMap, RegexRename
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import LoraDeltaHook, load_weights_into_model
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights
from musubi_tuner.wan.configs import TaskConfig, dit_params_for
from musubi_tuner.wan.models.dit import FP32_MODULES, WanModel

logger = get_logger(__name__)

# fp8 selection (spec §9): the blocks, minus norms/modulation/embeddings/head/img_emb.
FP8_TARGETS: tuple[str, ...] = ("blocks",)
FP8_EXCLUDES: tuple[str, ...] = (
    "norm",
    "patch_embedding",
    "text_embedding",
    "time_embedding",
    "time_projection",
    "head",
    "modulation",
    "img_emb",
)
FP8_BLOCK_SIZE = 64
DIT_CONFIG_METADATA_KEY = "wan_dit_config"  # constructor arguments as JSON (the tiny demo bundles carry it)
COMFY_PREFIX = "model.diffusion_model."

# diffusers name → official name (substring regexes, applied in order; spec §4). Each declares its inverse.
_BLK = r"(blocks\.\d+\.)"
DIFFUSERS_TO_OFFICIAL: tuple[RegexRename, ...] = tuple(
    RegexRename(p, r, ip, ir)
    for p, r, ip, ir in (
        (
            r"^condition_embedder\.time_embedder\.linear_1\.",
            "time_embedding.0.",
            r"^time_embedding\.0\.",
            "condition_embedder.time_embedder.linear_1.",
        ),
        (
            r"^condition_embedder\.time_embedder\.linear_2\.",
            "time_embedding.2.",
            r"^time_embedding\.2\.",
            "condition_embedder.time_embedder.linear_2.",
        ),
        (
            r"^condition_embedder\.text_embedder\.linear_1\.",
            "text_embedding.0.",
            r"^text_embedding\.0\.",
            "condition_embedder.text_embedder.linear_1.",
        ),
        (
            r"^condition_embedder\.text_embedder\.linear_2\.",
            "text_embedding.2.",
            r"^text_embedding\.2\.",
            "condition_embedder.text_embedder.linear_2.",
        ),
        (r"^condition_embedder\.time_proj\.", "time_projection.1.", r"^time_projection\.1\.", "condition_embedder.time_proj."),
        (
            r"^condition_embedder\.image_embedder\.norm1\.",
            "img_emb.proj.0.",
            r"^img_emb\.proj\.0\.",
            "condition_embedder.image_embedder.norm1.",
        ),
        (
            r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.",
            "img_emb.proj.1.",
            r"^img_emb\.proj\.1\.",
            "condition_embedder.image_embedder.ff.net.0.proj.",
        ),
        (
            r"^condition_embedder\.image_embedder\.ff\.net\.2\.",
            "img_emb.proj.3.",
            r"^img_emb\.proj\.3\.",
            "condition_embedder.image_embedder.ff.net.2.",
        ),
        (
            r"^condition_embedder\.image_embedder\.norm2\.",
            "img_emb.proj.4.",
            r"^img_emb\.proj\.4\.",
            "condition_embedder.image_embedder.norm2.",
        ),
        (
            r"^condition_embedder\.image_embedder\.pos_embed$",
            "img_emb.emb_pos",
            r"^img_emb\.emb_pos$",
            "condition_embedder.image_embedder.pos_embed",
        ),
        (r"^scale_shift_table$", "head.modulation", r"^head\.modulation$", "scale_shift_table"),
        (r"^proj_out\.", "head.head.", r"^head\.head\.", "proj_out."),
        (rf"^{_BLK}scale_shift_table$", r"\1modulation", rf"^{_BLK}modulation$", r"\1scale_shift_table"),
        (rf"^{_BLK}norm2\.", r"\1norm3.", rf"^{_BLK}norm3\.", r"\1norm2."),
        (rf"^{_BLK}ffn\.net\.0\.proj\.", r"\1ffn.0.", rf"^{_BLK}ffn\.0\.", r"\1ffn.net.0.proj."),
        (rf"^{_BLK}ffn\.net\.2\.", r"\1ffn.2.", rf"^{_BLK}ffn\.2\.", r"\1ffn.net.2."),
        (rf"^{_BLK}attn1\.to_out\.0\.", r"\1self_attn.o.", rf"^{_BLK}self_attn\.o\.", r"\1attn1.to_out.0."),
        (rf"^{_BLK}attn2\.to_out\.0\.", r"\1cross_attn.o.", rf"^{_BLK}cross_attn\.o\.", r"\1attn2.to_out.0."),
        (rf"^{_BLK}attn2\.add_k_proj\.", r"\1cross_attn.k_img.", rf"^{_BLK}cross_attn\.k_img\.", r"\1attn2.add_k_proj."),
        (rf"^{_BLK}attn2\.add_v_proj\.", r"\1cross_attn.v_img.", rf"^{_BLK}cross_attn\.v_img\.", r"\1attn2.add_v_proj."),
        (
            rf"^{_BLK}attn2\.norm_added_k\.",
            r"\1cross_attn.norm_k_img.",
            rf"^{_BLK}cross_attn\.norm_k_img\.",
            r"\1attn2.norm_added_k.",
        ),
        (rf"^{_BLK}attn1\.to_([qkv])\.", r"\1self_attn.\2.", rf"^{_BLK}self_attn\.([qkv])\.", r"\1attn1.to_\2."),
        (rf"^{_BLK}attn2\.to_([qkv])\.", r"\1cross_attn.\2.", rf"^{_BLK}cross_attn\.([qkv])\.", r"\1attn2.to_\2."),
        (rf"^{_BLK}attn1\.norm_([qk])\.", r"\1self_attn.norm_\2.", rf"^{_BLK}self_attn\.norm_([qk])\.", r"\1attn1.norm_\2."),
        (rf"^{_BLK}attn2\.norm_([qk])\.", r"\1cross_attn.norm_\2.", rf"^{_BLK}cross_attn\.norm_([qk])\.", r"\1attn2.norm_\2."),
    )
)
DIFFUSERS_KEY_MAP = KeyMap(regexes=DIFFUSERS_TO_OFFICIAL, dropped=(r".*norm_added_q\..*",))


def official_to_diffusers(key: str) -> str:
    """The diffusers name of an official key or module path (``blocks.0.self_attn.q`` → ``blocks.0.attn1.to_q``)."""
    is_tensor = key.endswith((".weight", ".bias")) or key in ("head.modulation", "img_emb.emb_pos") or key.endswith(".modulation")
    k = key if is_tensor else key + ".weight"
    for r in reversed(DIFFUSERS_TO_OFFICIAL):
        k = re.sub(r.inverse_pattern or "", r.inverse_repl or "", k)
    return k if is_tensor else k[: -len(".weight")]


def wan_fp8_config(scaled: bool = True, use_scaled_mm: bool = False) -> Fp8Config:
    """fp8 settings of the Wan DiT: block-scaled (``--fp8_scaled``) or plain cast (``--fp8_base``)."""
    return Fp8Config(
        mode="block",
        block_size=FP8_BLOCK_SIZE,
        targets=FP8_TARGETS,
        excludes=FP8_EXCLUDES,
        scaled=scaled,
        use_scaled_mm=use_scaled_mm,
    )


def _transformer_dir(path: Path, expert: str | None) -> Path | None:
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        return path
    sub = "transformer_2" if expert == "low" and (path / "transformer_2").is_dir() else "transformer"
    if (path / sub / "config.json").is_file():
        return path / sub
    return path


def dit_weights_path(dit_path: str | os.PathLike, expert: str | None = None) -> Path:
    """What ``--dit`` names on disk: the file, or the diffusers transformer folder (``transformer_2`` for the
    low-noise expert of a Wan 2.2 A14B pipeline directory)."""
    path = Path(dit_path)
    tdir = _transformer_dir(path, expert)
    return tdir if tdir is not None else path


_DIFFUSERS_CONFIG_FIELDS = {
    "in_channels": "in_dim",
    "out_channels": "out_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "text_dim": "text_dim",
    "freq_dim": "freq_dim",
    "image_dim": "image_dim",
    "cross_attn_norm": "cross_attn_norm",
    "eps": "eps",
    "patch_size": "patch_size",
}


def params_from_diffusers_config(cfg: dict, source: str) -> dict:
    """``WanModel`` arguments from a diffusers ``WanTransformer3DModel`` config."""
    try:
        params = {ours: cfg[theirs] for theirs, ours in _DIFFUSERS_CONFIG_FIELDS.items() if theirs in cfg}
        params["num_heads"] = int(cfg["num_attention_heads"])
        params["dim"] = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: not a WanTransformer3DModel config ({e})") from None
    params["flf_pos_emb"] = cfg.get("pos_embed_seq_len") is not None
    if "patch_size" in params:
        params["patch_size"] = tuple(params["patch_size"])
    return params


def _read_json(text: str, source: str) -> dict:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: cannot read the transformer config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: expected a JSON object")
    return cfg


def _key_map_for(keys: list[str]) -> KeyMap:
    """Official (optionally ``model.diffusion_model.``-prefixed) or diffusers names → our module paths."""
    comfy = any(k.startswith(COMFY_PREFIX) for k in keys)
    prefixes = ((COMFY_PREFIX, ""),) if comfy else ()
    stripped = [k[len(COMFY_PREFIX) :] if comfy and k.startswith(COMFY_PREFIX) else k for k in keys]
    if any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in stripped):
        return KeyMap(prefixes=prefixes, regexes=DIFFUSERS_KEY_MAP.regexes, dropped=DIFFUSERS_KEY_MAP.dropped)
    return KeyMap(prefixes=prefixes)


def _count_blocks(keys: list[str]) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"^blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def describe_checkpoint(reader: WeightsReader, key_map: KeyMap) -> str:
    """A short description of a DiT file (width, depth, input channels) for error messages."""
    mapped = key_map.map_keys(reader.keys())
    inv = {v: k for k, v in mapped.items()}
    if "patch_embedding.weight" not in inv:
        return "not a Wan DiT (no patch_embedding.weight)"
    shape = reader.get_shape(inv["patch_embedding.weight"])
    image = "with" if "img_emb.proj.1.weight" in inv else "without"
    return f"a Wan DiT of width {shape[0]}, {_count_blocks(list(mapped.values()))} blocks, {shape[1]} input channels, {image} CLIP image input"


def check_checkpoint_fits(reader: WeightsReader, key_map: KeyMap, model: WanModel, task_name: str) -> None:
    """``UserError`` naming the file, the task and the first mismatch when the checkpoint is for another model."""
    mapped = key_map.map_keys(reader.keys())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    looks = describe_checkpoint(reader, key_map)
    if "patch_embedding.weight" not in mapped.values():
        raise UserError(
            f"{reader.name}: not a Wan DiT checkpoint (no patch_embedding.weight; it looks like {looks}) for --task {task_name}"
        )
    have = _count_blocks(list(mapped.values()))
    if have != model.num_layers:
        raise UserError(
            f"{reader.name}: checkpoint does not fit task '{task_name}': it has {have} blocks, the task's model has "
            f"{model.num_layers} (the file is {looks}; pick the matching --task or --dit file)"
        )
    for fk, mk in mapped.items():
        if mk.endswith(SCALE_SUFFIX) or mk not in expected:
            continue
        shape = tuple(reader.get_shape(fk))
        if shape != expected[mk]:
            hint = ""
            if mk == "patch_embedding.weight":
                hint = " (input channels differ: T2V 16, I2V/FLF2V 36, Fun-Control 48, TI2V-5B 48)"
            raise UserError(
                f"{reader.file_of(fk)}: checkpoint does not fit task '{task_name}': {fk!r} has shape {list(shape)}, the "
                f"task expects {list(expected[mk])}{hint}; the file is {looks}"
            )
    have_img = any(v.startswith("img_emb.") for v in mapped.values())
    if have_img != model.has_image_input:
        want = "a CLIP image input (img_emb, 2.1 I2V/FLF2V)" if model.has_image_input else "no CLIP image input"
        raise UserError(
            f"{reader.name}: checkpoint does not fit task '{task_name}': the task's model has {want}; the file is {looks}"
        )
    if model.has_image_input and hasattr(model.img_emb, "emb_pos") and "img_emb.emb_pos" not in mapped.values():
        raise UserError(f"{reader.name}: task '{task_name}' (FLF2V) needs img_emb.emb_pos, which the checkpoint lacks")


def resolve_params(task: TaskConfig, reader: WeightsReader, weights: Path, key_map: KeyMap) -> dict:
    """DiT arguments: a diffusers ``config.json``, else the file's ``wan_dit_config`` metadata, else the task's dims."""
    params: dict | None = None
    if weights.is_dir() and (weights / "config.json").is_file():
        cfg_path = weights / "config.json"
        params = params_from_diffusers_config(_read_json(cfg_path.read_text(encoding="utf-8"), str(cfg_path)), str(cfg_path))
    if params is None:
        embedded = reader.metadata().get(DIT_CONFIG_METADATA_KEY)
        if embedded:
            params = _read_json(embedded, f"{reader.name} metadata {DIT_CONFIG_METADATA_KEY}")
            if "patch_size" in params:
                params["patch_size"] = tuple(params["patch_size"])
    base = dit_params_for(task)
    if params is None:
        return base
    merged = {**base, **params}
    merged["model_version"] = task.version  # 2.1 and 2.2 checkpoints share one layout; the task decides
    for field, what in (("in_dim", "input channels"), ("out_dim", "output channels")):
        if merged[field] != base[field]:
            raise UserError(
                f"{reader.name}: checkpoint does not fit task '{task.name}': its config has {merged[field]} {what}, "
                f"the task expects {base[field]} (T2V 16, I2V/FLF2V 36, Fun-Control 48, TI2V-5B 48)"
            )
    if (merged.get("image_dim") is None) != (base["image_dim"] is None) or bool(merged.get("flf_pos_emb")) != base["flf_pos_emb"]:
        want = "a CLIP image input" if base["image_dim"] is not None else "no CLIP image input"
        raise UserError(f"{reader.name}: checkpoint does not fit task '{task.name}': the task's model has {want} (FLF2V: emb_pos)")
    return merged


def load_dit(
    task: TaskConfig,
    dit_path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    fp8_base: bool = False,
    fp8_scaled: bool = False,
    fp8_fast: bool = False,
    attn_mode: str = "sdpa",
    split_attn: bool = False,
    lora_deltas: LoraDeltaHook | None = None,
    expert: str | None = None,
    flag: str = "--dit",
) -> WanModel:
    """Build ``WanModel`` for ``task`` on ``meta`` and stream ``dit_path`` into it (strict).

    ``dtype`` is the compute dtype of non-fp8 weights (None keeps the file dtype; the float32 islands always load
    as float32). ``fp8_base`` / ``fp8_scaled`` / ``fp8_fast``: plain fp8 cast, block-scaled fp8, scaled_mm.
    ``lora_deltas`` merges LoRA deltas into each weight before any quantisation. ``expert`` (``high``/``low``)
    picks ``transformer``/``transformer_2`` of a Wan 2.2 diffusers pipeline directory.
    """
    path = Path(dit_path)
    if not path.exists():
        raise UserError(f"{path}: DiT checkpoint not found ({flag})")
    weights = dit_weights_path(path, expert)
    fp8 = wan_fp8_config(scaled=fp8_scaled or fp8_fast, use_scaled_mm=fp8_fast) if (fp8_base or fp8_scaled or fp8_fast) else None
    reader = open_weights(weights)
    try:
        key_map = _key_map_for(reader.keys())
        params = resolve_params(task, reader, weights, key_map)
        try:
            with torch.device("meta"):
                model = WanModel(**params, attn_mode=attn_mode, split_attn=split_attn)
        except TypeError as e:
            raise UserError(f"{path}: unsupported transformer config ({e})") from None
        check_checkpoint_fits(reader, key_map, model, task.name)
        result = load_weights_into_model(
            model,
            reader,
            key_map=key_map,
            dtype=dtype,
            device=device,
            fp8=fp8,
            strict=True,
            lora_deltas=lora_deltas,
            keep_in_fp32=FP32_MODULES if dtype is not None else (),
        )
    finally:
        reader.close()
    if fp8 is not None or result.prequantized or result.fp8_linears:
        logger.info("DiT: %d Linear weights in fp8", len(result.fp8_linears))
    logger.info("loaded Wan DiT (%s) for task %s from %s", params.get("model_version"), task.name, path)
    return model.eval().requires_grad_(False)
