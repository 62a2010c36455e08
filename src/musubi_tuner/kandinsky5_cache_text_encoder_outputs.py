"""Cache Kandinsky 5 text-encoder outputs for training (specs/kandinsky5.md §7, §10, §12.2).

    python kandinsky5_cache_text_encoder_outputs.py --dataset_config dataset.toml \
        --text_encoder_qwen Qwen/Qwen2.5-VL-7B-Instruct --text_encoder_clip openai/clip-vit-large-patch14

Writes one ``<stem>_k5_te.safetensors`` per source item with ``varlen_text_embeds_{dtype}`` ``(L, 3584)`` (valid
length, template cropped), ``varlen_pooled_embed_{dtype}`` ``(768,)`` and ``varlen_attention_mask`` ``(L,)``. The
Qwen template follows the dataset (video → ``video``, image → ``image``, ``--image_edit_training`` → ``image_edit``
with the control image); template, token budget and crop are recorded in the metadata, and ``--skip_existing``
re-encodes a cache written with other values.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import torch

from musubi_tuner.dataset.architectures import arch_info
from musubi_tuner.dataset.config import DatasetParams, resolve_datasets
from musubi_tuner.dataset.text_caching import TextItem, add_text_cache_args, cache_text_encoder_outputs
from musubi_tuner.kandinsky5.caching import (
    encode_text_items,
    qwen_max_length_for_run,
    resolve_device,
    te_cache_metadata,
    template_mode_for_dataset,
)
from musubi_tuner.kandinsky5.configs import TaskConfig, get_task_config
from musubi_tuner.kandinsky5.text_encoders import (
    CLIP_MAX_LENGTH,
    Kandinsky5TextEncoder,
    resolve_model_source,
    template_crop_start,
)
from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

ARCH = "k5"
TEXT_ENCODER_DTYPE = torch.bfloat16  # Qwen2.5-VL and CLIP run in bf16 (spec §7); caches hold bf16 embeddings


def setup_parser() -> argparse.ArgumentParser:
    """The ``kandinsky5_cache_text_encoder_outputs.py`` command line."""
    p = argparse.ArgumentParser(description="Cache Kandinsky 5 text-encoder outputs (Qwen2.5-VL + CLIP) of a dataset")
    add_text_cache_args(p)
    k = p.add_argument_group("Kandinsky 5")
    k.add_argument("--text_encoder_qwen", type=str, required=True, help="Qwen2.5-VL-7B-Instruct: HF id or local directory")
    k.add_argument("--text_encoder_clip", type=str, required=True, help="CLIP ViT-L/14: HF id or local directory")
    k.add_argument(
        "--task",
        type=str,
        default=None,
        help="task key (optional): token budget from the task (256 video / 512 image tasks); k5-lite-i2i-hd implies "
        "--image_edit_training",
    )
    k.add_argument(
        "--qwen_max_length",
        type=int,
        default=None,
        help="Qwen tokens after the template (default: the task's, else 256 for video / 512 for image templates)",
    )
    k.add_argument("--clip_max_length", type=int, default=CLIP_MAX_LENGTH, help="CLIP tokens (default 77)")
    k.add_argument("--quantized_qwen", action="store_true", help="load Qwen2.5-VL in NF4 4-bit (CUDA, needs bitsandbytes)")
    k.add_argument("--text_encoder_cpu", action="store_true", help="run Qwen2.5-VL on the CPU (CLIP stays on --device)")
    k.add_argument("--text_encoder_auto", action="store_true", help="place Qwen2.5-VL with device_map='auto'")
    k.add_argument(
        "--image_edit_training",
        action="store_true",
        help="Image Lite I2I: image_edit template, the item's control image is shown to Qwen",
    )
    return p


def validate_args(args: argparse.Namespace) -> TaskConfig | None:
    """Check option combinations before any model is loaded; returns the task (or None)."""
    task = get_task_config(args.task) if args.task is not None else None
    if task is not None and task.is_i2i and not args.image_edit_training:
        logger.info(f"--task {task.name} is the I2I task: using the image_edit template (--image_edit_training)")
        args.image_edit_training = True
    if args.image_edit_training and task is not None and not task.is_i2i:
        raise UserError(f"--image_edit_training is for the Image Lite I2I task (k5-lite-i2i-hd), not --task {task.name}")
    chosen = [f"--{n}" for n in ("text_encoder_cpu", "text_encoder_auto", "quantized_qwen") if getattr(args, n)]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are mutually exclusive; pick one text-encoder placement")
    if args.qwen_max_length is not None and args.qwen_max_length < 1:
        raise UserError(f"--qwen_max_length must be >= 1 (got {args.qwen_max_length})")
    if args.clip_max_length < 1:
        raise UserError(f"--clip_max_length must be >= 1 (got {args.clip_max_length})")
    device = resolve_device(args.device)
    if args.quantized_qwen:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                "--quantized_qwen needs bitsandbytes; install the optional extra (pip install 'blissful-tuner[quant]') or drop the option"
            )
        if device.type != "cuda":
            raise UserError(f"--quantized_qwen (bitsandbytes NF4) needs a CUDA device, got --device {device}")
    return task


class TextEncoderRun:
    """Templates, budgets and the lazily loaded encoders of one caching run.

    The encoders are loaded on the first caption to encode (a run where every cache is current loads nothing but
    the tokenizer, which the template crop needs for the metadata).
    """

    def __init__(self, args: argparse.Namespace, task: TaskConfig | None):
        self.args = args
        self.task = task
        self.device = resolve_device(args.device)
        self.encoder: Kandinsky5TextEncoder | None = None
        self._tokenizer: Any = None
        self._crop: dict[str, int] = {}

    def mode(self, params: DatasetParams) -> str:
        mode = template_mode_for_dataset(params, image_edit=self.args.image_edit_training)
        if self.task is not None and self.task.is_image and mode == "video":
            raise UserError(
                f"{params.table} of {params.config_path}: multi-frame video clips cannot train the Image Lite task "
                f"{self.task.name}; use an image dataset (or target_frames = [1])"
            )
        return mode

    def max_length(self, mode: str) -> int:
        return qwen_max_length_for_run(mode, task=self.task, override=self.args.qwen_max_length)

    def crop_start(self, mode: str) -> int:
        if mode not in self._crop:
            if self.encoder is not None:
                self._crop[mode] = self.encoder.qwen.crop_start(mode)
            else:
                if self._tokenizer is None:
                    self._tokenizer = _load_qwen_tokenizer(self.args.text_encoder_qwen)
                self._crop[mode] = template_crop_start(self._tokenizer, mode)
        return self._crop[mode]

    def metadata(self, params: DatasetParams) -> dict[str, str]:
        """``extra_metadata`` of a dataset: template, Qwen budget, crop, CLIP length (defect #5)."""
        mode = self.mode(params)
        md = te_cache_metadata(mode, self.max_length(mode), self.crop_start(mode), self.args.clip_max_length)
        logger.info(f"{params.table}: template '{mode}', Qwen max length {md['k5_qwen_max_length']}, crop {md['k5_crop_start']}")
        return md

    def load(self) -> Kandinsky5TextEncoder:
        if self.encoder is None:
            a = self.args
            explicit = a.qwen_max_length if a.qwen_max_length is not None else (self.task.qwen_max_length if self.task else None)
            self.encoder = Kandinsky5TextEncoder.from_args(
                a, device=self.device, dtype=TEXT_ENCODER_DTYPE, qwen_max_length=explicit, clip_max_length=a.clip_max_length
            )
        return self.encoder

    def __call__(self, items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
        mode = self.mode(items[0].dataset)
        encoder = self.load()
        if encoder.cache_metadata(mode) != te_cache_metadata(
            mode, self.max_length(mode), self.crop_start(mode), self.args.clip_max_length
        ):
            raise RuntimeError(f"K5 TE cache metadata disagrees with the encoder for template {mode!r}")
        return encode_text_items(encoder, items, mode)


def _load_qwen_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    src = resolve_model_source(name_or_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--text_encoder_qwen")
    try:
        return AutoTokenizer.from_pretrained(src.tokenizer, local_files_only=src.local_files_only)
    except (OSError, ValueError) as e:
        raise UserError(f"{name_or_path}: cannot load the Qwen2.5-VL tokenizer (--text_encoder_qwen): {e}") from None


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``kandinsky5_cache_text_encoder_outputs.py``."""
    args = setup_parser().parse_args(argv)
    task = validate_args(args)
    run = TextEncoderRun(args, task)
    # templates are checked (e.g. Image Lite with video clips) before any model is loaded
    for params in resolve_datasets(args.dataset_config, architecture=arch_info(ARCH), args=args):
        run.mode(params)
    cache_text_encoder_outputs(args, architecture=ARCH, encode=run, extra_metadata=run.metadata)


if __name__ == "__main__":
    main()
