"""Tiny random-weight Kandinsky 5 bundles in the exact on-disk formats users download (DESIGN.md "Tiny model bundles").

``write_k5_bundle(out_dir)`` writes, deterministically for a seed and in a few seconds on a laptop CPU:

- ``dit/k5_tiny.safetensors``: the DiT in the official key layout (= diffusers ``Kandinsky5Transformer3DModel``
  keys), every parameter random (also the zero-initialised modulations), the constructor arguments as JSON in the
  safetensors metadata key ``k5_dit_config``; ``dit/diffusers/``: the same weights via ``save_pretrained``.
- ``vae/``: a diffusers ``AutoencoderKLHunyuanVideo`` directory (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, 16 latent channels, ×8 spatial, ×4 causal temporal) and
  ``hunyuan_video_vae.safetensors``, the single-file form (same keys; the config in the metadata key ``vae_config``).
- ``flux_vae/``: a diffusers FLUX.1 ``AutoencoderKL`` directory (16 channels, ×8, scaling 0.3611, shift 0.1159).
- ``text_encoder/``: a Qwen2.5-VL HF snapshot (tiny config, byte-level BPE tokenizer trained offline with the chat
  special tokens, ``preprocessor_config.json``); ``text_encoder_2/``: a CLIP-L text snapshot with its tokenizer.

Everything is first written to a temporary sibling directory, then renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.demo.qwen25vl import TinyQwen25VLDims, train_qwen_bpe, write_qwen25vl_snapshot
from musubi_tuner.demo.snapshot_io import added_tokens_decoder, read_manifest, seeded, write_json
from musubi_tuner.kandinsky5.models.loading import DIT_CONFIG_METADATA_KEY
from musubi_tuner.kandinsky5.vae import FLUX1_VAE_CONFIG
from musubi_tuner.utils.atomic import make_temp_dir, save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

BUNDLE_VERSION = 1
MANIFEST = "bundle.json"

VAE_CONFIG_METADATA_KEY = "vae_config"

QWEN_HIDDEN = 32  # tiny Qwen2.5-VL text width = the DiT's in_text_dim
CLIP_HIDDEN = 24  # tiny CLIP width = pooled size = the DiT's in_text_dim2 (differs from QWEN_HIDDEN on purpose)
QWEN_VOCAB = 640
CLIP_VOCAB = 512

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

_CLIP_PRETOKENIZE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def tiny_dit_config(task: str = "k5-lite-t2v-5s-sd") -> dict[str, Any]:
    """Diffusers ``Kandinsky5Transformer3DModel`` config of the tiny DiT for ``task`` (input width, attention type).

    model_dim 64 = 4 heads of 16 (axes 4+6+6), ff 128, time 32, 1 text block, 2 visual blocks, 16 latent channels,
    ``in_text_dim`` / ``in_text_dim2`` = the tiny Qwen / CLIP widths.
    """
    from musubi_tuner.kandinsky5.configs import get_task_config

    tc = get_task_config(task)
    nabla = tc.uses_nabla
    return {
        "in_visual_dim": 16,
        "out_visual_dim": 16,
        "in_text_dim": QWEN_HIDDEN,
        "in_text_dim2": CLIP_HIDDEN,
        "time_dim": 32,
        "patch_size": [1, 2, 2],
        "model_dim": 64,
        "ff_dim": 128,
        "num_text_blocks": 1,
        "num_visual_blocks": 2,
        "axes_dims": [4, 6, 6],
        "visual_cond": tc.visual_cond,
        "attention_type": "nabla" if nabla else "regular",
        "attention_P": tc.nabla_p if nabla else None,
        "attention_wT": tc.nabla_wT if nabla else None,
        "attention_wH": tc.nabla_wH if nabla else None,
        "attention_wW": tc.nabla_wW if nabla else None,
        "attention_add_sta": tc.nabla_add_sta if nabla else None,
        "attention_method": tc.nabla_method if nabla else None,
    }


TINY_HUNYUAN_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["HunyuanVideoDownBlock3D"] * 4,
    "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 4,
    "scaling_factor": 0.476986,
    "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4,
    "mid_block_add_attention": True,
}

# The released FLUX.1 VAE layout, shrunk: same blocks, scaling and shift, narrow channels, one layer per block.
TINY_FLUX_VAE_CONFIG: dict[str, Any] = {
    **FLUX1_VAE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}


@dataclass(frozen=True)
class K5Bundle:
    """Paths of one tiny Kandinsky 5 bundle (all absolute).

    ``dit``: official single-file DiT; ``dit_diffusers``: diffusers transformer directory; ``vae``: HunyuanVideo
    VAE diffusers directory; ``vae_file``: its single-file form; ``flux_vae``: FLUX.1 VAE directory (image tasks);
    ``text_encoder_qwen`` / ``text_encoder_clip``: HF snapshot directories. ``dit_config``: the DiT constructor
    arguments (diffusers field names); ``task``: the task the DiT input width was built for.
    """

    root: Path
    task: str
    seed: int
    dit: Path
    dit_diffusers: Path
    vae: Path
    vae_file: Path
    flux_vae: Path
    text_encoder_qwen: Path
    text_encoder_clip: Path
    dit_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, root: str | os.PathLike) -> K5Bundle:
        """Read a bundle written by ``write_k5_bundle`` (its ``bundle.json``)."""
        root, data, paths = read_manifest(root, MANIFEST, "K5")
        return cls(root=root, task=data["task"], seed=int(data["seed"]), dit_config=data["dit_config"], **paths)


# ----------------------------------------------------------------------------------------------------------- helpers


def randomize_k5_dit_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values that keep activations O(1).

    Linear weights ~ N(0, 1/fan_in); modulation Linears (zero-initialised in the real classes) get a small std so
    the gates and scales are non-trivial but sane; norm weights ≈ 1; biases small.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith(".weight"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                val = 0.02 * torch.randn(p.shape, generator=g)
            elif "modulation" in name:
                val = 0.5 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g)
            else:
                val = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] if p.dim() > 1 else 1)
            p.copy_(val.to(p.dtype))


# ------------------------------------------------------------------------------------------------------------ writers


def write_tiny_dit(
    out_dir: Path, config: dict[str, Any], seed: int, *, file_name: str = "k5_tiny.safetensors"
) -> tuple[Path, Path]:
    """Write the DiT single file (official layout + ``k5_dit_config`` metadata) and a diffusers directory."""
    from diffusers import Kandinsky5Transformer3DModel

    out_dir.mkdir(parents=True, exist_ok=True)
    with seeded(seed):
        model = Kandinsky5Transformer3DModel(**config)
    randomize_k5_dit_(model, seed)
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    single = out_dir / file_name
    save_safetensors_atomic(sd, single, metadata={DIT_CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True), "format": "pt"})
    diffusers_dir = out_dir / "diffusers"
    model.save_pretrained(diffusers_dir, safe_serialization=True)
    return single, diffusers_dir


def write_tiny_hunyuan_vae(out_dir: Path, seed: int, *, file_name: str = "hunyuan_video_vae.safetensors") -> tuple[Path, Path]:
    """Write the HunyuanVideo VAE as a diffusers directory plus the single-file form (same keys, config in metadata)."""
    from diffusers import AutoencoderKLHunyuanVideo

    with seeded(seed):
        vae = AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE_CONFIG)
    vae.save_pretrained(out_dir, safe_serialization=True)
    single = out_dir.parent / file_name
    save_safetensors_atomic(
        dict(vae.state_dict()), single, metadata={VAE_CONFIG_METADATA_KEY: json.dumps(TINY_HUNYUAN_VAE_CONFIG, sort_keys=True)}
    )
    return out_dir, single


def write_tiny_flux_vae(out_dir: Path, seed: int) -> Path:
    """Write a FLUX.1-style ``AutoencoderKL`` diffusers directory (16 latent channels, ×8)."""
    from diffusers import AutoencoderKL

    with seeded(seed):
        vae = AutoencoderKL(**TINY_FLUX_VAE_CONFIG)
    vae.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _train_qwen_tokenizer(vocab_size: int) -> Any:
    from musubi_tuner.demo.tokenizer_corpus import corpus_lines

    return train_qwen_bpe(corpus_lines(), vocab_size, QWEN_SPECIAL_TOKENS)


def _train_clip_tokenizer(vocab_size: int) -> Any:
    """CLIP's BPE (lower-cased words, ``</w>`` end-of-word suffix) trained on the built-in corpus, the same in every run
    (``demo.bpe``: ``tokenizers``' trainer numbers end-of-word symbols in a random order)."""
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from musubi_tuner.demo.bpe import train_bpe
    from musubi_tuner.demo.tokenizer_corpus import corpus_lines

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_PRETOKENIZE), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[str] = Counter()
    for line in corpus_lines():
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    vocab, merges = train_bpe(
        words, vocab_size, special_tokens=[CLIP_BOS, CLIP_EOS], alphabet=pre_tokenizers.ByteLevel.alphabet(), suffix="</w>"
    )
    tok = Tokenizer(
        models.BPE(vocab, merges, unk_token=CLIP_EOS, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([CLIP_BOS, CLIP_EOS])
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, tok.token_to_id(CLIP_EOS)), (CLIP_BOS, tok.token_to_id(CLIP_BOS)), trim_offsets=False, add_prefix_space=False
    )
    return tok


def write_tiny_qwen25vl(out_dir: Path, seed: int) -> Path:
    """Write a Qwen2.5-VL HF snapshot: tiny 2-layer text model (width 32, 2 heads of 16, mrope [2, 2, 4]), 1-layer
    vision tower, byte-level BPE tokenizer with the chat special tokens, processor config."""
    tok = _train_qwen_tokenizer(QWEN_VOCAB)
    dims = TinyQwen25VLDims(
        vocab_size=tok.get_vocab_size(),
        hidden_size=QWEN_HIDDEN,
        text_intermediate_size=64,
        num_key_value_heads=1,
        vision_depth=1,
        vision_hidden_size=16,
    )
    return write_qwen25vl_snapshot(
        out_dir, seed, tok, QWEN_SPECIAL_TOKENS, dims, extra_tokenizer_config={"extra_special_tokens": {}}
    )


def write_tiny_clip_text(out_dir: Path, seed: int) -> Path:
    """Write a CLIP text HF snapshot (width 24 = pooled size, 2 layers) with a CLIP BPE tokenizer trained offline."""
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_clip_tokenizer(CLIP_VOCAB)
    tok.save(str(out_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id(CLIP_BOS), tok.token_to_id(CLIP_EOS)
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": CLIP_BOS,
            "eos_token": CLIP_EOS,
            "pad_token": CLIP_EOS,
            "unk_token": CLIP_EOS,
            "model_max_length": 77,
            "do_lower_case": True,
            "clean_up_tokenization_spaces": True,
            "added_tokens_decoder": added_tokens_decoder(tok, (CLIP_BOS, CLIP_EOS)),
        },
    )
    config = CLIPTextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    with seeded(seed):
        model = CLIPTextModel(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ------------------------------------------------------------------------------------------------------------ bundle


def _manifest_matches(root: Path, task: str, seed: int) -> bool:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("version") == BUNDLE_VERSION and data.get("task") == task and data.get("seed") == seed


def write_k5_bundle(
    out_dir: str | os.PathLike, *, task: str = "k5-lite-t2v-5s-sd", seed: int = 0, overwrite: bool = False
) -> K5Bundle:
    """Write a tiny random-weight Kandinsky 5 bundle into ``out_dir`` (atomically) and return its paths.

    ``task`` picks the DiT input width (33 channels for video / I2V / I2I tasks, 16 for T2I) and the attention type.
    An existing bundle with the same task, seed and version is reused; any other existing non-empty ``out_dir`` is
    an error unless ``overwrite``.
    """
    root = Path(out_dir).resolve()
    if root.exists():
        if _manifest_matches(root, task, seed) and not overwrite:
            return K5Bundle.from_manifest(root)
        if root.is_file() or (any(root.iterdir()) and not overwrite):
            raise UserError(
                f"{root}: exists and is not a tiny K5 bundle for task {task}, seed {seed} (remove it or pass overwrite)"
            )
    dit_config = tiny_dit_config(task)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, prefix=f".{root.name}.")
    try:
        write_tiny_dit(tmp / "dit", dit_config, seed)
        write_tiny_hunyuan_vae(tmp / "vae", seed + 1)
        write_tiny_flux_vae(tmp / "flux_vae", seed + 2)
        write_tiny_qwen25vl(tmp / "text_encoder", seed + 3)
        write_tiny_clip_text(tmp / "text_encoder_2", seed + 4)
        paths = {
            "dit": "dit/k5_tiny.safetensors",
            "dit_diffusers": "dit/diffusers",
            "vae": "vae",
            "vae_file": "hunyuan_video_vae.safetensors",
            "flux_vae": "flux_vae",
            "text_encoder_qwen": "text_encoder",
            "text_encoder_clip": "text_encoder_2",
        }
        write_json(
            tmp / MANIFEST, {"version": BUNDLE_VERSION, "task": task, "seed": seed, "dit_config": dit_config, "paths": paths}
        )
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny Kandinsky 5 bundle (task %s, seed %d) to %s", task, seed, root)
    return K5Bundle.from_manifest(root)
