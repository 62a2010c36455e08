"""Tiny bundles load with the real loaders (transformers, diffusers, ours); the synthetic dataset decodes."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.demo.bundles import (
    DIT_CONFIG_METADATA_KEY,
    QWEN_SPECIAL_TOKENS,
    K5Bundle,
    _train_qwen_tokenizer,
    tiny_dit_config,
    write_k5_bundle,
    write_tiny_dit,
)
from musubi_tuner.demo.synthetic_data import RGB, write_synthetic_video_dataset
from musubi_tuner.utils.errors import UserError


def test_dit_file_loads_strict_into_diffusers(k5_bundle: K5Bundle):
    from diffusers import Kandinsky5Transformer3DModel

    with safe_open(str(k5_bundle.dit), "pt") as f:
        config = json.loads(f.metadata()[DIT_CONFIG_METADATA_KEY])
    assert config == k5_bundle.dit_config
    model = Kandinsky5Transformer3DModel(**config)
    sd = load_file(str(k5_bundle.dit))
    model.load_state_dict(sd, strict=True)
    assert set(sd) == set(model.state_dict())
    # 18 top-level + 14 per text block + 24 per visual block (specs/kandinsky5.md §4)
    assert len(sd) == 18 + 14 * config["num_text_blocks"] + 24 * config["num_visual_blocks"]
    # every parameter is random, including the zero-initialised modulations
    for key, t in sd.items():
        assert t.abs().max() > 0, key
    assert sd["visual_embeddings.in_layer.weight"].shape == (64, 4 * 33)
    assert sd["text_embeddings.in_layer.weight"].shape == (64, 32)
    assert sd["pooled_text_embeddings.in_layer.weight"].shape == (32, 24)

    # the diffusers directory holds the same weights and config
    loaded = Kandinsky5Transformer3DModel.from_pretrained(k5_bundle.dit_diffusers)
    for key, t in loaded.state_dict().items():
        torch.testing.assert_close(t.float(), sd[key], rtol=0, atol=0)


def test_dit_loads_through_our_loader(k5_bundle: K5Bundle):
    from musubi_tuner.kandinsky5.configs import get_task_config
    from musubi_tuner.kandinsky5.models.loading import load_dit

    task = get_task_config(k5_bundle.task)
    a = load_dit(task, k5_bundle.dit, dtype=torch.float32)  # dims from the k5_dit_config metadata
    b = load_dit(task, k5_bundle.dit_diffusers, dtype=torch.float32)  # dims from config.json
    sd = load_file(str(k5_bundle.dit))
    for key, t in a.state_dict().items():
        if key in sd:
            torch.testing.assert_close(t, sd[key], rtol=0, atol=0)
            torch.testing.assert_close(b.state_dict()[key], sd[key], rtol=0, atol=0)


def test_dit_is_deterministic_per_seed(tmp_path):
    cfg = tiny_dit_config("k5-lite-t2v-5s-sd")
    a, _ = write_tiny_dit(tmp_path / "a", cfg, seed=3)
    b, _ = write_tiny_dit(tmp_path / "b", cfg, seed=3)
    c, _ = write_tiny_dit(tmp_path / "c", cfg, seed=4)
    sa, sb, sc = load_file(str(a)), load_file(str(b)), load_file(str(c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["out_layer.out_layer.weight"], sc["out_layer.out_layer.weight"])
    assert _train_qwen_tokenizer(400).to_str() == _train_qwen_tokenizer(400).to_str()


def test_task_sets_input_width_and_attention():
    assert tiny_dit_config("k5-lite-t2v-5s-sd")["visual_cond"] is True
    assert tiny_dit_config("k5-lite-i2v-5s-sd")["visual_cond"] is True
    assert tiny_dit_config("k5-lite-t2i-hd")["visual_cond"] is False
    nabla = tiny_dit_config("k5-lite-t2v-10s-sd")
    assert nabla["attention_type"] == "nabla" and nabla["attention_P"] == 0.9
    with pytest.raises(UserError, match="unknown Kandinsky 5 task"):
        tiny_dit_config("k5-nope")


def test_qwen_snapshot_loads_with_transformers(k5_bundle: K5Bundle):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(k5_bundle.text_encoder_qwen, local_files_only=True)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    for t, i in ids.items():  # each special token is one id and survives a round trip inside text
        assert tok(f"x{t}y", add_special_tokens=False)["input_ids"].count(i) == 1
    assert tok.pad_token == "<|endoftext|>"
    assert tok.decode(tok("a red square moving right", add_special_tokens=False)["input_ids"]) == "a red square moving right"

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(k5_bundle.text_encoder_qwen, local_files_only=True)
    cfg = model.config
    assert cfg.image_token_id == ids["<|image_pad|>"] and cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"] and cfg.vision_end_token_id == ids["<|vision_end|>"]
    text = cfg.text_config
    assert text.hidden_size == k5_bundle.dit_config["in_text_dim"]
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert max(ids.values()) < text.vocab_size and text.eos_token_id < text.vocab_size
    out = model(input_ids=torch.tensor([[ids["<|im_start|>"], 100, 200]]), output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, 3, text.hidden_size)
    assert torch.isfinite(out.hidden_states[-1]).all()
    assert type(AutoImageProcessor.from_pretrained(k5_bundle.text_encoder_qwen)).__name__.startswith("Qwen2VLImageProcessor")


def test_clip_snapshot_loads_with_transformers(k5_bundle: K5Bundle):
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(k5_bundle.text_encoder_clip, local_files_only=True)
    enc = tok(["A Red Square"], padding="max_length", max_length=77, truncation=True)
    ids = enc["input_ids"][0]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok("a red square")["input_ids"] == tok("A  RED square")["input_ids"]  # lower-cased, whitespace collapsed
    model = CLIPTextModel.from_pretrained(k5_bundle.text_encoder_clip, local_files_only=True)
    assert model.config.eos_token_id == tok.eos_token_id
    pooled = model(**tok(["a red square"], padding="max_length", max_length=77, return_tensors="pt")).pooler_output
    assert pooled.shape == (1, k5_bundle.dit_config["in_text_dim2"])


def test_clip_tokenizer_is_the_same_in_every_training_run(k5_bundle: K5Bundle):
    # tokenizers' BpeTrainer numbered the "</w>" symbols in a random order: each demo run tokenized (and trained) anew
    from musubi_tuner.demo.bundles import CLIP_VOCAB, _train_clip_tokenizer

    again = _train_clip_tokenizer(CLIP_VOCAB).to_str(pretty=True)
    assert again == (k5_bundle.text_encoder_clip / "tokenizer.json").read_text(encoding="utf-8")
    assert again == _train_clip_tokenizer(CLIP_VOCAB).to_str(pretty=True)


def test_bpe_trainer_merges_the_most_frequent_pair_and_breaks_ties_by_text():
    from collections import Counter

    from musubi_tuner.demo.bpe import train_bpe

    words = Counter({"low": 5, "lower": 2, "newest": 6, "widest": 3})
    vocab, merges = train_bpe(words, 100, special_tokens=["<s>"], alphabet=["z"], suffix="</w>")
    # counted by hand: (e,s) 9 ties (s,t</w>) 9 -> (e,s); (es,t</w>) 9; (l,o) 7; (e,w) 6 ties (n,e), (w,es) 6 -> (e,w)
    assert merges[:4] == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w")]
    chars = sorted("lowernstidz")
    assert list(vocab)[: 1 + len(chars)] == ["<s>", *chars]  # special, sorted alphabet, then end-of-word symbols
    assert list(vocab)[1 + len(chars) : 1 + len(chars) + 3] == ["r</w>", "t</w>", "w</w>"]
    assert sorted(vocab.values()) == list(range(len(vocab))) and {"newest</w>", "widest</w>", "low</w>"} <= set(vocab)
    small, few = train_bpe(words, len(vocab) - 3, special_tokens=["<s>"], alphabet=[], suffix="</w>")
    assert len(small) == len(vocab) - 3 and few == merges[: len(few)]


def test_vae_directory_and_single_file_hold_the_same_weights(k5_bundle: K5Bundle):
    from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo.from_pretrained(k5_bundle.vae)
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == pytest.approx(0.476986)
    assert vae.config.temporal_compression_ratio == 4 and vae.config.spatial_compression_ratio == 8
    single = load_file(str(k5_bundle.vae_file))
    ref = vae.state_dict()
    assert set(single) == set(ref)
    assert all(torch.equal(single[k], ref[k]) for k in ref)
    flux = AutoencoderKL.from_pretrained(k5_bundle.flux_vae)
    assert flux.config.latent_channels == 16 and flux.config.scaling_factor == pytest.approx(0.3611)


def test_bundle_is_reused_and_protects_other_dirs(k5_bundle: K5Bundle, tmp_path):
    again = write_k5_bundle(k5_bundle.root, task=k5_bundle.task, seed=k5_bundle.seed)
    assert again == k5_bundle
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a tiny K5 bundle"):
        write_k5_bundle(other)
    assert (other / "keep.txt").read_text() == "x"
    with pytest.raises(UserError, match="not a tiny K5 bundle"):
        write_k5_bundle(k5_bundle.root, task=k5_bundle.task, seed=k5_bundle.seed + 1)


def _decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_synthetic_videos_decode_with_pyav(synthetic_video_dataset):
    ds = synthetic_video_dataset
    videos = sorted(ds.video_dir.glob("*.mp4"))
    assert len(videos) == 4
    for path in videos:
        frames = _decode(path)
        assert len(frames) == ds.frames == 17
        assert frames[0].shape == (64, 64, 3)
        caption = (path.with_suffix(".txt")).read_text(encoding="utf-8").strip()
        assert caption == ds.captions[path.stem]
        color = caption.split()[1]
        # the named colour is on screen (lossy codec: within a tolerance)
        dist = np.abs(frames[0].astype(int) - np.array(RGB[color])).sum(-1)
        assert (dist < 40).sum() > 20, caption
    # "moving right": the shape's centre of mass moves right between the first and last frame
    moving = [p for p in videos if "moving right" in ds.captions[p.stem] or "moving left" in ds.captions[p.stem]]
    for path in moving:
        frames = _decode(path)
        color = np.array(RGB[ds.captions[path.stem].split()[1]])
        xs = [np.nonzero(np.abs(f.astype(int) - color).sum(-1) < 40)[1].mean() for f in (frames[0], frames[-1])]
        assert (xs[1] > xs[0]) == ("right" in ds.captions[path.stem])


def test_synthetic_images_and_tomls(synthetic_video_dataset):
    from musubi_tuner.dataset.config import resolve_datasets

    ds = synthetic_video_dataset
    stills = sorted(ds.image_dir.glob("*.png"))
    assert len(stills) == 4 and all(p.with_suffix(".txt").is_file() for p in stills)
    assert Image.open(ds.start_image).size == (64, 64)
    first = _decode(ds.video_dir / "clip_000.mp4")[0]
    assert np.abs(np.asarray(Image.open(ds.start_image)).astype(int) - first.astype(int)).mean() < 8
    (video,) = resolve_datasets(ds.video_toml, architecture="k5")
    assert video.is_video and video.target_frames == (17,) and video.frame_extraction == "head"
    assert video.resolution == (64, 64) and video.cache_directory == str(ds.video_cache_dir)
    (image,) = resolve_datasets(ds.image_toml, architecture="k5")
    assert not image.is_video and image.cache_directory == str(ds.image_cache_dir)


def test_synthetic_dataset_is_deterministic_and_atomic(tmp_path):
    a = write_synthetic_video_dataset(tmp_path / "a", n_videos=1, n_images=1, frames=5, size=(32, 48), seed=7)
    b = write_synthetic_video_dataset(tmp_path / "b", n_videos=1, n_images=1, frames=5, size=(32, 48), seed=7)
    assert a.captions == b.captions
    fa, fb = _decode(a.video_dir / "clip_000.mp4"), _decode(b.video_dir / "clip_000.mp4")
    assert len(fa) == 5 and fa[0].shape == (48, 32, 3)
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb))
    with pytest.raises(UserError, match="not empty"):
        write_synthetic_video_dataset(tmp_path / "a")
    with pytest.raises(UserError, match="multiples of 16"):
        write_synthetic_video_dataset(tmp_path / "c", size=(30, 30))
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
