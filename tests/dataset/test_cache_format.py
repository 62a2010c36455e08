"""Cache names, keys, metadata and batch-key assembly (specs/dataset.md §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from musubi_tuner.dataset.batching import assemble_batch, pad_varlen, stratified_pool
from musubi_tuner.dataset.cache_format import (
    batch_key,
    cache_key,
    latent_cache_path,
    latent_metadata,
    parse_latent_cache_name,
    read_header,
    save_cache,
    te_cache_path,
)
from musubi_tuner.utils.errors import UserError


def test_file_names_and_parsing():
    p = latent_cache_path("/c", "img_1", (640, 480), "qi")
    assert p == Path("/c/img_1_0640x0480_qi.safetensors")
    v = latent_cache_path("/c", "my_vid", (1920, 1080), "k5", clip=(48, 25))
    assert v.name == "my_vid_00048-025_1920x1080_k5.safetensors"
    assert latent_cache_path("/c", "v", (64, 48), "fp", clip=(0, 9), section=2).name == "v_00000-009-2_0064x0048_fp.safetensors"
    assert te_cache_path("/c", "my_vid", "k5").name == "my_vid_k5_te.safetensors"
    parsed = parse_latent_cache_name(v, "k5", video=True)
    assert (parsed.stem, parsed.width, parsed.height, parsed.start, parsed.count) == ("my_vid", 1920, 1080, 48, 25)
    assert parse_latent_cache_name(p, "qi", video=False).stem == "img_1"
    assert parse_latent_cache_name(p, "k5", video=False) is None


def test_tensor_keys_and_batch_keys():
    assert cache_key("latents", torch.zeros(16, 3, 4, 5, dtype=torch.bfloat16)) == "latents_3x4x5_bfloat16"
    assert cache_key("latents_control_0", torch.zeros(32, 4, 5)) == "latents_control_0_4x5_float32"
    assert cache_key("varlen_t5", torch.zeros(7, 8, dtype=torch.float16)) == "varlen_t5_float16"
    assert cache_key("llm_mask", torch.zeros(7, dtype=torch.bool)) == "llm_mask"
    assert cache_key("f_indices", torch.zeros(2, dtype=torch.int32)) == "f_indices_int32"
    assert batch_key("latents_3x4x5_bfloat16") == ("latents", False)
    assert batch_key("latents_image_2x4x5_float8_e4m3fn") == ("latents_image", False)
    assert batch_key("latents_control_1_4x5_float32") == ("latents_control_1", False)
    assert batch_key("varlen_vl_embed_bfloat16") == ("vl_embed", True)
    assert batch_key("varlen_attention_mask") == ("attention_mask", True)
    assert batch_key("attention_mask") == ("attention_mask", False)
    assert batch_key("clip_float8_e5m2") == ("clip", False)


def test_save_cache_metadata_and_nan_replacement(tmp_path, project_log):
    path = tmp_path / "a_0064x0048_k5.safetensors"
    lat = torch.ones(4, 1, 2, 2)
    lat[0, 0, 0, 0] = float("nan")
    save_cache(path, {"latents": lat}, latent_metadata("kandinsky5", 64, 48))
    entries, md = read_header(path)
    assert md == {"architecture": "kandinsky5", "width": "64", "height": "48", "format_version": "1.0.1"}
    assert entries["latents_1x2x2_float32"]["shape"] == [4, 1, 2, 2]
    with safe_open(str(path), "pt") as f:
        t = f.get_tensor("latents_1x2x2_float32")
    assert t[0, 0, 0, 0] == 0 and t.sum() == 15
    assert "NaN" in project_log.text and str(path) in project_log.text


def test_assemble_and_pad_varlen():
    items = [
        {"latents_1x2x2_float32": torch.full((3, 1, 2, 2), float(i)), "varlen_t5_float32": torch.ones(i + 2, 4)} for i in range(3)
    ]
    batch = assemble_batch(items)
    assert batch["latents"].shape == (3, 3, 1, 2, 2) and batch["latents"][2].eq(2).all()
    assert [t.shape[0] for t in batch["t5"]] == [2, 3, 4]
    padded, mask = pad_varlen(batch["t5"])
    assert padded.shape == (3, 4, 4)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False], [True] * 4]
    assert padded[0, 2:].eq(0).all() and padded[2].eq(1).all()


def test_a_batch_of_caches_with_different_keys_is_refused_whichever_comes_first():
    plain = {"latents_1x2x2_float32": torch.zeros(3, 1, 2, 2)}
    extra = {**plain, "f_indices_int32": torch.tensor([0, 9], dtype=torch.int32)}
    for items, files, bad in (([plain, extra], ["a.safetensors", "b.safetensors"], "b.safetensors"),
                              ([extra, plain], ["b.safetensors", "a.safetensors"], "a.safetensors")):  # fmt: skip
        with pytest.raises(UserError, match=rf"{bad}: cache key 'f_indices_int32'"):
            assemble_batch(items, files)


def test_stratified_pool_counts():
    import random

    pool = stratified_pool(10, 4, random.Random(0))
    assert len(pool) == 10 and all(0 <= u < 1 for u in pool)
    counts = [sum(k / 4 <= u < (k + 1) / 4 for u in pool) for k in range(4)]
    assert sorted(counts) == [2, 2, 3, 3]
    assert stratified_pool(10, 4, random.Random(0)) == pool
