"""Tiny random-weight FLUX.2 bundles in the on-disk formats users download (DESIGN.md "Tiny model bundles").

``write_flux2_bundle(out_dir)`` writes:

- ``dit/flux2-klein-tiny.safetensors``: a klein-style DiT (no guidance embedder) in the official BFL key layout;
  ``dit/flux2-dev-tiny.safetensors``: a dev-style DiT (guidance embedder). Both carry their constructor arguments
  (metadata ``flux2_dit_config``) and variant (``flux2_model_version``: ``klein-4b`` / ``dev``).
- ``ae.safetensors``: the VAE in the BFL key layout (``encoder.down.{i}.block.{j}``, ``mid.attn_1`` 1×1 convs,
  ``bn.running_mean/var``), no metadata: its config is read from the shapes, as for the real file.
- ``text_encoder_qwen3/``: a Qwen3 causal-LM HF snapshot (4 layers, chat template); ``text_encoder_mistral3/``: a
  Mistral 3 snapshot (Mistral text model + Pixtral vision tower, chat template with a system prompt).

The tiny text encoders have 4 layers: the output layers (9, 18, 27) / (10, 20, 30) are remapped proportionally
(``flux_2.text_encoders.output_layers_for``), giving (1, 2, 3).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.demo.bundles import QWEN_SPECIAL_TOKENS, _train_qwen_tokenizer
from musubi_tuner.demo.snapshot_io import added_tokens_decoder, read_manifest, seeded, write_json
from musubi_tuner.utils.atomic import make_temp_dir, save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

BUNDLE_VERSION = 1
MANIFEST = "bundle.json"
TEXT_HIDDEN = 16  # both tiny encoders: DiT context width 48
TEXT_LAYERS = 4
QWEN_VOCAB = 640

TINY_DIT: dict[str, Any] = {
    "in_channels": 128,
    "context_in_dim": 3 * TEXT_HIDDEN,
    "hidden_size": 64,
    "num_heads": 4,
    "depth": 1,
    "depth_single_blocks": 2,
    "axes_dim": [4, 4, 4, 4],
    "theta": 2000,
    "mlp_ratio": 3.0,
}
TINY_VAE: dict[str, Any] = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}

# Our own chat templates for the tiny tokenizers (the released tokenizers ship theirs).
QWEN3_CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "<pad>")
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages %}"
    "{%- set text = m['content'] if m['content'] is string else m['content'][0]['text'] %}"
    "{%- if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{%- elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{%- else %}{{ text }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Flux2Bundle:
    """Paths of one tiny FLUX.2 bundle (absolute)."""

    root: Path
    seed: int
    dit_klein: Path
    dit_dev: Path
    vae: Path
    text_encoder_qwen3: Path
    text_encoder_mistral3: Path

    @classmethod
    def from_manifest(cls, root: str | os.PathLike) -> Flux2Bundle:
        root, data, paths = read_manifest(root, MANIFEST, "FLUX.2")
        return cls(root=root, seed=int(data["seed"]), **paths)


def randomize_flux2_dit_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights keeping activations O(1): Linear ~ N(0, 1/fan_in), modulation heads small, norm scales ≈ 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".scale"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif "modulation" in name or "adaLN" in name:
                val = 0.5 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g)
            else:
                val = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] if p.dim() > 1 else 1)
            p.copy_(val)


def write_tiny_flux2_dit(path: Path, *, guidance: bool, version: str, seed: int) -> Path:
    """One official-layout DiT file with ``flux2_dit_config`` / ``flux2_model_version`` metadata."""
    from musubi_tuner.flux_2.models.dit import Flux2
    from musubi_tuner.flux_2.models.loading import DIT_CONFIG_METADATA_KEY, MODEL_VERSION_METADATA_KEY

    config = {**TINY_DIT, "guidance_embed": guidance}
    model = Flux2(**config)
    randomize_flux2_dit_(model, seed)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    md = {DIT_CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True), MODEL_VERSION_METADATA_KEY: version, "format": "pt"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(sd, path, metadata=md)
    return path


def write_tiny_flux2_vae(path: Path, seed: int) -> Path:
    """``AutoencoderKLFlux2`` with random weights and non-trivial batch-norm statistics, saved with BFL keys."""
    from diffusers import AutoencoderKLFlux2

    from musubi_tuner.flux_2.vae import diffusers_to_bfl_key

    with seeded(seed):
        vae = AutoencoderKLFlux2(**TINY_VAE)
        vae.bn.running_mean.copy_(0.1 * torch.randn(128))
        vae.bn.running_var.copy_(0.5 + torch.rand(128))
    n_up = len(TINY_VAE["block_out_channels"])
    sd = {}
    for k, v in vae.state_dict().items():
        bk = diffusers_to_bfl_key(k, n_up)
        if ".mid.attn_1." in bk and bk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # BFL stores the attention projections as 1x1 convs
        sd[bk] = v.contiguous()
    save_safetensors_atomic(sd, path)
    return path


def _tokenizer_files(out_dir: Path, tok: Any, specials: tuple[str, ...], config: dict) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", {**config, "added_tokens_decoder": added_tokens_decoder(tok, specials)})


def write_tiny_qwen3(out_dir: Path, seed: int) -> Path:
    """A Qwen3 causal-LM snapshot (width 16, 4 layers) with a byte-level BPE tokenizer and a chat template."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_qwen_tokenizer(QWEN_VOCAB)
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    _tokenizer_files(
        out_dir,
        tok,
        QWEN_SPECIAL_TOKENS,
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": 40960,
            "chat_template": QWEN3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
        },
    )
    config = Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    with seeded(seed):
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_tiny_mistral3(out_dir: Path, seed: int) -> Path:
    """A ``Mistral3ForConditionalGeneration`` snapshot (text width 16, 4 layers; 1-layer Pixtral tower) + tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from musubi_tuner.demo.tokenizer_corpus import corpus_lines

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_VOCAB,
        min_frequency=1,
        special_tokens=list(MISTRAL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in MISTRAL_SPECIAL_TOKENS}
    _tokenizer_files(
        out_dir,
        tok,
        MISTRAL_SPECIAL_TOKENS,
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "model_max_length": 131072,
            "chat_template": MISTRAL3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        },
    )
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": tok.get_vocab_size(),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 37,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "rope_theta": 1e9,
            "max_position_embeddings": 1024,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 30,
            "patch_size": 6,
        },
        image_token_index=ids["[IMG]"],
        spatial_merge_size=1,
    )
    with seeded(seed):
        model = Mistral3ForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_flux2_bundle(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Flux2Bundle:
    """Write a tiny FLUX.2 bundle into ``out_dir`` (atomically; an existing bundle with the same seed is reused)."""
    root = Path(out_dir).resolve()
    if root.exists():
        try:
            data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            if data.get("version") == BUNDLE_VERSION and data.get("seed") == seed and not overwrite:
                return Flux2Bundle.from_manifest(root)
        except (OSError, json.JSONDecodeError):
            pass
        if root.is_file() or (any(root.iterdir()) and not overwrite):
            raise UserError(f"{root}: exists and is not a tiny FLUX.2 bundle for seed {seed} (remove it or pass overwrite)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, prefix=f".{root.name}.")
    try:
        paths = {
            "dit_klein": "dit/flux2-klein-tiny.safetensors",
            "dit_dev": "dit/flux2-dev-tiny.safetensors",
            "vae": "ae.safetensors",
            "text_encoder_qwen3": "text_encoder_qwen3",
            "text_encoder_mistral3": "text_encoder_mistral3",
        }
        write_tiny_flux2_dit(tmp / paths["dit_klein"], guidance=False, version="klein-4b", seed=seed)
        write_tiny_flux2_dit(tmp / paths["dit_dev"], guidance=True, version="dev", seed=seed + 1)
        write_tiny_flux2_vae(tmp / paths["vae"], seed + 2)
        write_tiny_qwen3(tmp / paths["text_encoder_qwen3"], seed + 3)
        write_tiny_mistral3(tmp / paths["text_encoder_mistral3"], seed + 4)
        write_json(tmp / MANIFEST, {"version": BUNDLE_VERSION, "seed": seed, "paths": paths})
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny FLUX.2 bundle (seed %d) to %s", seed, root)
    return Flux2Bundle.from_manifest(root)
