"""Kandinsky 5 task table: model family dimensions, attention, resolution and sampling defaults per task.

The 17 task keys mirror the official YAML files and musubi-tuner / Blissful ``TASK_CONFIGS`` (specs/kandinsky5.md §1, §2).
``dit_params_for(task)`` returns the DiT constructor arguments with the official / diffusers config field names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from musubi_tuner.utils.errors import UserError

AttentionType = Literal["dense", "nabla"]
VaeKind = Literal["hunyuan_video", "flux1"]

LATENT_CHANNELS = 16
QWEN_HIDDEN_SIZE = 3584
CLIP_POOLED_SIZE = 768
CLIP_MAX_LENGTH = 77
PATCH_SIZE = (1, 2, 2)
OUTPUT_FPS = 24

NABLA_WT, NABLA_WH, NABLA_WW = 11, 3, 3
NABLA_METHOD = "topcdf"
NABLA_METHODS = ("topcdf", "topk")  # binarisations of the NABLA attention map


@dataclass(frozen=True)
class ModelFamily:
    """Dimensions shared by every checkpoint of one model family (specs/kandinsky5.md §1)."""

    name: str
    model_dim: int
    ff_dim: int
    time_dim: int
    num_text_blocks: int
    num_visual_blocks: int
    axes_dims: tuple[int, int, int]
    num_params: int
    num_keys: int

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim


FAMILIES: dict[str, ModelFamily] = {
    "video_lite": ModelFamily("Video Lite (2B)", 1792, 7168, 512, 2, 32, (16, 24, 24), 2_007_702_848, 814),
    "image_lite": ModelFamily("Image Lite (6B)", 2560, 10240, 512, 2, 50, (32, 48, 48), 6_022_080_576, 1246),
    "video_pro": ModelFamily("Video Pro (19B)", 4096, 16384, 1024, 4, 60, (32, 48, 48), 19_311_325_248, 1514),
}


@dataclass(frozen=True)
class TaskConfig:
    """Everything the tools need to know about one Kandinsky 5 task key."""

    name: str
    family: str  # key of FAMILIES
    attention: AttentionType
    resolution: int  # 512 ("sd") or 1024 ("hd")
    rope_scale: tuple[float, float, float]  # (t, h, w) RoPE position-interpolation divisors
    steps: int
    guidance: float
    scheduler_scale: float
    checkpoint: str  # default checkpoint file stem (".safetensors")
    nabla_p: float | None = None
    nabla_wT: int = NABLA_WT
    nabla_wH: int = NABLA_WH
    nabla_wW: int = NABLA_WW
    nabla_method: str = NABLA_METHOD
    nabla_add_sta: bool = True
    instruct_type: str | None = None  # "channel" for the Image Lite I2I model

    @property
    def dims(self) -> ModelFamily:
        return FAMILIES[self.family]

    @property
    def is_image(self) -> bool:
        """Image Lite tasks (T2I / I2I): FLUX.1 VAE, 512 Qwen tokens, single frame."""
        return self.family == "image_lite"

    @property
    def is_i2v(self) -> bool:
        return "-i2v-" in self.name

    @property
    def is_i2i(self) -> bool:
        return self.instruct_type is not None

    @property
    def visual_cond(self) -> bool:
        """33 input channels (noisy 16 + condition 16 + mask 1): every video model and the I2I model."""
        return not self.is_image or self.instruct_type == "channel"

    @property
    def in_visual_channels(self) -> int:
        return 2 * LATENT_CHANNELS + 1 if self.visual_cond else LATENT_CHANNELS

    @property
    def vae(self) -> VaeKind:
        return "flux1" if self.is_image else "hunyuan_video"

    @property
    def qwen_max_length(self) -> int:
        return 512 if self.is_image else 256

    @property
    def clip_max_length(self) -> int:
        return CLIP_MAX_LENGTH

    @property
    def checkpoint_file(self) -> str:
        return f"{self.checkpoint}.safetensors"

    @property
    def uses_nabla(self) -> bool:
        return self.attention == "nabla"


_SD = (1.0, 2.0, 2.0)
_HD = (1.0, 3.16, 3.16)


def _video(name, family, attention, res, steps, guidance, shift, ckpt, p=None) -> TaskConfig:
    return TaskConfig(
        name=name,
        family=family,
        attention=attention,
        resolution=res,
        rope_scale=_SD if res == 512 else _HD,
        steps=steps,
        guidance=guidance,
        scheduler_scale=shift,
        checkpoint=ckpt,
        nabla_p=p,
    )


_TASKS: tuple[TaskConfig, ...] = (
    TaskConfig("k5-lite-t2i-hd", "image_lite", "dense", 1024, (1.0, 1.0, 1.0), 50, 3.5, 3.0, "kandinsky5lite_t2i"),
    TaskConfig(
        "k5-lite-i2i-hd", "image_lite", "dense", 1024, (1.0, 1.0, 1.0), 50, 3.5, 3.0, "kandinsky5lite_i2i", instruct_type="channel"
    ),
    _video("k5-lite-t2v-5s-sd", "video_lite", "dense", 512, 50, 5.0, 10.0, "kandinsky5lite_t2v_sft_5s"),
    _video("k5-lite-t2v-10s-sd", "video_lite", "nabla", 512, 50, 5.0, 10.0, "kandinsky5lite_t2v_sft_10s", 0.9),
    _video("k5-lite-i2v-5s-sd", "video_lite", "dense", 512, 50, 5.0, 10.0, "kandinsky5lite_i2v_5s"),
    _video("k5-pro-t2v-5s-sd", "video_pro", "dense", 512, 50, 5.0, 10.0, "kandinsky5pro_t2v_sft_5s"),
    _video("k5-pro-t2v-5s-hd", "video_pro", "nabla", 1024, 50, 5.0, 10.0, "kandinsky5pro_t2v_sft_5s", 0.8),
    _video("k5-pro-t2v-10s-sd", "video_pro", "nabla", 512, 50, 5.0, 10.0, "kandinsky5pro_t2v_sft_10s", 0.9),
    _video("k5-pro-t2v-10s-hd", "video_pro", "nabla", 1024, 50, 5.0, 10.0, "kandinsky5pro_t2v_sft_10s", 0.7),
    _video("k5-pro-i2v-5s-sd", "video_pro", "dense", 512, 50, 5.0, 10.0, "kandinsky5pro_i2v_sft_5s"),
    _video("k5-pro-i2v-5s-hd", "video_pro", "nabla", 1024, 50, 5.0, 5.0, "kandinsky5pro_i2v_sft_5s", 0.8),
    _video("k5-lite-t2v-5s-distil-sd", "video_lite", "dense", 512, 16, 1.0, 5.0, "kandinsky5lite_t2v_distilled16steps_5s"),
    _video("k5-lite-t2v-10s-distil-sd", "video_lite", "nabla", 512, 16, 1.0, 10.0, "kandinsky5lite_t2v_distilled16steps_10s", 0.9),
    _video("k5-lite-t2v-5s-nocfg-sd", "video_lite", "dense", 512, 50, 1.0, 10.0, "kandinsky5lite_t2v_nocfg_5s"),
    # Upstream slip kept on purpose (specs/kandinsky5.md §2): the default file is the sft 10 s checkpoint; pass the
    # real nocfg 10 s weights with --dit.
    _video("k5-lite-t2v-10s-nocfg-sd", "video_lite", "nabla", 512, 50, 1.0, 10.0, "kandinsky5lite_t2v_sft_10s", 0.9),
    _video("k5-lite-t2v-5s-pretrain-sd", "video_lite", "dense", 512, 50, 5.0, 10.0, "kandinsky5lite_t2v_pretrain_5s"),
    _video("k5-lite-t2v-10s-pretrain-sd", "video_lite", "nabla", 512, 50, 5.0, 10.0, "kandinsky5lite_t2v_pretrain_10s", 0.9),
)

TASK_CONFIGS: dict[str, TaskConfig] = {t.name: t for t in _TASKS}


def task_names() -> list[str]:
    """All valid task keys, in table order."""
    return list(TASK_CONFIGS)


def get_task_config(name: str) -> TaskConfig:
    """Look up a task key; an unknown key is a ``UserError`` listing the valid ones."""
    try:
        return TASK_CONFIGS[name]
    except KeyError:
        raise UserError(f"unknown Kandinsky 5 task '{name}' (--task); valid tasks: {', '.join(TASK_CONFIGS)}") from None


def dit_params_for(task: TaskConfig | str) -> dict:
    """DiT constructor arguments for a task, named like the official / diffusers config fields."""
    if isinstance(task, str):
        task = get_task_config(task)
    fam = task.dims
    nabla = task.uses_nabla
    return {
        "in_visual_dim": LATENT_CHANNELS,
        "out_visual_dim": LATENT_CHANNELS,
        "in_text_dim": QWEN_HIDDEN_SIZE,
        "in_text_dim2": CLIP_POOLED_SIZE,
        "time_dim": fam.time_dim,
        "patch_size": PATCH_SIZE,
        "model_dim": fam.model_dim,
        "ff_dim": fam.ff_dim,
        "num_text_blocks": fam.num_text_blocks,
        "num_visual_blocks": fam.num_visual_blocks,
        "axes_dims": fam.axes_dims,
        "visual_cond": task.visual_cond,
        "attention_type": "nabla" if nabla else "regular",
        "attention_P": task.nabla_p if nabla else None,
        "attention_wT": task.nabla_wT if nabla else None,
        "attention_wH": task.nabla_wH if nabla else None,
        "attention_wW": task.nabla_wW if nabla else None,
        "attention_add_sta": task.nabla_add_sta if nabla else None,
        "attention_method": task.nabla_method if nabla else None,
    }
