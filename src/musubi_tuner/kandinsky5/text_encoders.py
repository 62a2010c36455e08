"""Kandinsky 5 text encoders: Qwen2.5-VL (token sequence) and CLIP-L (pooled vector), specs/kandinsky5.md §7.

Qwen sees the prompt inside a fixed chat template; the hidden states of the template prefix are cropped off, so the
kept sequence is the prompt tokens plus ``<|im_end|>``. The crop length is the token count of the template prefix
for the loaded tokenizer (for the real Qwen2.5 tokenizer that is the official 129 / 41 / 132 / 55). Outputs are
per item at their valid length (variable length, no padding), or padded with a boolean key mask for batched
generation (diffusers attends pad tokens, defect #11; we never do).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Literal

import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.hf_sources import resolve_model_source
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

TemplateMode = Literal["video", "image", "image2video", "image_edit"]

# The official templates, parts joined by one newline each. The typos ("promt", "scren") are in the source and are
# kept: the model was trained on these exact strings.
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "video": (
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
        "Describe the location of the video, main characters or objects and their action.",
        "Describe the dynamism of the video and presented actions.",
        "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of "
        "animation, video game or scren content.",
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ),
    "image2video": (
        "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and effective video "
        "description based on a provided input image.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
        "Describe main characters actions.",
        "Describe the dynamism of the video and presented actions.",
        "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of "
        "animation, video game or scren content.",
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ),
    "image": (
        "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, size, texture, "
        "quantity, text, spatial relationships of the objects and background:<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ),
    "image_edit": (
        "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) and target image "
        "(second image), create an interesting text prompt that can be used together with the source image to create the "
        "target image:<|im_end|>",
        "<|im_start|>user\n{}",
    ),
}

# crop_start of the official code for the real Qwen2.5-VL tokenizer (documentation and a consistency check only).
OFFICIAL_CROP_START: dict[str, int] = {"video": 129, "image": 41, "image_edit": 55, "image2video": 132}

VIDEO_QWEN_MAX_LENGTH = 256
IMAGE_QWEN_MAX_LENGTH = 512
CLIP_MAX_LENGTH = 77
# The real Qwen2.5 vocabulary starts its special tokens at this id; smaller vocabularies are demo tokenizers.
_QWEN_REAL_VOCAB_MIN = 151643


def template_text(mode: str) -> str:
    """The full template of ``mode`` with ``{}`` where the prompt goes."""
    if mode not in PROMPT_TEMPLATES:
        raise UserError(f"unknown Kandinsky 5 prompt template '{mode}'; valid: {', '.join(PROMPT_TEMPLATES)}")
    return "\n".join(PROMPT_TEMPLATES[mode])


def format_prompt(prompt: str, mode: str) -> str:
    """The Qwen input text for one prompt (no prompt cleaning, specs/kandinsky5.md §7.1)."""
    return template_text(mode).replace("{}", prompt, 1)


def template_prefix(mode: str) -> str:
    """The template text before the prompt (its hidden states are cropped off)."""
    return template_text(mode).split("{}", 1)[0]


def template_crop_start(tokenizer: Any, mode: str) -> int:
    """Number of tokens of the template prefix for ``tokenizer`` (= official crop_start for the real tokenizer)."""
    n = len(tokenizer(template_prefix(mode), add_special_tokens=False)["input_ids"])
    official = OFFICIAL_CROP_START[mode]
    if len(tokenizer) >= _QWEN_REAL_VOCAB_MIN and n != official:
        logger.warning("Qwen template '%s': prefix has %d tokens, the official crop_start is %d", mode, n, official)
    return n


def template_mode_for(is_video: bool, *, image_edit: bool = False) -> str:
    """Template choice of specs/kandinsky5.md §8 / defect #5: edit → image_edit, video → video, image → image."""
    if image_edit:
        return "image_edit"
    return "video" if is_video else "image"


def qwen_max_length_for(mode: str) -> int:
    """Default Qwen token budget after the template: 256 for video templates, 512 for image templates."""
    return VIDEO_QWEN_MAX_LENGTH if mode in ("video", "image2video") else IMAGE_QWEN_MAX_LENGTH


def _nf4_config() -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--quantized_qwen needs bitsandbytes; install the optional extra: pip install 'blissful-tuner[quant]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4"
    )


def _placement(device: torch.device, text_encoder_cpu: bool, text_encoder_auto: bool, quantized_qwen: bool) -> torch.device:
    chosen = [
        n
        for n, v in (
            ("--text_encoder_cpu", text_encoder_cpu),
            ("--text_encoder_auto", text_encoder_auto),
            ("--quantized_qwen", quantized_qwen),
        )
        if v
    ]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are mutually exclusive; pick one")
    if quantized_qwen and device.type != "cuda":
        raise UserError(f"--quantized_qwen (bitsandbytes NF4) needs a CUDA device, got --device {device}")
    return torch.device("cpu") if text_encoder_cpu else device


class QwenTextEncoder:
    """Qwen2.5-VL hidden states of the templated prompt, template prefix cropped (specs/kandinsky5.md §7.1)."""

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        quantized: bool = False,
        device_map_auto: bool = False,
    ) -> None:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        src = resolve_model_source(
            name_or_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--text_encoder_qwen"
        )
        self.source = src
        self.device = torch.device(device)
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": src.local_files_only}
        if quantized:
            kwargs["quantization_config"] = _nf4_config()
            kwargs["device_map"] = {"": self.device}
        elif device_map_auto:
            kwargs["device_map"] = "auto"
        logger.info("loading Qwen2.5-VL from %s", src.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src.tokenizer, local_files_only=src.local_files_only)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src.model, **kwargs)
        except OSError as e:
            raise UserError(f"{name_or_path}: cannot load Qwen2.5-VL (--text_encoder_qwen): {e}") from None
        if not quantized and not device_map_auto:
            model = model.to(self.device)
        self.model = model.eval().requires_grad_(False)
        self._processor: Any = None
        self._crop: dict[str, int] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def crop_start(self, mode: str) -> int:
        """Token count of ``mode``'s template prefix (cached)."""
        if mode not in self._crop:
            self._crop[mode] = template_crop_start(self.tokenizer, mode)
        return self._crop[mode]

    def _image_processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoImageProcessor

            try:
                self._processor = AutoImageProcessor.from_pretrained(
                    self.source.tokenizer, local_files_only=self.source.local_files_only
                )
            except (OSError, ValueError) as e:
                raise UserError(
                    f"{self.source.tokenizer}: cannot load the Qwen2.5-VL image processor (preprocessor_config.json): {e}"
                ) from None
        return self._processor

    def _image_inputs(self, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        """Tokens + pixels for image_edit: each ``<|image_pad|>`` expands to the image's merged patch count, as the
        Qwen2.5-VL processor does (done here so that no video processor / torchvision is needed)."""
        proc = self._image_processor()
        flat = [_to_pil(_half_size(img)) for imgs in images for img in imgs]
        pix = proc(images=flat, return_tensors="pt")
        merge = int(getattr(proc, "merge_size", 2)) ** 2
        counts = iter([int(g.prod()) // merge for g in pix["image_grid_thw"]])
        expanded = []
        for text, imgs in zip(texts, images):
            vision = "".join(f"<|vision_start|>{'<|image_pad|>' * next(counts)}<|vision_end|>" for _ in imgs)
            expanded.append(text + vision + "<|im_end|>")
        tok = self.tokenizer(expanded, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
        return {**tok, "pixel_values": pix["pixel_values"].to(self.model.dtype), "image_grid_thw": pix["image_grid_thw"]}

    @torch.no_grad()
    def encode(
        self, prompts: list[str], mode: str, max_length: int | None = None, images: list[list[Any]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``prompts`` with the ``mode`` template.

        Returns ``(embeds (B, L, D), mask (B, L) bool)`` after the crop; ``L`` is the longest valid length in the
        batch (right padding). Without images the token budget after the template is ``max_length`` (default from
        the mode: 256 video / 512 image); longer prompts are truncated. ``images`` (image_edit only): per prompt a
        list of PIL images or ``(C, H, W)`` tensors, shown to Qwen at half resolution; no token budget then.
        """
        crop = self.crop_start(mode)
        texts = [format_prompt(p, mode) for p in prompts]
        if images is not None:
            if mode != "image_edit":
                raise ValueError("images are only shown to Qwen with the image_edit template")
            if len(images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
            inputs = self._image_inputs(texts, images)
        else:
            budget = max_length if max_length is not None else qwen_max_length_for(mode)
            inputs = self.tokenizer(
                texts,
                max_length=budget + crop,
                truncation=True,
                padding=True,
                padding_side="right",
                return_tensors="pt",
                add_special_tokens=False,
            )
        inputs = {k: v.to(self.input_device) for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-1][:, crop:]
        mask = inputs["attention_mask"][:, crop:].bool()
        longest = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
        return hidden[:, :longest], mask[:, :longest]


def _half_size(img: Any) -> Any:
    """Half height and width (the official image_edit input); PIL image or uint8 ``(C, H, W)`` tensor."""
    if isinstance(img, torch.Tensor):
        if img.dim() != 3 or img.dtype != torch.uint8:
            raise ValueError(f"image tensors must be uint8 (C, H, W), got {img.dtype} {tuple(img.shape)}")
        h, w = img.shape[-2:]
        out = torch.nn.functional.interpolate(
            img[None].float(), size=(max(1, h // 2), max(1, w // 2)), mode="bilinear", antialias=True
        )
        return out[0].round().clamp(0, 255).to(torch.uint8)
    w, h = img.size
    return img.convert("RGB").resize((max(1, w // 2), max(1, h // 2)), resample=2)


def _to_pil(img: Any) -> Any:
    if isinstance(img, torch.Tensor):
        from PIL import Image

        return Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
    return img


class ClipTextEncoder:
    """CLIP-L text ``pooler_output`` (no text projection), 77 tokens padded (specs/kandinsky5.md §7.2)."""

    def __init__(
        self, name_or_path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> None:
        from transformers import AutoTokenizer, CLIPTextModel

        src = resolve_model_source(
            name_or_path, subfolder="text_encoder_2", tokenizer_subfolder="tokenizer_2", flag="--text_encoder_clip"
        )
        self.source = src
        self.device = torch.device(device)
        logger.info("loading CLIP text model from %s", src.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src.tokenizer, local_files_only=src.local_files_only)
            model = CLIPTextModel.from_pretrained(src.model, dtype=dtype, local_files_only=src.local_files_only)
        except OSError as e:
            raise UserError(f"{name_or_path}: cannot load the CLIP text model (--text_encoder_clip): {e}") from None
        self.model = model.to(self.device).eval().requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_length: int = CLIP_MAX_LENGTH) -> torch.Tensor:
        """Pooled vectors ``(B, D2)`` of the raw prompts (no template)."""
        inputs = self.tokenizer(
            prompts, max_length=max_length, truncation=True, padding="max_length", add_special_tokens=True, return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.model(**inputs).pooler_output


class Kandinsky5TextEncoder:
    """Both Kandinsky 5 text encoders with the placement options of specs/kandinsky5.md §7.1.

    ``text_encoder_cpu`` keeps Qwen on the CPU (CLIP stays on ``device``), ``text_encoder_auto`` spreads Qwen with
    ``device_map="auto"``, ``quantized_qwen`` loads Qwen as bitsandbytes NF4 (CUDA, the ``quant`` extra). The three
    are mutually exclusive.
    """

    def __init__(
        self,
        qwen: str | os.PathLike,
        clip: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_encoder_cpu: bool = False,
        text_encoder_auto: bool = False,
        quantized_qwen: bool = False,
        qwen_max_length: int | None = None,
        clip_max_length: int = CLIP_MAX_LENGTH,
    ) -> None:
        device = torch.device(device)
        qwen_device = _placement(device, text_encoder_cpu, text_encoder_auto, quantized_qwen)
        self.qwen = QwenTextEncoder(
            qwen, device=qwen_device, dtype=dtype, quantized=quantized_qwen, device_map_auto=text_encoder_auto
        )
        self.clip = ClipTextEncoder(clip, device=device, dtype=dtype)
        self.dtype = dtype
        self.qwen_max_length = qwen_max_length
        self.clip_max_length = clip_max_length

    @classmethod
    def from_args(
        cls,
        args: Any,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16,
        qwen_max_length: int | None = None,
        clip_max_length: int = CLIP_MAX_LENGTH,
    ) -> Kandinsky5TextEncoder:
        """Build from the shared command-line options (``--text_encoder_qwen``, ``--text_encoder_clip``,
        ``--text_encoder_cpu``, ``--text_encoder_auto``, ``--quantized_qwen``) of the caching, training and generate scripts."""
        return cls(
            args.text_encoder_qwen,
            args.text_encoder_clip,
            device=device,
            dtype=dtype,
            text_encoder_cpu=args.text_encoder_cpu,
            text_encoder_auto=args.text_encoder_auto,
            quantized_qwen=args.quantized_qwen,
            qwen_max_length=qwen_max_length,
            clip_max_length=clip_max_length,
        )

    def max_length_for(self, mode: str) -> int:
        """Qwen token budget used for ``mode`` (explicit value, else 256 video / 512 image)."""
        return self.qwen_max_length if self.qwen_max_length is not None else qwen_max_length_for(mode)

    def cache_metadata(self, mode: str) -> dict[str, str]:
        """What the TE cache records so that a cache built with another template / budget is rebuilt (defect #5)."""
        return {
            "k5_template": mode,
            "k5_qwen_max_length": str(self.max_length_for(mode)),
            "k5_crop_start": str(self.qwen.crop_start(mode)),
            "k5_clip_max_length": str(self.clip_max_length),
        }

    def encode_batch(
        self, prompts: list[str], mode: str = "video", images: list[list[Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Padded batch for generation: ``text_embeds (B, L, D)``, ``attention_mask (B, L)`` bool, ``pooled_embed (B, D2)``.

        Outputs are in ``self.dtype`` on the text encoders' devices (Qwen's, CLIP's).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        embeds, mask = self.qwen.encode(prompts, mode, max_length=self.max_length_for(mode), images=images)
        pooled = self.clip.encode(prompts, max_length=self.clip_max_length)
        embeds = embeds.to(self.dtype) * mask.unsqueeze(-1).to(self.dtype)  # zero the pad rows: never read, but tidy
        return {"text_embeds": embeds, "attention_mask": mask, "pooled_embed": pooled.to(self.dtype)}

    def encode(
        self, prompts: list[str], mode: str = "video", images: list[list[Any]] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt ``{"text_embeds": (L_i, D), "pooled_embed": (D2,)}`` at the valid length (no padding), on CPU."""
        batch = self.encode_batch(prompts, mode, images)
        out = []
        for i in range(len(batch["text_embeds"])):
            n = int(batch["attention_mask"][i].sum())
            out.append(
                {
                    "text_embeds": batch["text_embeds"][i, :n].cpu().contiguous(),
                    "pooled_embed": batch["pooled_embed"][i].cpu().contiguous(),
                }
            )
        return out

    def to(self, device: torch.device | str) -> Kandinsky5TextEncoder:
        """Move both models (not for NF4 / ``device_map="auto"`` Qwen)."""
        device = torch.device(device)
        if getattr(self.qwen.model, "hf_device_map", None) is None:
            self.qwen.model.to(device)
        self.clip.model.to(device)
        self.clip.device = device
        return self
