"""FLUX.2 model-version table: transformer dims, text encoder, sampling defaults per ``--model_version``.

Facts from specs/flux2.md §2, §3, §7. ``dit_params_for(version)`` returns the constructor arguments of our DiT with
the official config field names (``hidden_size``, ``depth``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from musubi_tuner.utils.errors import UserError

TextEncoderKind = Literal["mistral3", "qwen3"]

ARCH = "f2"
ARCH_FULL = "flux_2"
RESOLUTION_STEP = 16  # px: 8x VAE downsampling, then 2x2 patchify
LATENT_CHANNELS = 32  # VAE latent channels before patchify
IN_CHANNELS = 128  # DiT token width (32 x 2 x 2)
TEXT_MAX_LENGTH = 512
HEAD_DIM = 128
AXES_DIM = (32, 32, 32, 32)
ROPE_THETA = 2000
MLP_RATIO = 3.0
REFERENCE_T_STEP = 10  # reference image i (0-based) sits at RoPE time 10 + 10*i
IMPLEMENTATION_URL = "https://github.com/black-forest-labs/flux2"
MISTRAL_OUTPUT_LAYERS = (10, 20, 30)
QWEN3_OUTPUT_LAYERS = (9, 18, 27)
DEFAULT_TRAINING_GUIDANCE = 1.0  # embedded guidance fed to dev while training (specs/flux2.md §9)


@dataclass(frozen=True)
class ModelVersion:
    """One ``--model_version``: dims, text encoder and sampling defaults."""

    name: str
    hidden_size: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    num_heads: int
    text_encoder: TextEncoderKind
    text_hidden_size: int  # hidden size of the text encoder; the DiT context width is 3x this
    guidance_embed: bool  # dev: embedded guidance; klein: none (guidance acts as CFG scale)
    distilled: bool  # few-step distilled (klein-4b / klein-9b) or guidance-distilled (dev): no true CFG
    guidance: float
    steps: int
    checkpoint: str
    modelspec_architecture: str

    @property
    def context_in_dim(self) -> int:
        return 3 * self.text_hidden_size

    @property
    def uses_cfg(self) -> bool:
        """True CFG with a negative prompt: only the klein base variants."""
        return not self.distilled

    @property
    def output_layers(self) -> tuple[int, int, int]:
        return MISTRAL_OUTPUT_LAYERS if self.text_encoder == "mistral3" else QWEN3_OUTPUT_LAYERS

    @property
    def checkpoint_file(self) -> str:
        return f"{self.checkpoint}.safetensors"

    @property
    def is_klein(self) -> bool:
        return self.text_encoder == "qwen3"


_KLEIN4 = {"hidden_size": 3072, "depth": 5, "depth_single_blocks": 20, "num_heads": 24, "text_hidden_size": 2560}
_KLEIN9 = {"hidden_size": 4096, "depth": 8, "depth_single_blocks": 24, "num_heads": 32, "text_hidden_size": 4096}

_VERSIONS: tuple[ModelVersion, ...] = (
    ModelVersion(
        "dev", 6144, 8, 48, 48, "mistral3", 5120, True, True, 4.0, 50, "flux2-dev", "Flux.2-dev"
    ),
    ModelVersion(name="klein-4b", **_KLEIN4, text_encoder="qwen3", guidance_embed=False, distilled=True, guidance=1.0,
                 steps=4, checkpoint="flux2-klein-4b", modelspec_architecture="Flux.2-klein-4b"),
    ModelVersion(name="klein-base-4b", **_KLEIN4, text_encoder="qwen3", guidance_embed=False, distilled=False,
                 guidance=4.0, steps=50, checkpoint="flux2-klein-base-4b", modelspec_architecture="Flux.2-klein-base-4b"),
    ModelVersion(name="klein-9b", **_KLEIN9, text_encoder="qwen3", guidance_embed=False, distilled=True, guidance=1.0,
                 steps=4, checkpoint="flux2-klein-9b", modelspec_architecture="Flux.2-klein-9b"),
    ModelVersion(name="klein-base-9b", **_KLEIN9, text_encoder="qwen3", guidance_embed=False, distilled=False,
                 guidance=4.0, steps=50, checkpoint="flux2-klein-base-9b", modelspec_architecture="Flux.2-klein-base-9b"),
)  # fmt: skip

MODEL_VERSIONS: dict[str, ModelVersion] = {v.name: v for v in _VERSIONS}


def model_version_names() -> list[str]:
    """All valid ``--model_version`` values, in table order."""
    return list(MODEL_VERSIONS)


def get_model_version(name: str) -> ModelVersion:
    """Look up a model version; unknown → ``UserError`` listing the valid ones."""
    try:
        return MODEL_VERSIONS[name]
    except KeyError:
        raise UserError(f"unknown FLUX.2 model version '{name}' (--model_version); valid: {', '.join(MODEL_VERSIONS)}") from None


def dit_params_for(version: ModelVersion | str) -> dict:
    """DiT constructor arguments of a model version (official config field names)."""
    if isinstance(version, str):
        version = get_model_version(version)
    return {
        "in_channels": IN_CHANNELS,
        "context_in_dim": version.context_in_dim,
        "hidden_size": version.hidden_size,
        "num_heads": version.num_heads,
        "depth": version.depth,
        "depth_single_blocks": version.depth_single_blocks,
        "axes_dim": AXES_DIM,
        "theta": ROPE_THETA,
        "mlp_ratio": MLP_RATIO,
        "guidance_embed": version.guidance_embed,
    }
