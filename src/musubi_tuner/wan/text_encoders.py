"""Wan text and image encoders (specs/wan.md §6): UMT5-XXL encoder and the CLIP ViT-H/14 vision tower (2.1 I2V).

Both come from transformers. ``--t5`` takes an HF directory (``UMT5EncoderModel`` / ``T5EncoderModel`` config +
weights + tokenizer) or the official ``models_t5_umt5-xxl-enc-bf16.pth`` (``torch.load(weights_only=True)``; keys
converted by ``UMT5_OFFICIAL_TO_HF``, dims read from the shapes) with the tokenizer from ``--t5_tokenizer`` or the
official ckpt layout ``<dir of the file>/google/umt5-xxl``. ``--clip`` takes an HF ``CLIPVisionModel`` directory or the
official open-clip ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (its ``visual.*`` tower converted).

Prompts: ftfy-style cleaning (HTML unescape, whitespace collapse), ``max_length`` 512 tokens with truncation, the
encoder runs with the attention mask and each prompt's states are trimmed to its real length (the DiT pads to 512).
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

T5_MAX_LENGTH = 512
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clean_prompt(text: str) -> str:
    """HTML-unescape (twice, as the references) and collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    reader = open_weights(path)
    try:
        return {k: reader.get_tensor(k) for k in reader.keys()}
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------------------------- UMT5


def umt5_official_to_hf(key: str) -> str | None:
    """HF ``UMT5EncoderModel`` name of an official Wan T5 key (None: not part of the encoder)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if not m:
        return None
    n, rest = m.groups()
    table = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    return f"encoder.block.{n}.{table[rest]}" if rest in table else None


def umt5_config_from_official(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``UMT5Config`` fields of an official Wan T5 state dict (UMT5-XXL: 24 layers, 4096 wide, 64 heads)."""
    try:
        vocab, d_model = sd["token_embedding.weight"].shape
        inner = sd["blocks.0.attn.q.weight"].shape[0]
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"not an official Wan UMT5 checkpoint (missing {e})") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
    return dict(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner) // int(heads),
        d_ff=int(d_ff),
        num_layers=layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )


def _load_tokenizer(source: Path | str, flag: str) -> Any:
    from transformers import AutoTokenizer

    local = Path(source).exists()
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=local)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load the UMT5 tokenizer ({flag}): {e}") from None


class WanT5Encoder:
    """UMT5 encoder + tokenizer; ``encode(prompts) -> list[(L_i, 4096)]`` (valid length, float32 on CPU)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = T5_MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        fp8: bool = False,
    ) -> WanT5Encoder:
        """``--t5`` (HF dir or official ``.pth``/``.safetensors``); ``fp8`` stores the Linear weights in fp8 (``--fp8_t5``)."""
        from transformers import UMT5Config, UMT5EncoderModel

        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: T5 text encoder not found (--t5)")
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise UserError(f"{p}: not a T5 encoder directory (no config.json) (--t5)")
            try:
                model = UMT5EncoderModel.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"{p}: cannot load the UMT5 encoder (--t5): {e}") from None
            tok_src: Path | str = tokenizer or p
        else:
            sd = _state_dict(p)
            if "token_embedding.weight" not in sd:
                raise UserError(f"{p}: not an official Wan UMT5 checkpoint (no token_embedding.weight) (--t5)")
            config = UMT5Config(**umt5_config_from_official(sd))
            with torch.device("meta"):
                model = UMT5EncoderModel(config)
            hf = {}
            for k, v in sd.items():
                name = umt5_official_to_hf(k)
                if name is None:
                    raise UserError(f"{p}: unexpected key {k!r} in the UMT5 checkpoint (--t5)")
                hf[name] = v.to(dtype)
            hf["encoder.embed_tokens.weight"] = hf["shared.weight"]
            missing = [k for k in model.state_dict() if k not in hf]
            if missing:
                raise UserError(f"{p}: UMT5 checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]} (--t5)")
            model.load_state_dict(hf, strict=True, assign=True)
            model.tie_weights()
            tok_src = tokenizer or (p.parent / "google" / "umt5-xxl")
            if not Path(tok_src).exists():
                raise UserError(
                    f"no UMT5 tokenizer for {p}: pass --t5_tokenizer DIR (google/umt5-xxl) or place it at {tok_src} "
                    "(the official checkpoint layout)"
                )
        tok = _load_tokenizer(tok_src, "--t5_tokenizer")
        model = model.to(device=device).eval().requires_grad_(False)
        if fp8:
            _cast_linears_fp8(model)
        return cls(model, tok)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """States trimmed to each prompt's token count (special tokens included), float32 on the CPU."""
        texts = [clean_prompt(p) for p in prompts]
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        mask = ids.attention_mask.to(self.device)
        out = self.model(input_ids=ids.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [out[i, : int(n)].float().cpu() for i, n in enumerate(lengths)]


def _cast_linears_fp8(model: torch.nn.Module) -> None:
    """``--fp8_t5``: Linear weights stored in float8_e4m3fn, upcast per layer at compute time (norms stay as loaded)."""
    from musubi_tuner.modules.fp8_optimization import cast_to_fp8, patch_fp8_upcast_forward

    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(cast_to_fp8(module.weight.data), requires_grad=False)
            patch_fp8_upcast_forward(module)
            n += 1
    logger.info("--fp8_t5: %d Linear weights of the T5 encoder in fp8", n)


# ---------------------------------------------------------------------------------------------------------------- CLIP


def clip_official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open-clip ``visual.*`` ViT tensors → HF ``CLIPVisionModel`` names without the ``vision_model.`` prefix (fused
    in_proj split into q/k/v)."""
    out: dict[str, torch.Tensor] = {}
    top = {
        "visual.conv1.weight": "embeddings.patch_embedding.weight",
        "visual.class_embedding": "embeddings.class_embedding",
        "visual.positional_embedding": "embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "pre_layrnorm.weight",
        "visual.ln_pre.bias": "pre_layrnorm.bias",
        "visual.ln_post.weight": "post_layernorm.weight",
        "visual.ln_post.bias": "post_layernorm.bias",
    }
    sub = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        m = re.match(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$", k)
        if not m:
            continue  # text tower, projection, logit scale: unused by Wan
        n, name, kind = m.groups()
        base = f"encoder.layers.{n}"
        if name == "attn.in_proj":
            for part, t in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{base}.self_attn.{part}.{kind}"] = t.contiguous()
        elif name in sub:
            out[f"{base}.{sub[name]}.{kind}"] = v
    return out


def clip_config_from_hf_sd(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    width = sd["embeddings.patch_embedding.weight"].shape[0]
    patch = sd["embeddings.patch_embedding.weight"].shape[-1]
    positions = sd["embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.layers\.(\d+)\.", k)))
    ffn = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    grid = int(round((positions - 1) ** 0.5))
    return dict(
        hidden_size=int(width),
        intermediate_size=int(ffn),
        num_hidden_layers=layers,
        num_attention_heads=max(1, int(width) // 80) if int(width) % 80 == 0 else max(1, int(width) // 16),
        image_size=grid * int(patch),
        patch_size=int(patch),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


class WanClipEncoder:
    """CLIP ViT-H/14 vision tower; ``encode(images (N, 3, H, W) in [-1, 1]) -> (N, 257, 1280)`` penultimate states."""

    def __init__(self, model: Any):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"
    ) -> WanClipEncoder:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: CLIP image encoder not found (--clip)")
        if p.is_dir():
            try:
                model = CLIPVisionModel.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"{p}: cannot load the CLIP vision model (--clip): {e}") from None
        else:
            sd = _state_dict(p)
            if "visual.conv1.weight" not in sd:
                raise UserError(f"{p}: not an open-clip ViT checkpoint (no visual.conv1.weight) (--clip)")
            hf = clip_official_to_hf(sd)
            meta_cfg = _clip_metadata_config(p)
            config = CLIPVisionConfig(**(meta_cfg or clip_config_from_hf_sd(hf)))
            with torch.device("meta"):
                model = CLIPVisionModel(config)
            expected = model.state_dict()
            prefix = "vision_model." if any(k.startswith("vision_model.") for k in expected) else ""
            hf = {prefix + k: v for k, v in hf.items() if prefix + k in expected}
            missing = [k for k in expected if k not in hf and not k.endswith("position_ids")]
            if missing:
                raise UserError(f"{p}: CLIP checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]} (--clip)")
            model.load_state_dict({k: v.to(dtype) for k, v in hf.items()}, strict=False, assign=True)
            for module in model.modules():  # non-persistent buffers the file does not carry
                ids = getattr(module, "position_ids", None)
                if isinstance(ids, torch.Tensor) and ids.is_meta:
                    module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand((1, -1)), persistent=False)
        return cls(model.to(device=device).eval().requires_grad_(False))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the tower's size (bicubic), CLIP-normalise, return ``hidden_states[-2]`` (float32, CPU)."""
        import torch.nn.functional as F

        size = int(self.model.config.image_size)
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(device=self.device, dtype=next(self.model.parameters()).dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()


def _clip_metadata_config(path: Path) -> dict[str, Any] | None:
    """Tiny bundles store the CLIP config next to an official-layout file (``<file>.json``); real files do not."""
    side = path.with_suffix(path.suffix + ".json")
    if side.is_file():
        return json.loads(side.read_text(encoding="utf-8"))
    return None
