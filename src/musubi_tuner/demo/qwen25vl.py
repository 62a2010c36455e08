"""Tiny Qwen2.5-VL HF snapshots (model, tokenizer, image processor config) for the demo bundles.

One writer for the Kandinsky 5 bundle's 640-token encoder (``demo.bundles``) and Qwen-Image's encoder with the
release's token ids (``demo.qwen_image_vl``): each caller trains its tokenizer and passes it with its sizes; the
files around it (``tokenizer_config.json``, ``preprocessor_config.json``, the ``Qwen2_5_VLConfig``) are the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musubi_tuner.demo.snapshot_io import added_tokens_decoder, seeded, write_json

# Qwen2.5's pre-tokenizer split (before the byte-level mapping): contractions, letters, single digits, punctuation.
QWEN_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "model_max_length": 32768,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
}

_PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 256,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


@dataclass(frozen=True)
class TinyQwen25VLDims:
    """The sizes that differ between the tiny snapshots.

    Shared by all: 2 text layers of 2 heads, mrope sections [2, 2, 4], rope theta 1e6; vision tower of 2 heads,
    patch 14, merge 2, window 112, full attention in its last block, output width = the text width.
    """

    vocab_size: int
    hidden_size: int
    text_intermediate_size: int
    num_key_value_heads: int
    vision_depth: int
    vision_hidden_size: int


def train_qwen_bpe(lines: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with Qwen2.5's normalizer, pre-tokenizer and decoder, trained on
    ``lines`` (``special_tokens`` take the first ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(
        models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def write_qwen25vl_snapshot(
    out_dir: Path,
    seed: int,
    tok: Any,
    specials: tuple[str, ...],
    dims: TinyQwen25VLDims,
    *,
    extra_tokenizer_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``tok`` (with its special tokens ``specials``, which include the chat and vision tokens), the tokenizer
    and image processor configs, and a ``Qwen2_5_VLForConditionalGeneration`` of ``dims`` seeded with ``seed``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in specials}
    write_json(
        out_dir / "tokenizer_config.json",
        {**_TOKENIZER_CONFIG, "added_tokens_decoder": added_tokens_decoder(tok, specials), **(extra_tokenizer_config or {})},
    )
    write_json(out_dir / "preprocessor_config.json", _PREPROCESSOR_CONFIG)
    special = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": dims.vocab_size,
            "hidden_size": dims.hidden_size,
            "intermediate_size": dims.text_intermediate_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": dims.num_key_value_heads,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 4]},
            "tie_word_embeddings": False,
            **special,
        },
        vision_config={
            "depth": dims.vision_depth,
            "hidden_size": dims.vision_hidden_size,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": dims.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [dims.vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **special,
    )
    with seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
