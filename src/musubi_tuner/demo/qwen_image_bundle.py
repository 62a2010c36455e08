"""Tiny random-weight Qwen-Image bundle in the on-disk formats users download (DESIGN.md "Tiny model bundles").

``write_qwen_image_bundle(out_dir)`` writes, deterministically for a seed:

- ``dit/qwen_image_tiny.safetensors``: the DiT in the released (diffusers-named) key layout, every parameter random,
  its constructor arguments as JSON in the metadata key ``qwen_image_dit_config`` (T2I / Edit / 2509 / 2511 share
  this layout); ``dit/qwen_image_layered_tiny.safetensors``: the Layered DiT (``addition_t_embedding``);
  ``dit/diffusers/``: the T2I weights as a diffusers transformer directory.
- ``vae/``: a diffusers ``AutoencoderKLQwenImage`` directory; ``qwen_image_vae.safetensors`` the same weights as the
  ComfyUI single file (original Wan key layout); ``qwen_image_layered_vae.safetensors``: the RGBA Layered VAE
  (``input_channels=4``), same layout.
- ``text_encoder/``: a tiny Qwen2.5-VL HF snapshot with the release's vocabulary size and special-token ids
  (``demo.qwen_image_vl``; tokenizer + ``preprocessor_config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.demo.bundles import QWEN_HIDDEN
from musubi_tuner.demo.qwen_image_vl import write_tiny_qwen_image_vl
from musubi_tuner.demo.snapshot_io import read_manifest, seeded, write_json
from musubi_tuner.qwen_image.models.loading import DIT_CONFIG_METADATA_KEY
from musubi_tuner.qwen_image.vae import VAE_CONFIG_METADATA_KEY
from musubi_tuner.utils.atomic import make_temp_dir, save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

BUNDLE_VERSION = 2
MANIFEST = "bundle.json"

TINY_DIT_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": QWEN_HIDDEN,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 4, 4],
    "zero_cond_t": False,
    "use_additional_t_cond": False,
    "use_layer3d_rope": False,
}
# The released VAE's block structure (dim_mult, two resnets per level) at base width 8, so that the ComfyUI / Wan
# original key layout (``wan_layout_state_dict``) exists for it.
TINY_VAE_CONFIG: dict[str, Any] = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": []}


@dataclass(frozen=True)
class QwenImageBundle:
    """Paths of one tiny Qwen-Image bundle (absolute)."""

    root: Path
    seed: int
    dit: Path
    dit_layered: Path
    dit_diffusers: Path
    vae: Path
    vae_file: Path
    vae_layered: Path
    text_encoder: Path

    @classmethod
    def from_manifest(cls, root: str | os.PathLike) -> QwenImageBundle:
        root, data, paths = read_manifest(root, MANIFEST, "Qwen-Image")
        return cls(root=root, seed=int(data["seed"]), **paths)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter seeded random (modulations too), activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith(".weight"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif p.dim() == 1:
                val = 0.02 * torch.randn(p.shape, generator=g)
            elif "_mod." in name:
                val = 0.5 / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g)
            else:
                val = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            p.copy_(val.to(p.dtype))


def write_tiny_dit(out_dir: Path, seed: int) -> dict[str, Path]:
    """T2I-layout and Layered DiT single files (released key layout + config metadata) and a diffusers directory."""
    from diffusers import QwenImageTransformer2DModel

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, extra in (
        ("qwen_image_tiny", {}),
        ("qwen_image_layered_tiny", {"use_additional_t_cond": True, "use_layer3d_rope": True}),
    ):
        cfg = {**TINY_DIT_CONFIG, **extra}
        with seeded(seed):
            model = QwenImageTransformer2DModel(**cfg)
        randomize_(model, seed)
        sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        path = out_dir / f"{name}.safetensors"
        save_safetensors_atomic(sd, path, metadata={DIT_CONFIG_METADATA_KEY: json.dumps(cfg, sort_keys=True), "format": "pt"})
        paths[name] = path
        if not extra:
            model.to(torch.bfloat16).save_pretrained(out_dir / "diffusers", safe_serialization=True)
    return paths


def _wan_key_candidates() -> list[str]:
    """Key names of the original (Wan 2.1 / ComfyUI) VAE layout, a superset for the released block structure."""
    res = ("residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma", "residual.6.weight", "residual.6.bias")
    extra = ("shortcut.weight", "shortcut.bias", "resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
    attn = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
    out = [f"{p}.{s}" for p in ("encoder.conv1", "decoder.conv1", "conv1", "conv2") for s in ("weight", "bias")]
    for side, blocks in (("encoder", "downsamples"), ("decoder", "upsamples")):
        out += [f"{side}.{blocks}.{i}.{r}" for i in range(16) for r in res + extra]
        out += [f"{side}.middle.{i}.{r}" for i in range(3) for r in res + attn]
        out += [f"{side}.head.{r}" for r in ("0.gamma", "2.weight", "2.bias")]
    return out


def wan_layout_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKLQwenImage`` state dict in the original Wan layout of the ComfyUI files, built as the
    exact inverse of diffusers' own single-file conversion (``convert_wan_vae_to_diffusers``)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    inverse = {}
    for cand in _wan_key_candidates():
        for key in convert_wan_vae_to_diffusers({cand: torch.zeros(1)}):
            if key in sd:
                inverse[key] = cand
    missing = sorted(set(sd) - set(inverse))
    if missing:
        raise ValueError(f"no Wan-layout name for {missing[:3]} (VAE block structure differs from the release)")
    return {inverse[k]: v.contiguous() for k, v in sd.items()}


def write_tiny_vae(root: Path, seed: int) -> None:
    """The RGB VAE as a diffusers directory and as the ComfyUI single file (original Wan key layout), and the RGBA
    Layered VAE single file (Wan layout too); the single files carry their config in the ``vae_config`` metadata."""
    from diffusers import AutoencoderKLQwenImage

    for channels, file_name in ((3, "qwen_image_vae.safetensors"), (4, "qwen_image_layered_vae.safetensors")):
        cfg = {**TINY_VAE_CONFIG, "input_channels": channels}
        with seeded(seed + channels):
            vae = AutoencoderKLQwenImage(**cfg)
        if channels == 3:
            vae.save_pretrained(root / "vae", safe_serialization=True)
        save_safetensors_atomic(
            wan_layout_state_dict(dict(vae.state_dict())),
            root / file_name,
            metadata={VAE_CONFIG_METADATA_KEY: json.dumps(cfg, sort_keys=True)},
        )


def write_qwen_image_bundle(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> QwenImageBundle:
    """Write (or reuse) a tiny Qwen-Image bundle in ``out_dir`` atomically and return its paths."""
    root = Path(out_dir).resolve()
    if root.exists():
        try:
            data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            if data.get("version") == BUNDLE_VERSION and data.get("seed") == seed and not overwrite:
                return QwenImageBundle.from_manifest(root)
        except (OSError, json.JSONDecodeError):
            pass
        if root.is_file() or (any(root.iterdir()) and not overwrite):
            raise UserError(f"{root}: exists and is not a tiny Qwen-Image bundle for seed {seed} (remove it or pass overwrite)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, prefix=f".{root.name}.")
    try:
        write_tiny_dit(tmp / "dit", seed)
        write_tiny_vae(tmp, seed + 1)
        write_tiny_qwen_image_vl(tmp / "text_encoder", seed + 3)
        paths = {
            "dit": "dit/qwen_image_tiny.safetensors",
            "dit_layered": "dit/qwen_image_layered_tiny.safetensors",
            "dit_diffusers": "dit/diffusers",
            "vae": "vae",
            "vae_file": "qwen_image_vae.safetensors",
            "vae_layered": "qwen_image_layered_vae.safetensors",
            "text_encoder": "text_encoder",
        }
        write_json(tmp / MANIFEST, {"version": BUNDLE_VERSION, "seed": seed, "paths": paths})
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny Qwen-Image bundle (seed %d) to %s", seed, root)
    return QwenImageBundle.from_manifest(root)


# ------------------------------------------------------------------------------------------------------------ dataset

CAPTIONS = (
    "a red circle on a blue background",
    "two small green squares in the corner of a grey field with soft light",
    "a yellow triangle",
    "an orange square above a purple circle, flat colours, simple shapes on white",
)


@dataclass(frozen=True)
class QwenImageDataset:
    """A synthetic image dataset: ``toml`` (resolution ``size``), ``image_dir``, ``control_dir`` (or None), ``cache_dir``."""

    root: Path
    toml: Path
    image_dir: Path
    control_dir: Path | None
    cache_dir: Path
    size: tuple[int, int]


def _shape_image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Any:
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    col = [int(v) for v in torch.randint(0, 256, (7,), generator=g)]
    bg = (col[0], col[1], col[2], 255) if mode == "RGBA" else (col[0], col[1], col[2])
    if mode == "RGBA" and seed % 2:
        bg = (0, 0, 0, 0)  # transparent layer
    img = Image.new(mode, size, bg)
    w, h = size
    x0, y0 = int(col[3]) % (w // 2), int(col[4]) % (h // 2)
    ImageDraw.Draw(img).ellipse(
        (x0, y0, x0 + w // 2, y0 + h // 2), fill=(col[5], col[6], col[3]) + ((255,) if mode == "RGBA" else ())
    )
    return img


def write_qwen_image_dataset(
    root: str | os.PathLike,
    *,
    n_images: int = 3,
    size: tuple[int, int] = (64, 48),
    controls: int = 0,
    layers: int = 0,
    batch_size: int = 1,
    seed: int = 0,
) -> QwenImageDataset:
    """PNG images with captions of different lengths; ``controls`` control images per item (``stem_i.png``, or
    ``stem.png`` for one); ``layers`` > 0 writes RGBA Layered items (``stem.png`` composite + ``stem_1..N.png``)."""
    root = Path(root).resolve()
    images, cache = root / "images", root / "cache"
    images.mkdir(parents=True, exist_ok=True)
    cache.mkdir(exist_ok=True)
    control_dir = root / "controls" if controls or layers else None
    if control_dir is not None:
        control_dir.mkdir(exist_ok=True)
    for i in range(n_images):
        stem = f"img_{i:02d}"
        mode = "RGBA" if layers else "RGB"
        _shape_image(seed * 100 + i, size, mode).save(images / f"{stem}.png")
        for k in range(1, layers + 1):
            _shape_image(seed * 100 + i * 10 + k, size, "RGBA").save(images / f"{stem}_{k}.png")
        (images / f"{stem}.txt").write_text(CAPTIONS[i % len(CAPTIONS)], encoding="utf-8")
        n_ctrl = max(controls, 1 if layers else 0)
        for k in range(n_ctrl):
            name = f"{stem}.png" if n_ctrl == 1 else f"{stem}_{k}.png"
            _shape_image(seed * 1000 + i * 10 + k, (size[0] // 2 * 2, size[1]), "RGB").save(control_dir / name)
    lines = [
        "[general]",
        f"resolution = [{size[0]}, {size[1]}]",
        'caption_extension = ".txt"',
        f"batch_size = {batch_size}",
        "enable_bucket = false",
        "",
        "[[datasets]]",
        f"image_directory = {json.dumps(str(images))}",
        f"cache_directory = {json.dumps(str(cache))}",
    ]
    if control_dir is not None:
        lines.append(f"control_directory = {json.dumps(str(control_dir))}")
    if layers:
        lines.append("multiple_target = true")
    toml = root / "dataset.toml"
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return QwenImageDataset(root, toml, images, control_dir, cache, size)
