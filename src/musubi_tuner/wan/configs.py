"""Wan task table: model dimensions, conditioning, VAE, sampling defaults and expert boundaries (specs/wan.md §1, §2, §7).

The task keys are musubi-tuner's ``--task`` values plus ``ti2v-5B`` (Wan 2.2 TI2V-5B, not in the reference list).
``dit_params_for(task)`` returns the DiT constructor arguments (our ``WanModel`` fields, named as in the official
config); ``parse_timestep_boundary`` implements the product rule that 0.875 and 875 mean the same boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from musubi_tuner.utils.errors import UserError

VaeKind = Literal["wan2.1", "wan2.2"]

TEXT_DIM = 4096
TEXT_LENGTH = 512  # UMT5 states are always zero-padded to 512 before the DiT (spec §3)
FREQ_DIM = 256
CLIP_DIM = 1280
CLIP_TOKENS = 257
PATCH_SIZE = (1, 2, 2)
FPS = 16

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
I2V_NEGATIVE_PREFIX = "镜头晃动，"


@dataclass(frozen=True)
class ModelDims:
    """Transformer dimensions of one model size (spec §2)."""

    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    num_params: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIMS: dict[str, ModelDims] = {
    "1.3B": ModelDims("1.3B", 1536, 8960, 12, 30, 1_418_996_800),
    "14B": ModelDims("14B", 5120, 13824, 40, 40, 14_288_491_584),
    "5B": ModelDims("5B", 3072, 14336, 24, 30, 4_999_787_712),
}


@dataclass(frozen=True)
class TaskConfig:
    """Everything the tools need to know about one Wan ``--task``."""

    name: str
    size: str  # key of DIMS
    version: Literal["2.1", "2.2"]
    in_channels: int
    out_channels: int
    steps: int
    shift: float
    guidance: float
    i2v: bool = False  # image condition channels (mask 4 + latent 16)
    clip: bool = False  # 2.1 I2V / FLF2V image cross-attention (CLIP-H tokens)
    flf2v: bool = False  # first + last frame (514 CLIP tokens, emb_pos)
    control: bool = False  # Fun-Control (control latent channels)
    image_only: bool = False  # t2i-14B: one frame
    ti2v: bool = False  # Wan 2.2 TI2V-5B: per-token timesteps, first-frame latent replacement
    boundary: float | None = None  # two-expert models: high-noise expert for t >= boundary (t in [0, 1])
    guidance_high: float | None = None  # two-expert models: CFG of the high-noise expert
    frames: int = 81
    resolution: tuple[int, int] = (1280, 720)  # (W, H) default

    @property
    def dims(self) -> ModelDims:
        return DIMS[self.size]

    @property
    def two_experts(self) -> bool:
        return self.boundary is not None

    @property
    def vae(self) -> VaeKind:
        return "wan2.2" if self.ti2v else "wan2.1"

    @property
    def latent_channels(self) -> int:
        return 48 if self.ti2v else 16

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        """(temporal, spatial, spatial) VAE compression."""
        return (4, 16, 16) if self.ti2v else (4, 8, 8)

    @property
    def resolution_step(self) -> int:
        """Pixel multiple of W and H: VAE stride x patch 2."""
        return self.vae_stride[1] * PATCH_SIZE[1]

    @property
    def image_dim(self) -> int | None:
        return CLIP_DIM if self.clip else None

    @property
    def fps(self) -> int:
        return 24 if self.ti2v else FPS

    @property
    def negative_prompt(self) -> str:
        return (I2V_NEGATIVE_PREFIX + DEFAULT_NEGATIVE_PROMPT) if self.i2v else DEFAULT_NEGATIVE_PROMPT


# trainer options: the two-expert mode (spec §9 product rule) and blissful-tuner flags we refuse, with the reason
EXPERT_CHOICES = ("both", "high", "low")
TRAIN_REFUSED_FLAGS = {
    "--mixed_precision_transformer": "the DiT keeps its float32 islands (norms, modulation, time embedding) already",
    "--simple_modulation": "not implemented (approximates the modulation; the product keeps the reference math)",
    "--lower_precision_attention": "not implemented (attention runs in the compute dtype)",
    "--optimized_compile": "not implemented; use --compile with the --compile_* options",
    "--disable_blockwise_quant": "fp8 quantisation here is block-wise by design; use --fp8_base without --fp8_scaled for plain casts",
}


def _t(name: str, size: str, version: str, cin: int, steps: int, shift: float, guidance: float, **kw) -> TaskConfig:
    cout = kw.pop("cout", 16)
    return TaskConfig(name, size, version, cin, cout, steps, shift, guidance, **kw)  # type: ignore[arg-type]


TASKS: dict[str, TaskConfig] = {
    t.name: t
    for t in (
        _t("t2v-14B", "14B", "2.1", 16, 50, 5.0, 5.0),
        _t("t2v-1.3B", "1.3B", "2.1", 16, 50, 5.0, 5.0, resolution=(832, 480)),
        _t("t2i-14B", "14B", "2.1", 16, 50, 5.0, 5.0, image_only=True, frames=1),
        _t("i2v-14B", "14B", "2.1", 36, 40, 5.0, 5.0, i2v=True, clip=True),
        _t("flf2v-14B", "14B", "2.1", 36, 40, 16.0, 5.0, i2v=True, clip=True, flf2v=True),
        # Fun-Control: [noisy 16, control latent 16, start-image latent 16 (zeros without an image)]
        _t("t2v-1.3B-FC", "1.3B", "2.1", 48, 50, 5.0, 5.0, control=True, resolution=(832, 480)),
        _t("t2v-14B-FC", "14B", "2.1", 48, 50, 5.0, 5.0, control=True),
        _t("i2v-14B-FC", "14B", "2.1", 48, 40, 5.0, 5.0, control=True, i2v=True, clip=True),
        _t("t2v-A14B", "14B", "2.2", 16, 40, 12.0, 3.0, boundary=0.875, guidance_high=4.0),
        _t("i2v-A14B", "14B", "2.2", 36, 40, 5.0, 3.5, i2v=True, boundary=0.900, guidance_high=3.5),
        _t("ti2v-5B", "5B", "2.2", 48, 50, 5.0, 5.0, ti2v=True, cout=48, frames=121),
    )
}


def task_names() -> list[str]:
    """Every ``--task`` value."""
    return list(TASKS)


def get_task_config(name: str) -> TaskConfig:
    """The task of ``--task name``; an unknown name is a ``UserError`` listing the known ones."""
    if name not in TASKS:
        raise UserError(f"unknown --task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def dit_params_for(task: TaskConfig) -> dict:
    """``WanModel`` constructor arguments of the task's released checkpoint."""
    d = task.dims
    return {
        "model_version": task.version,
        "patch_size": PATCH_SIZE,
        "in_dim": task.in_channels,
        "out_dim": task.out_channels,
        "dim": d.dim,
        "ffn_dim": d.ffn_dim,
        "num_heads": d.num_heads,
        "num_layers": d.num_layers,
        "text_dim": TEXT_DIM,
        "freq_dim": FREQ_DIM,
        "image_dim": task.image_dim,
        "flf_pos_emb": task.flf2v,
        "cross_attn_norm": True,
        "eps": 1e-6,
    }


def parse_timestep_boundary(value: float | int | str | None, *, flag: str = "--timestep_boundary") -> float | None:
    """A boundary in [0, 1] from a float in [0, 1] or an integer-valued number in (1, 1000] (product rule, spec §9)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: expected a number in [0, 1] or in (1, 1000]") from None
    if 0.0 <= v <= 1.0:
        return v
    if 1.0 < v <= 1000.0:
        return v / 1000.0
    raise UserError(f"{flag} {value!r}: expected a number in [0, 1] (e.g. 0.875) or in (1, 1000] (e.g. 875)")


def check_video_geometry(task: TaskConfig, width: int, height: int, frames: int, *, where: str = "") -> None:
    """W and H multiples of the task's step, frame count 4n+1 (1 for t2i)."""
    step = task.resolution_step
    prefix = f"{where}: " if where else ""
    if width % step or height % step or width <= 0 or height <= 0:
        raise UserError(f"{prefix}size {width}x{height} is not a multiple of {step} px (Wan {task.name}: VAE x patch)")
    if task.image_only and frames != 1:
        raise UserError(f"{prefix}task {task.name} generates single images; frame count must be 1 (got {frames})")
    if frames < 1 or (frames - 1) % 4:
        raise UserError(f"{prefix}frame count {frames} is not 4n+1 (1, 5, 9, ..., 81)")
