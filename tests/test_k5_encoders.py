"""Kandinsky 5 text encoders on the tiny bundle: template crop, budgets, masks, pooled CLIP, placement options."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from musubi_tuner.kandinsky5 import text_encoders as te
from musubi_tuner.kandinsky5.text_encoders import (
    OFFICIAL_CROP_START,
    PROMPT_TEMPLATES,
    Kandinsky5TextEncoder,
    format_prompt,
    qwen_max_length_for,
    resolve_model_source,
    template_crop_start,
    template_mode_for,
    template_prefix,
)
from musubi_tuner.utils.errors import UserError

PROMPTS = ["a red square moving right on a black background", "A cat walks on the grass, realistic style."]


@pytest.fixture(scope="module")
def encoder(k5_bundle) -> Kandinsky5TextEncoder:
    return Kandinsky5TextEncoder(k5_bundle.text_encoder_qwen, k5_bundle.text_encoder_clip, device="cpu", dtype=torch.float32)


def _reference_hidden(encoder: Kandinsky5TextEncoder, prompt: str, mode: str) -> tuple[torch.Tensor, list[int], int]:
    """Last hidden states of the full templated prompt, computed without the encoder class, and the prefix length."""
    tok, model = encoder.qwen.tokenizer, encoder.qwen.model
    full = tok(format_prompt(prompt, mode), add_special_tokens=False)["input_ids"]
    prefix = tok(template_prefix(mode), add_special_tokens=False)["input_ids"]
    assert full[: len(prefix)] == prefix  # the template prefix tokenizes identically inside the full text
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states[-1][0]
    return hidden, full, len(prefix)


def test_templates_are_the_official_strings():
    assert set(PROMPT_TEMPLATES) == set(OFFICIAL_CROP_START)
    video = format_prompt("PROMPT", "video")
    assert video.startswith("<|im_start|>system\nYou are a promt engineer. Describe the video in detail.\nDescribe how")
    assert "or scren content.\n" in video and video.endswith("<|im_start|>user\nPROMPT<|im_end|>")
    assert video.count("\n") == 9  # 8 parts joined by newlines + the two "\n" inside parts 1 and 8
    assert format_prompt("P", "image").endswith("and background:<|im_end|>\n<|im_start|>user\nP<|im_end|>")
    assert format_prompt("P", "image_edit").endswith("<|im_start|>user\nP")
    assert "Describe main characters actions." in format_prompt("P", "image2video")
    assert template_mode_for(True) == "video" and template_mode_for(False) == "image"
    assert template_mode_for(False, image_edit=True) == "image_edit"
    assert qwen_max_length_for("video") == 256 and qwen_max_length_for("image") == 512
    with pytest.raises(UserError, match="unknown Kandinsky 5 prompt template"):
        format_prompt("P", "movie")


@pytest.mark.parametrize("mode", ["video", "image", "image2video"])
def test_crop_removes_exactly_the_template_prefix(encoder, mode):
    (item,) = encoder.encode([PROMPTS[0]], mode=mode)
    hidden, full, n_prefix = _reference_hidden(encoder, PROMPTS[0], mode)
    assert encoder.qwen.crop_start(mode) == n_prefix == template_crop_start(encoder.qwen.tokenizer, mode)
    # kept = prompt tokens + <|im_end|>
    prompt_ids = encoder.qwen.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert full[n_prefix:] == prompt_ids + [encoder.qwen.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert item["text_embeds"].shape == (len(prompt_ids) + 1, encoder.qwen.hidden_size)
    torch.testing.assert_close(item["text_embeds"], hidden[n_prefix:], rtol=1e-5, atol=1e-5)


def test_modes_differ(encoder):
    video, image = encoder.encode([PROMPTS[0]], "video")[0], encoder.encode([PROMPTS[0]], "image")[0]
    assert video["text_embeds"].shape == image["text_embeds"].shape
    assert not torch.allclose(video["text_embeds"], image["text_embeds"])  # the template context differs
    torch.testing.assert_close(video["pooled_embed"], image["pooled_embed"])  # CLIP sees the raw prompt


def test_truncation_to_the_token_budget(k5_bundle):
    enc = Kandinsky5TextEncoder(k5_bundle.text_encoder_qwen, k5_bundle.text_encoder_clip, dtype=torch.float32, qwen_max_length=6)
    long_prompt = " ".join(["a blue circle bouncing"] * 40)
    (item,) = enc.encode([long_prompt], "video")
    assert item["text_embeds"].shape[0] == 6
    hidden, _, n_prefix = _reference_hidden(enc, long_prompt, "video")
    torch.testing.assert_close(item["text_embeds"], hidden[n_prefix : n_prefix + 6], rtol=1e-5, atol=1e-5)
    assert enc.max_length_for("image") == 6
    meta = enc.cache_metadata("video")
    assert meta["k5_template"] == "video" and meta["k5_qwen_max_length"] == "6"
    assert meta["k5_crop_start"] == str(n_prefix)


def test_batch_padding_and_masks(encoder):
    items = encoder.encode(PROMPTS, "video")
    alone = [encoder.encode([p], "video")[0] for p in PROMPTS]
    batch = encoder.encode_batch(PROMPTS, "video")
    lengths = [it["text_embeds"].shape[0] for it in items]
    assert lengths[0] != lengths[1]
    assert batch["text_embeds"].shape == (2, max(lengths), encoder.qwen.hidden_size)
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["text_embeds"][i, n:] == 0).all()
        # right padding + causal LM: valid states do not depend on the batch
        torch.testing.assert_close(items[i]["text_embeds"], alone[i]["text_embeds"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(items[i]["pooled_embed"], alone[i]["pooled_embed"], rtol=1e-5, atol=1e-5)


def test_pooled_embed_is_clip_pooler_output(encoder, k5_bundle):
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(k5_bundle.text_encoder_clip)
    model = CLIPTextModel.from_pretrained(k5_bundle.text_encoder_clip)
    inputs = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).pooler_output
    items = encoder.encode(PROMPTS, "image")
    assert items[0]["pooled_embed"].shape == (k5_bundle.dit_config["in_text_dim2"],)
    torch.testing.assert_close(torch.stack([it["pooled_embed"] for it in items]), ref, rtol=1e-5, atol=1e-5)


def test_image_edit_shows_images_to_qwen(encoder):
    img = Image.new("RGB", (112, 112), (200, 30, 30))
    (with_image,) = encoder.encode(["make it blue"], "image_edit", images=[[img]])
    # half resolution 56x56 -> 4x4 patches of 14 -> 2x2 merged = 4 image tokens
    prompt_ids = encoder.qwen.tokenizer("make it blue", add_special_tokens=False)["input_ids"]
    assert with_image["text_embeds"].shape[0] == len(prompt_ids) + 1 + 4 + 1 + 1  # prompt, vision start/pads/end, im_end
    assert encoder.qwen.crop_start("image_edit") == template_crop_start(encoder.qwen.tokenizer, "image_edit")
    with pytest.raises(ValueError, match="image_edit"):
        encoder.encode(["x"], "video", images=[[img]])


def test_model_sources(k5_bundle, tmp_path):
    src = resolve_model_source(k5_bundle.text_encoder_qwen, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--q")
    assert src.local_files_only and src.model == str(k5_bundle.text_encoder_qwen)
    # a diffusers pipeline directory: text_encoder/ (weights) + tokenizer/
    pipe = tmp_path / "pipeline"
    (pipe / "text_encoder").mkdir(parents=True)
    (pipe / "tokenizer").mkdir()
    for f in k5_bundle.text_encoder_qwen.iterdir():
        tokenizer_file = f.name.startswith(("tokenizer", "preprocessor"))
        shutil.copy(f, pipe / ("tokenizer" if tokenizer_file else "text_encoder") / f.name)
    src = resolve_model_source(pipe, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--q")
    assert src.model == str(pipe / "text_encoder") and src.tokenizer == str(pipe / "tokenizer")
    enc = Kandinsky5TextEncoder(pipe, k5_bundle.text_encoder_clip, dtype=torch.float32)
    assert enc.encode(["a red square"], "image")[0]["text_embeds"].shape[1] == enc.qwen.hidden_size
    hub = resolve_model_source("Qwen/Qwen2.5-VL-7B-Instruct", subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--q")
    assert not hub.local_files_only and hub.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    with pytest.raises(UserError, match="--text_encoder_qwen"):
        Kandinsky5TextEncoder(tmp_path / "missing", k5_bundle.text_encoder_clip)
    with pytest.raises(UserError, match="not a single file"):
        resolve_model_source(k5_bundle.dit, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--text_encoder_qwen")
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_source(tmp_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer", flag="--text_encoder_qwen")


def test_placement_options_are_exclusive_and_nf4_needs_cuda_and_bitsandbytes(k5_bundle, monkeypatch):
    with pytest.raises(UserError, match="mutually exclusive"):
        Kandinsky5TextEncoder(k5_bundle.text_encoder_qwen, k5_bundle.text_encoder_clip, text_encoder_cpu=True, quantized_qwen=True)
    with pytest.raises(UserError, match="needs a CUDA device"):
        Kandinsky5TextEncoder(k5_bundle.text_encoder_qwen, k5_bundle.text_encoder_clip, device="cpu", quantized_qwen=True)
    real_find_spec = te.importlib.util.find_spec
    monkeypatch.setattr(
        te.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match=r"blissful-tuner\[quant\]"):
        te._nf4_config()
    cpu = Kandinsky5TextEncoder(
        k5_bundle.text_encoder_qwen, k5_bundle.text_encoder_clip, dtype=torch.float32, text_encoder_cpu=True
    )
    assert cpu.qwen.input_device.type == "cpu"
