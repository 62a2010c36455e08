"""Tiny Qwen2.5-VL HF snapshot for Qwen-Image (specs/qwen_image.md §5, "Tiny Qwen2.5-VL for tests").

Unlike the Kandinsky 5 bundle's 640-token encoder, this one has the release's token ids: a 152064-row vocabulary,
``<|endoftext|>`` = 151643, ``<|im_start|>`` / ``<|im_end|>`` = 151644 / 151645, ``<|vision_start|>`` /
``<|vision_end|>`` = 151652 / 151653, ``<|image_pad|>`` = 151655, ``<|video_pad|>`` = 151656. The byte-level BPE is
trained offline on the Qwen-Image templates (so every template word is one token, as in the real vocabulary and the
prefixes have the release's 34 / 64 tokens) plus the demo corpus; ids up to 151642 that the small BPE does not use
are unreachable filler entries, like the real tokenizer's rarely used ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from musubi_tuner.demo.bundles import QWEN_HIDDEN
from musubi_tuner.demo.qwen25vl import TinyQwen25VLDims, train_qwen_bpe, write_qwen25vl_snapshot

# The release's special tokens from id 151643 on, in id order (tokenizers numbers added tokens after the vocab).
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_RELEASE_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_RELEASE_VOCAB = 152064
_BPE_VOCAB = 1024


def _corpus() -> list[str]:
    from musubi_tuner.demo.tokenizer_corpus import corpus_lines
    from musubi_tuner.qwen_image.text_encoders import CAPTION_INSTRUCTIONS, EDIT_SYSTEM, T2I_SYSTEM

    templates = [f"system\n{T2I_SYSTEM}\nuser\n", f"system\n{EDIT_SYSTEM}\nuser\nPicture 1: ", "assistant\n"]
    return [*templates * 16, *CAPTION_INSTRUCTIONS.values(), *corpus_lines()]


def train_release_id_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` with the Qwen2.5 pre-tokenizer and the release's special-token ids."""
    from tokenizers import AddedToken, Tokenizer

    data = json.loads(train_qwen_bpe(_corpus(), _BPE_VOCAB).to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), QWEN_FIRST_SPECIAL_ID):
        vocab[f"<|unused_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_RELEASE_SPECIALS])
    return tok


def write_tiny_qwen_image_vl(out_dir: Path, seed: int) -> Path:
    """Write the tiny Qwen2.5-VL snapshot (model, tokenizer, image processor config) to ``out_dir``."""
    dims = TinyQwen25VLDims(
        vocab_size=QWEN_RELEASE_VOCAB,
        hidden_size=QWEN_HIDDEN,
        text_intermediate_size=32,
        num_key_value_heads=2,
        vision_depth=2,
        vision_hidden_size=32,
    )
    return write_qwen25vl_snapshot(out_dir, seed, train_release_id_tokenizer(), QWEN_RELEASE_SPECIALS, dims)
