"""Wan VAEs (specs/wan.md §5) from diffusers' ``AutoencoderKLWan``: 2.1 (16 channels, ×8 spatial) for Wan 2.1 and the
2.2 A14B experts, 2.2 (48 channels, ×16 with its 2×2 pixel patchify) for TI2V-5B.

Accepted on disk: a diffusers directory (``config.json`` or a pipeline with ``vae/``), a single ``.safetensors``
in the diffusers layout, or an official file (``Wan2.1_VAE.pth`` via ``torch.load(weights_only=True)``,
``wan_2.1_vae.safetensors``; ``Wan2.2_VAE.pth`` / ``wan2.2_vae.safetensors``) whose keys are converted with diffusers'
``convert_wan_vae_to_diffusers`` — for the 2.2 file after ``wan22_official_to_diffusers`` has regrouped its nested
``downsamples.X.downsamples.Y`` / ``upsamples.X.upsamples.Y`` blocks, which that converter does not know; the
architecture of an official file (widths, levels, blocks per level, temporal downsampling, 2.2 pixel patch) is read
from its shapes, and the 2.2 file gets the official 48-channel normalisation (``WAN22_LATENTS_MEAN`` / ``_STD``).
Normalisation per channel: ``(z − mean) / std``; latents are the posterior mode (official). Encode and decode run
causally in 1 + 4-frame chunks inside diffusers; its feature cache keeps, for every causal convolution, the last 2
input frames of the previous chunk at that convolution's resolution. ``--vae_cache_cpu`` (``cache_on_cpu``) keeps that
cache in CPU memory, as upstream does: each entry is copied to the CPU when written and back to the VAE's device for
the one convolution that reads it (``OffDeviceFeatureCache``), so the GPU holds one entry at a time instead of all.
"""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

VAE_CONFIG_METADATA_KEY = "vae_config"
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path")


def latent_frame_count(pixel_frames: int) -> int:
    """``(F − 1)//4 + 1`` for 4n+1 pixel frames."""
    if pixel_frames < 1 or (pixel_frames - 1) % 4:
        raise UserError(f"the Wan VAE needs 4n+1 pixel frames (1, 5, 9, ..., 81), got {pixel_frames}")
    return (pixel_frames - 1) // 4 + 1


def pixel_frame_count(latent_frames: int) -> int:
    return 4 * (latent_frames - 1) + 1


def infer_official_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``AutoencoderKLWan`` arguments of an official Wan 2.1-layout VAE state dict, read from its shapes."""
    try:
        base_dim = shapes["encoder.conv1.weight"][0]
        z_dim = shapes["conv2.weight"][0]
    except KeyError as e:
        raise UserError(f"not an official Wan VAE (missing {e})") from None
    entries: dict[int, set[str]] = {}
    for k in shapes:
        m = re.match(r"^encoder\.downsamples\.(\d+)\.(.*)$", k)
        if m:
            entries.setdefault(int(m.group(1)), set()).add(m.group(2))
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in sorted(entries):
        names = entries[i]
        if any(n.startswith("residual.") for n in names):
            levels[-1].append(shapes[f"encoder.downsamples.{i}.residual.6.weight"][0])
        else:  # a Resample: ends a level
            temporal.append(any(n.startswith("time_conv") for n in names))
            levels.append([])
    num_res = len(levels[0])
    if not num_res or any(len(lv) != num_res for lv in levels):
        raise UserError("official Wan VAE: cannot read its block layout (residual blocks per level differ)")
    dim_mult = [lv[-1] // base_dim for lv in levels]
    return {"base_dim": base_dim, "z_dim": z_dim, "dim_mult": dim_mult, "num_res_blocks": num_res, "temperal_downsample": temporal}


# Per-channel latent statistics of the Wan 2.2 VAE (official ``Wan2_2_VAE``; the diffusers TI2V-5B config carries the same).
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip
_RESNET_PARTS = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_WAN22_BLOCK_RE = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)$")


def is_official_wan22_vae(keys: list[str] | set[str]) -> bool:
    """True for the official Wan 2.2 VAE layout (residual blocks nested as ``encoder.downsamples.X.downsamples.Y``)."""
    return any(_WAN22_BLOCK_RE.match(k) for k in keys)


def wan22_official_to_diffusers_key(key: str) -> str:
    """One key of the official Wan 2.2 VAE in the names diffusers' Wan 2.1 converter passes through unchanged:
    ``encoder.downsamples.X.downsamples.Y.residual.N`` → ``encoder.down_blocks.X.resnets.Y.<norm1|conv1|...>``, the
    block's resample (its last entry) → ``encoder.down_blocks.X.downsampler.*`` (decoder: ``up_blocks.X.upsampler``).
    Other keys (middle, head, quant convs, conv1) are returned unchanged for that converter."""
    m = _WAN22_BLOCK_RE.match(key)
    if not m:
        return key
    side, x, y, rest = m.groups()
    enc = side.startswith("encoder")
    blocks = "encoder.down_blocks" if enc else "decoder.up_blocks"
    for old, new in _RESNET_PARTS.items():
        if rest.startswith(old):
            return f"{blocks}.{x}.resnets.{y}.{new}{rest[len(old) :]}"
    return f"{blocks}.{x}.{'downsampler' if enc else 'upsampler'}.{rest}"


def infer_official_wan22_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``AutoencoderKLWan`` arguments of an official Wan 2.2 VAE state dict, read from its shapes."""
    try:
        base_dim, in_ch = shapes["encoder.conv1.weight"][:2]
        z_dim = shapes["conv2.weight"][0]
        out_ch = shapes["decoder.head.2.weight"][0]
        dec_in = shapes["decoder.conv1.weight"][0]
    except KeyError as e:
        raise UserError(f"not an official Wan 2.2 VAE (missing {e})") from None
    resnets: dict[int, set[int]] = {}
    temporal: dict[int, bool] = {}
    for k in shapes:
        m = _WAN22_BLOCK_RE.match(k)
        if m and m[1] == "encoder.downsamples":
            x, y = int(m[2]), int(m[3])
            if m[4].startswith("residual."):
                resnets.setdefault(x, set()).add(y)
            elif m[4].startswith("time_conv."):
                temporal[x] = True
    levels = sorted(resnets)
    num_res = len(resnets[levels[0]]) if levels else 0
    if not num_res or any(len(resnets[x]) != num_res for x in levels):
        raise UserError("official Wan 2.2 VAE: cannot read its block layout (residual blocks per level differ)")
    dim_mult = [shapes[f"encoder.downsamples.{x}.downsamples.{num_res - 1}.residual.6.weight"][0] // base_dim for x in levels]
    patch = int(round((in_ch // 3) ** 0.5))
    temporal_list = [temporal.get(x, False) for x in levels[:-1]]
    return {
        "base_dim": base_dim,
        "decoder_base_dim": dec_in // dim_mult[-1],
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res,
        "temperal_downsample": temporal_list,
        "is_residual": True,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "patch_size": patch,
        "scale_factor_spatial": patch * 2 ** (len(dim_mult) - 1),
        "scale_factor_temporal": 2 ** sum(temporal_list),
        "latents_mean": list(WAN22_LATENTS_MEAN),
        "latents_std": list(WAN22_LATENTS_STD),
    }


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    reader = open_weights(path)
    try:
        return {k: reader.get_tensor(k) for k in reader.keys()}, reader.metadata()
    finally:
        reader.close()


class OffDeviceFeatureCache(list):
    """diffusers' causal-conv feature cache of ``AutoencoderKLWan`` (one entry per causal convolution: a tensor, ``None``
    or the ``"Rep"`` marker) with its tensors stored on the CPU. A tensor written is copied to the CPU; a tensor read
    comes back on ``device`` (the last one read is kept there until the next write, since diffusers reads an entry up
    to three times in a row). ``held_bytes`` / ``peak_bytes``: what the cache holds now / at most (off the device)."""

    def __init__(self, entries: list[Any], device: torch.device):
        super().__init__(entries)
        self.device = device
        self._hot: tuple[int, torch.Tensor] | None = None
        self._sizes: dict[int, int] = {}
        self.held_bytes = 0
        self.peak_bytes = 0

    def __setitem__(self, index: Any, value: Any) -> None:
        self._hot = None
        if isinstance(value, torch.Tensor):
            value = value.to("cpu")
        size = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
        self.held_bytes += size - self._sizes.get(index, 0)
        self._sizes[index] = size
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        super().__setitem__(index, value)

    def __getitem__(self, index: Any) -> Any:
        value = super().__getitem__(index)
        if not isinstance(value, torch.Tensor) or value.device == self.device:
            return value
        if self._hot is None or self._hot[0] != index:
            self._hot = (index, value.to(self.device))
        return self._hot[1]


def keep_feature_cache_on_cpu(vae: Any) -> None:
    """Make ``vae`` (an ``AutoencoderKLWan``) start every encode / decode with ``OffDeviceFeatureCache`` lists: diffusers
    resets its caches in ``clear_cache``, so the instance's ``clear_cache`` is wrapped to swap them in afterwards.
    ``vae.cpu_cache_peak_bytes``: the most one cache has held in CPU memory so far (the device memory it saved)."""
    reset = type(vae).clear_cache
    vae.cpu_cache_peak_bytes = 0

    def clear_cache(self: Any) -> None:
        for old in (getattr(self, "_feat_map", None), getattr(self, "_enc_feat_map", None)):
            if isinstance(old, OffDeviceFeatureCache):
                self.cpu_cache_peak_bytes = max(self.cpu_cache_peak_bytes, old.peak_bytes)
        reset(self)
        device = next(self.parameters()).device
        self._feat_map = OffDeviceFeatureCache(self._feat_map, device)
        self._enc_feat_map = OffDeviceFeatureCache(self._enc_feat_map, device)

    vae.clear_cache = types.MethodType(clear_cache, vae)


class WanVae:
    """``AutoencoderKLWan`` plus the Wan normalisation; pixels ``(B, 3, F, H, W)`` in [-1, 1] ⇄ normalised latents."""

    def __init__(self, vae: Any, kind: str, *, cache_on_cpu: bool = False):
        self.vae = vae
        self.kind = kind
        self.cache_on_cpu = cache_on_cpu
        if cache_on_cpu:
            keep_feature_cache_on_cpu(vae)
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        self.spatial = int(getattr(cfg, "scale_factor_spatial", None) or 8)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if self.mean.shape[1] != self.z_dim:
            raise UserError(f"VAE config: {self.mean.shape[1]} latents_mean values for z_dim {self.z_dim}")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: torch.device | str) -> WanVae:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, F, H, W)`` in [-1, 1] → normalised latents ``(B, z, (F−1)//4+1, H/s, W/s)`` float32."""
        if pixels.shape[2] != 1:
            latent_frame_count(pixels.shape[2])
        h, w = pixels.shape[-2:]
        if h % self.spatial or w % self.spatial:
            raise UserError(f"frame size {w}x{h} is not a multiple of the VAE's {self.spatial} px")
        x = pixels.to(device=self.device, dtype=self.dtype)
        mu = self.vae.encode(x).latent_dist.mode().float()
        return (mu - self.mean.to(mu.device)) / self.std.to(mu.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, z, F', h, w)`` → pixels ``(B, 3, 4(F'−1)+1, h·s, w·s)`` in [-1, 1] (float32)."""
        z = latents.float().to(self.device)
        z = z * self.std.to(z.device) + self.mean.to(z.device)
        out = self.vae.decode(z.to(self.dtype)).sample.float()
        return out.clamp(-1.0, 1.0)


def load_wan_vae(
    path: str | os.PathLike,
    *,
    kind: str = "wan2.1",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    cache_on_cpu: bool = False,
) -> WanVae:
    """Load a Wan VAE (``kind`` ``wan2.1`` or ``wan2.2``) from a diffusers directory or a single file; ``cache_on_cpu``
    is ``--vae_cache_cpu`` (the causal feature cache kept in CPU memory during encode / decode)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: VAE not found (--vae)")
    vae_dir = p if (p / "config.json").is_file() else (p / "vae" if (p / "vae" / "config.json").is_file() else None)
    if vae_dir is not None:
        try:
            vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"{vae_dir}: cannot load the Wan VAE ({e})") from None
    else:
        sd, metadata = _read_state_dict(p)
        cfg: dict[str, Any] = {}
        if VAE_CONFIG_METADATA_KEY in metadata:
            cfg = {k: v for k, v in json.loads(metadata[VAE_CONFIG_METADATA_KEY]).items() if k not in _BOOKKEEPING}
        official = "encoder.conv1.weight" in sd
        if official:
            shapes = {k: tuple(v.shape) for k, v in sd.items()}
            if is_official_wan22_vae(sd.keys()):
                if not cfg:
                    cfg = infer_official_wan22_config(shapes)
                sd = {wan22_official_to_diffusers_key(k): v for k, v in sd.items()}
            elif not cfg:
                cfg = infer_official_config(shapes)
            sd = convert_wan_vae_to_diffusers(sd)
        elif "encoder.conv_in.weight" not in sd:
            raise UserError(f"{p}: not a Wan VAE checkpoint (no encoder.conv1 / encoder.conv_in weights)")
        with torch.device("meta"):
            vae = AutoencoderKLWan(**cfg)
        expected = vae.state_dict()
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        if missing or unexpected:
            raise UserError(
                f"{p}: VAE checkpoint does not match AutoencoderKLWan ({len(missing)} missing, e.g. {missing[:3]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise UserError(f"{p}: VAE tensor {k!r} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
        vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    z = int(vae.config.z_dim)
    want = 48 if kind == "wan2.2" else 16
    if z != want:
        raise UserError(f"{p}: this VAE has {z} latent channels; the task needs the {kind} VAE ({want} channels)")
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("loaded Wan VAE (%s, %d channels) from %s%s", kind, z, p, "; causal cache in CPU memory" if cache_on_cpu else "")
    return WanVae(vae, kind, cache_on_cpu=cache_on_cpu)
