"""Build the FLUX.2 DiT on the meta device and stream a checkpoint into it (bf16/fp16/fp32 or fp8).

Accepted: an official BFL single file (optionally with the ``model.diffusion_model.`` prefix), split shards, a
diffusers transformer file or directory (imported through ``models/keys.py``; a pipeline directory with a
``transformer/`` sub-folder works too). A checkpoint of another variant is one ``UserError`` naming the file, the
``--model_version`` and what the file looks like (specs/flux2.md §2, ARCHITECTURE_CHECKLIST line 2).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from musubi_tuner.flux_2.configs import MODEL_VERSIONS, ModelVersion, dit_params_for
from musubi_tuner.flux_2.models.dit import Flux2
from musubi_tuner.flux_2.models.keys import detect_layout, official_view
from musubi_tuner.modules.fp8_optimization import SCALE_SUFFIX, Fp8Config
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import LoraDeltaHook, load_weights_into_model
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights

logger = get_logger(__name__)

# fp8 selection (specs/flux2.md §9): the blocks' Linears, never norms / embedders / modulation heads.
FP8_TARGETS: tuple[str, ...] = ("double_blocks", "single_blocks")
FP8_EXCLUDES: tuple[str, ...] = ("norm", "pe_embedder", "time_in", "_modulation")
FP8_BLOCK_SIZE = 64
# Single files may carry their constructor arguments as JSON here (the tiny demo bundles do; official files do not).
DIT_CONFIG_METADATA_KEY = "flux2_dit_config"
MODEL_VERSION_METADATA_KEY = "flux2_model_version"


def flux2_fp8_config(scaled: bool = True, use_scaled_mm: bool = False) -> Fp8Config:
    """fp8 settings for the FLUX.2 DiT: block-scaled (``--fp8_scaled``) or plain cast (``--fp8_base``)."""
    return Fp8Config(
        mode="block",
        block_size=FP8_BLOCK_SIZE,
        targets=FP8_TARGETS,
        excludes=FP8_EXCLUDES,
        scaled=scaled,
        use_scaled_mm=use_scaled_mm,
    )


def dit_weights_path(dit_path: str | os.PathLike) -> Path:
    """The file itself, or the transformer folder of a diffusers pipeline / transformer directory."""
    path = Path(dit_path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "transformer").is_dir():
        return path / "transformer"
    return path


def _count(keys: list[str], prefix: str) -> int:
    rx = re.compile(rf"^{prefix}\.(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def describe_checkpoint(reader: WeightsReader) -> dict:
    """Dims read from an official-key view: hidden size, block counts, context width, guidance embedder."""
    keys = reader.keys()
    desc = {"double": _count(keys, "double_blocks"), "single": _count(keys, "single_blocks")}
    if "img_in.weight" in reader:
        desc["hidden"] = int(reader.get_shape("img_in.weight")[0])
    if "txt_in.weight" in reader:
        desc["context"] = int(reader.get_shape("txt_in.weight")[1])
    desc["guidance"] = any(k.startswith("guidance_in.") for k in keys)
    return desc


def _looks_like(desc: dict) -> str:
    for v in MODEL_VERSIONS.values():
        if (desc.get("hidden"), desc["double"], desc["single"]) == (v.hidden_size, v.depth, v.depth_single_blocks):
            family = [n for n, w in MODEL_VERSIONS.items() if (w.hidden_size, w.depth) == (v.hidden_size, v.depth)]
            return " or ".join(family)
    return f"hidden size {desc.get('hidden')}, {desc['double']} double / {desc['single']} single blocks"


def check_checkpoint_fits(reader: WeightsReader, model: Flux2, version: str) -> None:
    """``UserError`` naming the file, the version and the mismatch when the checkpoint is for another model."""
    if detect_layout(reader.keys())[0] == "unknown":
        raise UserError(
            f"{reader.name}: not a FLUX.2 transformer checkpoint (no 'single_stream_modulation.lin.weight' key); "
            "pass the flux2-*.safetensors DiT file with --dit"
        )
    desc = describe_checkpoint(reader)
    cfg = model.config
    problems = []
    if desc["double"] != cfg["depth"] or desc["single"] != cfg["depth_single_blocks"]:
        problems.append(
            f"it has {desc['double']} double / {desc['single']} single blocks, the model has {cfg['depth']} / {cfg['depth_single_blocks']}"
        )
    if desc.get("hidden") not in (None, cfg["hidden_size"]):
        problems.append(f"hidden size {desc['hidden']} != {cfg['hidden_size']}")
    if desc.get("context") not in (None, cfg["context_in_dim"]):
        problems.append(f"text width {desc['context']} != {cfg['context_in_dim']}")
    if desc["guidance"] != cfg["guidance_embed"]:
        has = "has" if desc["guidance"] else "has no"
        problems.append(f"it {has} guidance embedder (dev has one, klein has none)")
    if problems:
        raise UserError(
            f"{reader.name}: checkpoint does not fit --model_version {version}: {'; '.join(problems)} "
            f"(the file looks like {_looks_like(desc)}; pick the matching --model_version or --dit file)"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in reader.keys():
        if key.endswith(SCALE_SUFFIX) or key not in expected:
            continue
        if tuple(reader.get_shape(key)) != expected[key]:
            raise UserError(
                f"{reader.name}: checkpoint does not fit --model_version {version}: {key!r} has shape "
                f"{list(reader.get_shape(key))}, the model expects {list(expected[key])}"
            )


def _read_params(weights: Path, reader: WeightsReader) -> dict | None:
    cfg_file = weights / "config.json" if weights.is_dir() else None
    if cfg_file is not None and cfg_file.is_file():
        return params_from_diffusers_config(json.loads(cfg_file.read_text(encoding="utf-8")))
    embedded = reader.metadata().get(DIT_CONFIG_METADATA_KEY)
    if embedded:
        try:
            return json.loads(embedded)
        except json.JSONDecodeError as e:
            raise UserError(f"{weights}: metadata {DIT_CONFIG_METADATA_KEY} is not valid JSON ({e})") from None
    return None


def params_from_diffusers_config(cfg: dict) -> dict:
    """Our constructor arguments from a diffusers ``Flux2Transformer2DModel`` config.json."""
    heads, head_dim = int(cfg.get("num_attention_heads", 48)), int(cfg.get("attention_head_dim", 128))
    return {
        "in_channels": int(cfg.get("in_channels", 128)),
        "context_in_dim": int(cfg.get("joint_attention_dim", 15360)),
        "hidden_size": heads * head_dim,
        "num_heads": heads,
        "depth": int(cfg.get("num_layers", 8)),
        "depth_single_blocks": int(cfg.get("num_single_layers", 48)),
        "axes_dim": list(cfg.get("axes_dims_rope", (32, 32, 32, 32))),
        "theta": int(cfg.get("rope_theta", 2000)),
        "mlp_ratio": float(cfg.get("mlp_ratio", 3.0)),
        "guidance_embed": bool(cfg.get("guidance_embeds", True)),
    }


def _check_declared_version(raw: WeightsReader, params: dict, version: ModelVersion) -> None:
    """A file that declares its variant (metadata ``flux2_model_version``, our bundles and merges) or its guidance
    embedder (config) must agree with ``--model_version``; real BFL files are checked by their dims."""
    declared = raw.metadata().get(MODEL_VERSION_METADATA_KEY)
    if declared and declared != version.name:
        raise UserError(f"{raw.name}: checkpoint is FLUX.2 {declared}, but --model_version is {version.name}")
    if bool(params.get("guidance_embed", True)) != version.guidance_embed:
        kind = "has a guidance embedder (dev)" if params.get("guidance_embed", True) else "has no guidance embedder (klein)"
        raise UserError(f"{raw.name}: checkpoint does not fit --model_version {version.name}: it {kind}")


def _klein_twin(version: ModelVersion) -> ModelVersion | None:
    """The klein variant with the same shapes (distilled <-> base), or None for dev."""
    if version.name.startswith("klein-base-"):
        return MODEL_VERSIONS.get("klein-" + version.name[len("klein-base-") :])
    return MODEL_VERSIONS.get(version.name.replace("klein-", "klein-base-", 1)) if version.name.startswith("klein-") else None


def warn_if_name_suggests_twin(path: Path, version: ModelVersion) -> bool:
    """Warn when the file name points at the other klein variant of the same shapes (returns whether it warned).

    Distilled and base klein files have identical keys and shapes (specs/flux2.md §2–§3) and the released files carry
    no metadata naming the variant, so a wrong ``--model_version`` cannot be refused; it only gets the other
    variant's defaults (steps, guidance, true CFG or not). The file name is the one hint there is.
    """
    twin = _klein_twin(version)
    if twin is None:
        return False
    name = path.name.lower()
    says_base = "base" in name
    if "klein" not in name or says_base == (not version.distilled):
        return False
    logger.warning(
        f"{path.name}: the file name suggests FLUX.2 {twin.name}, but --model_version is {version.name} "
        f"({version.steps} steps, guidance {version.guidance}, {'true CFG' if version.uses_cfg else 'no CFG'}; "
        f"{twin.name}: {twin.steps} steps, guidance {twin.guidance}, {'true CFG' if twin.uses_cfg else 'no CFG'}). "
        "Distilled and base files cannot be told apart by their contents; pass the matching --model_version"
    )
    return True


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
    params: dict | None = None,
) -> Flux2:
    """Build ``Flux2`` for ``version`` on ``meta`` and stream ``dit_path`` into it (``strict=True``).

    ``params`` overrides the dims (else a diffusers ``config.json``, a single file's ``flux2_dit_config`` metadata,
    else the version's). ``lora_deltas`` merges LoRA deltas into each weight in high precision before any fp8
    quantisation.
    """
    path = Path(dit_path)
    if not path.exists():
        raise UserError(f"{path}: DiT checkpoint not found (--dit)")
    weights = dit_weights_path(path)
    fp8 = flux2_fp8_config(scaled=fp8_scaled or fp8_fast, use_scaled_mm=fp8_fast) if (fp8_base or fp8_scaled or fp8_fast) else None
    raw = open_weights(weights)
    reader = official_view(raw)
    try:
        if params is None:
            params = _read_params(weights, raw)
        if params is None:
            params = dit_params_for(version)
        _check_declared_version(raw, params, version)
        if not raw.metadata().get(MODEL_VERSION_METADATA_KEY):
            warn_if_name_suggests_twin(path, version)
        with torch.device("meta"):
            model = Flux2(**params, attn_mode=attn_mode)
        check_checkpoint_fits(reader, model, version.name)
        result = load_weights_into_model(model, reader, dtype=dtype, device=device, fp8=fp8, strict=True, lora_deltas=lora_deltas)
    finally:
        reader.close()
    if fp8 is not None or result.prequantized:
        logger.info("DiT: %d Linear weights in fp8", len(result.fp8_linears))
    logger.info("loaded FLUX.2 DiT (%s) from %s", version.name, path)
    return model.eval().requires_grad_(False)
