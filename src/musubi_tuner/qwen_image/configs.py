"""Qwen-Image model-version table (specs/qwen_image.md §1, §2, §6): variants, DiT dims, defaults and schedules.

``--model_version`` picks one of ``original``, ``edit``, ``edit-2509``, ``edit-2511``, ``layered`` (legacy ``--edit`` →
``edit``, ``--edit_plus`` → ``edit-2509``). ``dit_params_for(version)`` returns the DiT constructor arguments with the
diffusers ``QwenImageTransformer2DModel`` config field names (the released checkpoints are diffusers-named).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from musubi_tuner.utils.errors import UserError

LATENT_CHANNELS = 16
PATCH_SIZE = 2
VAE_SCALE = 8
PIXEL_STEP = VAE_SCALE * PATCH_SIZE  # pixel sizes must be multiples of 16
TEXT_HIDDEN_SIZE = 3584

# Scheduler config of the releases (§6).
BASE_IMAGE_SEQ_LEN = 256
MAX_IMAGE_SEQ_LEN = 8192
BASE_SHIFT = 0.5
MAX_SHIFT = 0.9
SHIFT_TERMINAL = 0.02

T2I_DROP_TOKENS = 34
EDIT_DROP_TOKENS = 64
DEFAULT_MAX_SEQUENCE_LENGTH = 512
MAX_SEQUENCE_LENGTH = 1024
EDIT_VL_AREA = 1024 * 1024  # Edit: VL and VAE control images resized to about this area
EDIT_PLUS_VL_AREA = 384 * 384  # Edit-Plus: VL images (CONDITION_IMAGE_SIZE)
EDIT_PLUS_VAE_AREA = 1024 * 1024


@dataclass(frozen=True)
class ModelVersion:
    """Everything the tools need to know about one Qwen-Image release."""

    name: str
    short: str  # dataset cache architecture short name
    full: str
    modelspec_arch: str
    checkpoint: str  # ComfyUI-repackaged file name users download
    vae_checkpoint: str
    resolution: int
    steps: int
    guidance: float
    is_edit: bool = False
    multi_image: bool = False  # Edit-Plus prompt layout ("Picture i: ..."), several control images
    zero_cond_t: bool = False
    is_layered: bool = False

    @property
    def drop_tokens(self) -> int:
        """Template tokens dropped from the Qwen2.5-VL hidden states (34 for T2I / layered, 64 for edit)."""
        return EDIT_DROP_TOKENS if self.is_edit else T2I_DROP_TOKENS

    @property
    def use_additional_t_cond(self) -> bool:
        return self.is_layered

    @property
    def use_layer3d_rope(self) -> bool:
        return self.is_layered

    @property
    def vae_channels(self) -> int:
        """3 (RGB) or 4 (RGBA, the Layered VAE)."""
        return 4 if self.is_layered else 3


_VERSIONS: tuple[ModelVersion, ...] = (
    ModelVersion(
        "original", "qi", "qwen_image", "Qwen-Image", "qwen_image_bf16.safetensors", "qwen_image_vae.safetensors", 1328, 50, 4.0
    ),
    ModelVersion(
        "edit",
        "qie",
        "qwen_image_edit",
        "Qwen-Image-Edit",
        "qwen_image_edit_bf16.safetensors",
        "qwen_image_vae.safetensors",
        1024,
        50,
        4.0,
        is_edit=True,
    ),
    ModelVersion(
        "edit-2509",
        "qie",
        "qwen_image_edit",
        "@@Qwen-Image-Edit-Plus@@",
        "qwen_image_edit_2509_bf16.safetensors",
        "qwen_image_vae.safetensors",
        1024,
        40,
        4.0,
        is_edit=True,
        multi_image=True,
    ),
    ModelVersion(
        "edit-2511",
        "qie",
        "qwen_image_edit",
        "@@Qwen-Image-Edit-2511@@",
        "qwen_image_edit_2511_bf16.safetensors",
        "qwen_image_vae.safetensors",
        1024,
        40,
        4.0,
        is_edit=True,
        multi_image=True,
        zero_cond_t=True,
    ),
    ModelVersion(
        "layered",
        "qil",
        "qwen_image_layered",
        "Qwen-Image-Layered",
        "qwen_image_layered_bf16.safetensors",
        "qwen_image_layered_vae.safetensors",
        1024,
        50,
        4.0,
        is_layered=True,
    ),
)

MODEL_VERSIONS: dict[str, ModelVersion] = {v.name: v for v in _VERSIONS}


def version_names() -> list[str]:
    """All valid ``--model_version`` values, in table order."""
    return list(MODEL_VERSIONS)


def get_model_version(name: str) -> ModelVersion:
    """Look up a version (case-insensitive); an unknown one is a ``UserError`` listing the valid ones."""
    try:
        return MODEL_VERSIONS[str(name).strip().lower()]
    except KeyError:
        raise UserError(f"unknown Qwen-Image --model_version '{name}'; valid: {', '.join(MODEL_VERSIONS)}") from None


def add_model_version_args(parser: Any) -> None:
    """``--model_version`` and the legacy ``--edit`` / ``--edit_plus`` flags (musubi-tuner's names)."""
    parser.add_argument(
        "--model_version", type=str, default=None, help=f"Qwen-Image release: {', '.join(MODEL_VERSIONS)} (default original)"
    )
    parser.add_argument("--edit", action="store_true", help="legacy: same as --model_version edit")
    parser.add_argument("--edit_plus", action="store_true", help="legacy: same as --model_version edit-2509")


def resolve_model_version(args: Any) -> ModelVersion:
    """The version chosen by ``--model_version`` / ``--edit`` / ``--edit_plus``; conflicting choices are a ``UserError``.

    Also sets ``args.model_version``, ``args.is_edit`` and ``args.is_layered`` (the names musubi-tuner scripts use).
    """
    legacy = [n for n, flag in (("edit", "edit"), ("edit-2509", "edit_plus")) if getattr(args, flag, False)]
    if len(legacy) > 1:
        raise UserError("--edit and --edit_plus are mutually exclusive; use --model_version")
    given = getattr(args, "model_version", None)
    if given is not None:
        version = get_model_version(given)
        if legacy and legacy[0] != version.name:
            flag = "--edit" if legacy[0] == "edit" else "--edit_plus"
            raise UserError(f"{flag} conflicts with --model_version {version.name}; give only --model_version")
    else:
        version = get_model_version(legacy[0] if legacy else "original")
    args.model_version = version.name
    args.is_edit = version.is_edit
    args.is_layered = version.is_layered
    return version


def dit_params_for(version: ModelVersion | str, num_layers: int | None = None) -> dict[str, Any]:
    """Full-size DiT constructor arguments (diffusers field names) for a version; ``num_layers`` overrides 60."""
    if isinstance(version, str):
        version = get_model_version(version)
    return {
        "patch_size": PATCH_SIZE,
        "in_channels": LATENT_CHANNELS * PATCH_SIZE * PATCH_SIZE,
        "out_channels": LATENT_CHANNELS,
        "num_layers": 60 if num_layers is None else num_layers,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": TEXT_HIDDEN_SIZE,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
        "zero_cond_t": version.zero_cond_t,
        "use_additional_t_cond": version.use_additional_t_cond,
        "use_layer3d_rope": version.use_layer3d_rope,
    }


# ---------------------------------------------------------------------------------------------------------- schedules


def dynamic_shift_mu(image_seq_len: int) -> float:
    """``μ = m·L + b`` through (256, 0.5) and (8192, 0.9), ``L`` = packed target tokens (§6)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_IMAGE_SEQ_LEN - BASE_IMAGE_SEQ_LEN)
    b = BASE_SHIFT - m * BASE_IMAGE_SEQ_LEN
    return image_seq_len * m + b


def layered_shift_mu(control_seq_len: int) -> float:
    """Layered: ``μ = sqrt(control_seq_len / (256·256/16/16))`` (§6)."""
    return math.sqrt(control_seq_len / (256 * 256 / 16 / 16))


def sampling_sigmas(num_steps: int, *, mu: float | None = None, flow_shift: float | None = None) -> list[float]:
    """The sigma grid of the releases: ``linspace(1, 1/N, N)`` shifted, stretched to end at 0.02, then 0 appended.

    With ``mu`` the exponential (dynamic) shift ``e^μ / (e^μ + (1/σ − 1))`` applies; with ``flow_shift`` the static
    shift ``s·σ / (1 + (s − 1)·σ)`` replaces it (musubi's ``--flow_shift``). Exactly one of them must be given.
    """
    if num_steps < 1:
        raise UserError(f"--infer_steps must be at least 1, got {num_steps}")
    if (mu is None) == (flow_shift is None):
        raise ValueError("give exactly one of mu / flow_shift")
    base = [1.0 - i * (1.0 - 1.0 / num_steps) / max(1, num_steps - 1) for i in range(num_steps)] if num_steps > 1 else [1.0]
    if mu is not None:
        shifted = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in base]
    else:
        shifted = [flow_shift * s / (1.0 + (flow_shift - 1.0) * s) for s in base]
    one_minus = [1.0 - s for s in shifted]
    scale = one_minus[-1] / (1.0 - SHIFT_TERMINAL)
    stretched = [1.0 - z / scale for z in one_minus] if scale > 0 else shifted
    return stretched + [0.0]
