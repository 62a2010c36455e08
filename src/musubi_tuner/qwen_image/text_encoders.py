"""Qwen2.5-VL prompt encoder of Qwen-Image (specs/qwen_image.md §5).

The prompt goes into the release's chat template; the hidden states of the system prefix are dropped (34 tokens for
T2I / Layered, 64 for Edit with the real tokenizer — computed here as the token count of the prefix, so tiny demo
tokenizers crop exactly their prefix). Edit puts ``<|vision_start|><|image_pad|><|vision_end|>`` before the prompt,
Edit-Plus (2509 / 2511) ``Picture i: <vision tokens>`` per image; each ``<|image_pad|>`` expands to the image's merged
patch count, as the VL processor does. The image preprocessor (``preprocessor_config.json``) comes from a local path:
``--vl_processor``, else the text-encoder directory, its pipeline's ``processor/`` folder — never the Hub.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from musubi_tuner.qwen_image.configs import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    EDIT_DROP_TOKENS,
    EDIT_PLUS_VL_AREA,
    EDIT_VL_AREA,
    MAX_SEQUENCE_LENGTH,
    MODEL_VERSIONS,
    T2I_DROP_TOKENS,
    ModelVersion,
)
from musubi_tuner.qwen_image.vl_loading import load_qwen25vl, resolve_vl_source
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.hf_sources import find_processor_dir
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects "
    "and background:"
)
EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain how the "
    "user's text instruction should alter or modify the image. Generate a new image that meets the user's requirements while "
    "maintaining consistency with the original input where appropriate."
)
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
_REAL_VOCAB_MIN = 151643
_CAPTION_VERSION = MODEL_VERSIONS["edit-2509"]  # the VL image size used for captions (about 384² pixels)
CAPTION_INSTRUCTIONS = {
    "en": "Describe this image in one detailed paragraph: the objects, their colours, positions and the background.",
    "cn": "请用一段详细的中文描述这张图片：其中的物体、颜色、位置以及背景。",
}


def template_prefix(version: ModelVersion) -> str:
    """The template text before the user content (its hidden states are dropped)."""
    system = EDIT_SYSTEM if version.is_edit else T2I_SYSTEM
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"


def format_prompt(prompt: str, version: ModelVersion, num_images: int = 0) -> str:
    """The full Qwen2.5-VL input for one prompt (vision placeholders for edit models)."""
    if version.multi_image:
        user = "".join(f"Picture {i + 1}: {VISION_TOKENS}" for i in range(num_images)) + prompt
    elif version.is_edit:
        user = VISION_TOKENS * num_images + prompt
    else:
        user = prompt
    return f"{template_prefix(version)}{user}<|im_end|>\n<|im_start|>assistant\n"


def vl_image_size(width: int, height: int, version: ModelVersion) -> tuple[int, int]:
    """Size the VL model sees a control image at: about 1024² (Edit) or 384² (Edit-Plus) area, multiples of 32."""
    area = EDIT_PLUS_VL_AREA if version.multi_image else EDIT_VL_AREA
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(32, round(w / 32) * 32), max(32, round(h / 32) * 32)


class QwenVLEncoder:
    """Qwen2.5-VL (transformers) + tokenizer + image preprocessor, loaded offline from local directories."""

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        fp8_vl: bool = False,
        vl_processor: str | os.PathLike | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        src = resolve_vl_source(name_or_path, vl_processor)
        self.source = src
        self.device = torch.device(device)
        self.vl_processor_path = vl_processor
        logger.info("loading Qwen2.5-VL from %s%s", src.weights, " (fp8)" if fp8_vl else "")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(src.tokenizer), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{src.tokenizer}: cannot load the Qwen2.5-VL tokenizer: {e}") from None
        self.model = load_qwen25vl(src, dtype=dtype, device=self.device, fp8=fp8_vl)
        self._processor: Any = None
        self._drop: dict[bool, int] = {}

    def drop_tokens(self, version: ModelVersion) -> int:
        """Tokens of the template prefix for this tokenizer (the release's 34 / 64 with the real one)."""
        if version.is_edit not in self._drop:
            n = len(self.tokenizer(template_prefix(version), add_special_tokens=False)["input_ids"])
            official = EDIT_DROP_TOKENS if version.is_edit else T2I_DROP_TOKENS
            if len(self.tokenizer) >= _REAL_VOCAB_MIN and n != official:
                logger.warning("Qwen-Image template prefix has %d tokens, the release drops %d", n, official)
            self._drop[version.is_edit] = n
        return self._drop[version.is_edit]

    def image_processor(self) -> Any:
        """The Qwen2-VL image preprocessor from a local directory (``--vl_processor`` or next to the encoder)."""
        if self._processor is None:
            from transformers import AutoImageProcessor

            found = find_processor_dir(list(self.source.processor_dirs))
            if found is None:
                where = ", ".join(str(d) for d in self.source.processor_dirs)
                raise UserError(
                    f"no preprocessor_config.json for the Qwen2.5-VL processor in {where} (edit models and layered captioning "
                    "need it); pass the processor directory (e.g. Qwen-Image-Edit's processor/ folder) with --vl_processor"
                )
            try:
                self._processor = AutoImageProcessor.from_pretrained(str(found), local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"{found}: cannot load the Qwen2.5-VL image processor: {e}") from None
        return self._processor

    def _inputs(self, texts: list[str], images: list[list[Any]] | None, version: ModelVersion) -> dict[str, torch.Tensor]:
        drop = self.drop_tokens(version)
        if not images or not any(images):
            return self.tokenizer(
                texts,
                max_length=MAX_SEQUENCE_LENGTH + drop,
                truncation=True,
                padding=True,
                padding_side="right",
                return_tensors="pt",
                add_special_tokens=False,
            )
        proc = self.image_processor()
        flat = []
        for imgs in images:
            for img in imgs:
                w, h = vl_image_size(*img.size, version)
                flat.append(img.convert("RGB").resize((w, h), resample=3))
        pix = proc(images=flat, return_tensors="pt")
        merge = int(getattr(proc, "merge_size", 2)) ** 2
        counts = iter(int(g.prod()) // merge for g in pix["image_grid_thw"])
        expanded = []
        for text, imgs in zip(texts, images):
            parts = text.split(IMAGE_PAD)
            if len(parts) - 1 != len(imgs):
                raise ValueError(f"{len(imgs)} images but {len(parts) - 1} image placeholders")
            out = parts[0]
            for part in parts[1:]:
                out += IMAGE_PAD * next(counts) + part
            expanded.append(out)
        tok = self.tokenizer(expanded, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
        return {**tok, "pixel_values": pix["pixel_values"].to(self.model.dtype), "image_grid_thw": pix["image_grid_thw"]}

    @torch.no_grad()
    def encode(
        self,
        prompts: list[str],
        version: ModelVersion,
        images: list[list[Any]] | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> list[torch.Tensor]:
        """Per prompt the kept hidden states ``(L_i, D)`` (prefix dropped, at most ``max_sequence_length``), on CPU.

        ``images``: per prompt a list of PIL control images (edit models); they are shown to the VL model.
        """
        if version.is_edit and (images is None or any(len(i) == 0 for i in images)):
            raise UserError(f"--model_version {version.name} needs at least one control image per prompt")
        if not version.multi_image and images and any(len(i) > 1 for i in images):
            raise UserError(f"--model_version {version.name} takes one control image; edit-2509 / edit-2511 take several")
        if max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise UserError(f"max sequence length {max_sequence_length} exceeds the model's {MAX_SEQUENCE_LENGTH}")
        texts = [format_prompt(p, version, len(images[i]) if images else 0) for i, p in enumerate(prompts)]
        inputs = self._inputs(texts, images if version.is_edit else None, version)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=True, return_dict=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        drop = self.drop_tokens(version)
        out = []
        for i in range(hidden.shape[0]):
            valid = hidden[i][inputs["attention_mask"][i].bool()]
            out.append(valid[drop : drop + max_sequence_length].float().cpu().contiguous())
        return out

    @torch.no_grad()
    def caption(self, image: Any, lang: str, max_new_tokens: int = 256) -> str:
        """A caption of ``image`` written by Qwen2.5-VL (Layered ``--automatic_prompt_lang_for_layered en|cn``)."""
        if not getattr(self.model, "has_lm_head", True):
            raise UserError(
                f"{self.source.weights}: this Qwen2.5-VL file has no lm_head.weight, so it cannot write captions "
                "(--automatic_prompt_lang_for_layered); pass a prompt or the full model"
            )
        instruction = CAPTION_INSTRUCTIONS[lang]
        text = f"<|im_start|>user\n{VISION_TOKENS}{instruction}<|im_end|>\n<|im_start|>assistant\n"
        inputs = self._inputs([text], [[image]], _CAPTION_VERSION)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip() or "an image"

    def to(self, device: torch.device | str) -> QwenVLEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self
