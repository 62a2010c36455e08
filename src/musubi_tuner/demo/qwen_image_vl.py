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

from musubi_tuner.demo.bundles import _QWEN_PRETOKENIZE, QWEN_HIDDEN, _seeded, _write_json

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
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), QWEN_FIRST_SPECIAL_ID):
        vocab[f"<|unused_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_RELEASE_SPECIALS])
    return tok


def write_tiny_qwen_image_vl(out_dir: Path, seed: int) -> Path:
    """Write the tiny Qwen2.5-VL snapshot (model, tokenizer, image processor config) to ``out_dir``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_release_id_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN_RELEASE_SPECIALS}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
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
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
                for t, i in ids.items()
            },
        },
    )
    _write_json(
        out_dir / "preprocessor_config.json",
        {
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
        },
    )
    special = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": QWEN_RELEASE_VOCAB,
            "hidden_size": QWEN_HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 4]},
            "tie_word_embeddings": False,
            **special,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": QWEN_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **special,
    )
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
