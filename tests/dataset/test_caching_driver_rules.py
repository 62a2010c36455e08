"""Caching-driver behaviour not covered by test_pipeline.py: source_fps + chunk end to end, short videos, control
videos padded to the main video, layered (RGBA) targets, control sizes, --batch_size overrides, num_repeats at
training time, --debug_mode video, --skip_corrupt on an image that fails only when decoded, TE caches of another
architecture, items without a TE cache, the architecture's bucket step."""

from __future__ import annotations

import argparse
import json

import av
import numpy as np
import pytest
import torch
from dataset_media_helpers import write_image, write_toml, write_video
from PIL import Image

from musubi_tuner.dataset.architectures import arch_info
from musubi_tuner.dataset.cache_format import read_header
from musubi_tuner.dataset.config import load_dataset_group, resolve_datasets
from musubi_tuner.dataset.latent_caching import LatentBatch, add_latent_cache_args, cache_latents
from musubi_tuner.dataset.loading import ItemPlanner
from musubi_tuner.dataset.sources import list_items
from musubi_tuner.dataset.text_caching import TextItem, add_text_cache_args, cache_text_encoder_outputs
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import UserError


class Recorder:
    """A trivial encoder: 8x8 average pooling of the pixels (and of the first control); records every batch."""

    def __init__(self):
        self.batches: list[LatentBatch] = []

    def __call__(self, batch: LatentBatch) -> list[dict[str, torch.Tensor]]:
        self.batches.append(batch)
        b, c, f, h, w = batch.pixels.shape
        lat = batch.pixels.reshape(b, c, f, h // 8, 8, w // 8, 8).mean(dim=(4, 6))
        out = [{"latents": lat[i]} for i in range(b)]
        for i, ctl in enumerate(batch.controls):
            for j in range(b):
                out[j][f"latents_control_{i}"] = ctl[j, :, :1, ::8, ::8]
        return out


def toy_text(items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
    return [{"varlen_embed": torch.ones(len(it.caption.split()), 4), "pooled": torch.zeros(4)} for it in items]


def latent_args(cfg, *extra):
    return add_latent_cache_args(argparse.ArgumentParser()).parse_args(
        ["--dataset_config", str(cfg), "--vae", "toy", "--num_workers", "2", *extra]
    )


def text_args(cfg, *extra):
    return add_text_cache_args(argparse.ArgumentParser()).parse_args(["--dataset_config", str(cfg), *extra])


def frame_levels(pixels: torch.Tensor) -> list[int]:
    """Per-frame mean of a (C, F, H, W) clip in [-1, 1], mapped back to 0..255 and divided by 8 (the test videos'
    frame i has level 8*i)."""
    return [round(float((pixels[:, f].mean() + 1) * 127.5) / 8) for f in range(pixels.shape[1])]


def test_source_fps_and_chunk_through_the_driver(tmp_path, project_log):
    vid, cache = tmp_path / "vid", tmp_path / "cache"
    write_video(vid / "long.mp4", 30)
    (vid / "long.txt").write_text("long")
    for i in range(3):  # a 3-frame folder: one frame left at half the frame rate, shorter than every target
        write_image(vid / "tiny" / f"{i:02d}.png", (64, 48))
    (vid / "tiny.txt").write_text("tiny")
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[general]\nresolution = [64, 48]\ncaption_extension = ".txt"\n[[datasets]]\nvideo_directory = "{vid}"\n'
        f'cache_directory = "{cache}"\ntarget_frames = [5]\nframe_extraction = "chunk"\nsource_fps = 48\n',
    )
    enc = Recorder()
    cache_latents(latent_args(cfg, "--batch_size", "1"), architecture="k5", encode=enc)  # Kandinsky 5: 24 fps
    # r = 24/48: source frame i is kept iff floor((i+1)/2) > floor(i/2), i.e. the odd frames -> 15 frames, 3 chunks of 5
    kept = [i for i in range(30) if (i + 1) // 2 > i // 2]
    assert kept == list(range(1, 30, 2))
    assert sorted(p.name for p in cache.glob("*_k5.safetensors")) == [
        f"long_{s:05d}-005_0064x0048_k5.safetensors" for s in (0, 5, 10)
    ]
    clips = {it.clip: frame_levels(b.pixels[0]) for b in enc.batches for it in b.items}
    assert clips == {(s, 5): kept[s : s + 5] for s in (0, 5, 10)}
    assert read_header(cache / "long_00005-005_0064x0048_k5.safetensors")[1]["frame_count"] == "5"
    assert "tiny: 1 frames (after fps conversion) is shorter than every target_frames [5]; skipped" in project_log.text


def test_jsonl_video_control_is_padded_or_trimmed_to_the_main_video(tmp_path):
    data = tmp_path / "data"
    write_video(data / "main.mp4", 9)
    write_video(data / "main2.mp4", 9)
    for i in range(3):  # control of main: 3 frames of levels 20, 21, 22
        write_image(data / "ctl" / f"{i}.png", (64, 48), color=(8 * (20 + i),) * 3)
    write_video(data / "ctl2.mp4", 20)  # control of main2: longer than the main video
    rows = [
        {"video_path": "main.mp4", "caption": "a", "control_path": "ctl"},
        {"video_path": "main2.mp4", "caption": "b", "control_path": "ctl2.mp4"},
    ]
    (data / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nvideo_jsonl_file = "{data / "m.jsonl"}"\ncache_directory = "{tmp_path / "cache"}"\n'
        "resolution = [64, 48]\ntarget_frames = [9]\n",
    )
    enc = Recorder()
    cache_latents(latent_args(cfg), architecture="wan", encode=enc)
    controls = {it.source.stem: b.controls[0][0] for b in enc.batches for it in b.items}
    assert frame_levels(controls["main"]) == [20, 21, 22] + [22] * 6  # padded with the last frame
    assert frame_levels(controls["main2"]) == list(range(9))  # trimmed to the main video's 9 frames
    header = read_header(tmp_path / "cache" / "main_00000-009_0064x0048_wan.safetensors")[0]
    assert header["latents_control_0_1x6x8_float32"]["shape"] == [3, 1, 6, 8]


def test_multiple_target_layers_reach_the_encoder_as_rgba_frames(tmp_path):
    img = tmp_path / "img"
    for name, level in [("item", 10), ("item_1", 20), ("item_2", 30)]:
        write_image(img / f"{name}.png", (32, 32), color=(8 * level,) * 3, mode="RGBA")  # alpha 128
    (img / "item.txt").write_text("layers")
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nimage_directory = "{img}"\ncaption_extension = ".txt"\nresolution = 32\nmultiple_target = true\n',
    )
    enc = Recorder()
    cache_latents(latent_args(cfg), architecture="qil", encode=enc)
    (batch,) = enc.batches
    assert batch.pixels.shape == (1, 4, 3, 32, 32)  # RGBA, one frame per layer, in order
    assert [round(float((batch.pixels[0, 0, f].mean() + 1) * 127.5) / 8) for f in range(3)] == [10, 20, 30]
    assert torch.allclose(batch.pixels[0, 3], torch.tensor(128 / 127.5 - 1), atol=1e-6)  # alpha kept
    assert read_header(img / "item_0032x0032_qil.safetensors")[0]["latents_3x4x4_float32"]["shape"] == [4, 3, 4, 4]


def test_jsonl_extra_targets_need_multiple_target(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image_path": "a.png", "image_path_0": "b.png", "caption": "x"}) + "\n")
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nimage_jsonl_file = "{tmp_path / "m.jsonl"}"\ncache_directory = "{tmp_path / "cache"}"\n',
    )
    (params,) = resolve_datasets(cfg, architecture="qi")
    with pytest.raises(UserError, match=r"m\.jsonl: line 1: fields image_path_0, .* need multiple_target = true"):
        list_items(params)


@pytest.mark.parametrize(
    "keys,expected_hw",
    [
        ("", (64, 64)),  # default: the item's bucket
        ("no_resize_control = true", (48, 32)),  # own size 40x56 floored to the step of 16
        ("qwen_image_edit_no_resize_control = true", (48, 32)),  # deprecated spelling, same behaviour
    ],
)
def test_control_image_sizes(tmp_path, keys, expected_hw):
    write_image(tmp_path / "a.png", (64, 64))
    write_image(tmp_path / "a_ctl.png", (40, 56))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image_path": "a.png", "caption": "a", "control_path": "a_ctl.png"}))
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nimage_jsonl_file = "{tmp_path / "m.jsonl"}"\ncache_directory = "{tmp_path / "cache"}"\n'
        f"resolution = 64\n{keys}\n",
    )
    enc = Recorder()
    cache_latents(latent_args(cfg), architecture="qie", encode=enc)
    assert tuple(enc.batches[0].controls[0].shape[-2:]) == expected_hw


@pytest.fixture
def image_project(tmp_path):
    img = tmp_path / "img"
    for i, stem in enumerate(["a", "b", "c"]):
        write_image(img / f"{stem}.png", (64, 48), color=(40 * (i + 1), 0, 0))
        (img / f"{stem}.txt").write_text(f"caption number {stem}")
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nimage_directory = "{img}"\ncaption_extension = ".txt"\nresolution = [64, 48]\n'
        "batch_size = 2\nnum_repeats = 2\n",
    )
    return img, cfg


def test_batch_size_overrides_and_num_repeats_at_training_time(image_project):
    img, cfg = image_project
    enc = Recorder()
    cache_latents(latent_args(cfg, "--batch_size", "1"), architecture="qi", encode=enc)
    assert [len(b.items) for b in enc.batches] == [1, 1, 1]  # --batch_size overrides the dataset's 2 for encoding
    calls = []

    def text(items):
        calls.append(len(items))
        return toy_text(items)

    cache_text_encoder_outputs(text_args(cfg, "--batch_size", "3"), architecture="qi", encode=text)
    assert calls == [3]

    group = load_dataset_group(cfg, architecture="qi", training=True, seed=1)
    assert group.num_train_items == 6  # 3 items x num_repeats 2
    loader = torch.utils.data.DataLoader(group, batch_size=1, shuffle=False, collate_fn=lambda x: x[0])
    keys = [k for batch in loader for k in batch["item_keys"]]
    assert len(loader) == 3 and sorted(keys) == sorted(str(p) for p in img.glob("*_qi.safetensors") for _ in range(2))
    for batch in loader:
        assert batch["latents"].shape == (len(batch["item_keys"]), 3, 1, 6, 8)
        assert isinstance(batch["embed"], list) and [t.shape for t in batch["embed"]] == [(3, 4)] * len(batch["item_keys"])


def test_debug_video_mode_writes_clips_as_mp4(tmp_path):
    vid = tmp_path / "vid"
    write_video(vid / "v.mp4", 12)
    (vid / "v.txt").write_text("v")
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nvideo_directory = "{vid}"\ncaption_extension = ".txt"\nresolution = [32, 32]\ntarget_frames = [9]\n',
    )
    out = tmp_path / "dbg"
    cache_latents(latent_args(cfg, "--debug_mode", "video", "--debug_dir", str(out)), architecture="k5", encode=Recorder())
    assert not list(vid.glob("*.safetensors"))
    (clip,) = (out / "datasets_0").iterdir()
    assert clip.name == "v_00000-009.mp4"
    with av.open(str(clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)  # resized + centre-cropped 64x48 -> 32x32


def test_skip_corrupt_image_that_fails_only_when_decoded_removes_its_old_cache(image_project, project_log):
    img, cfg = image_project
    cache_latents(latent_args(cfg), architecture="qi", encode=Recorder())
    assert len(list(img.glob("*_qi.safetensors"))) == 3
    noisy = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(img / "b.png")
    data = (img / "b.png").read_bytes()
    (img / "b.png").write_bytes(data[: len(data) // 2])  # header (size) readable, pixel data truncated
    with pytest.raises(UserError, match=r"b\.png: cannot decode image"):
        cache_latents(latent_args(cfg), architecture="qi", encode=Recorder())
    cache_latents(latent_args(cfg, "--skip_corrupt"), architecture="qi", encode=Recorder())
    assert "b.png: cannot decode image" in project_log.text and "--skip_corrupt" in project_log.text
    assert sorted(p.name for p in img.glob("*_qi.safetensors")) == ["a_0064x0048_qi.safetensors", "c_0064x0048_qi.safetensors"]


def test_te_cache_of_another_architecture_is_rewritten_and_missing_te_items_are_skipped(image_project, project_log):
    img, cfg = image_project
    cache_latents(latent_args(cfg), architecture="qi", encode=Recorder())
    foreign = img / "a_qi_te.safetensors"
    save_safetensors_atomic({"other_float32": torch.ones(2)}, foreign, {"architecture": "wan", "format_version": "1.0.1"})
    cache_text_encoder_outputs(text_args(cfg), architecture="qi", encode=toy_text)
    entries, md = read_header(foreign)
    assert set(entries) == {"varlen_embed_float32", "pooled_float32"} and md["architecture"] == "qwen_image"  # not merged
    assert "a_qi_te.safetensors: existing TE cache rewritten (architecture expected 'qwen_image', found 'wan')" in (
        project_log.text
    )
    (img / "b_qi_te.safetensors").unlink()
    group = load_dataset_group(cfg, architecture="qi", training=True)
    assert group.num_train_items == 4  # a and c, twice each; b has no text-encoder cache
    assert "1 latent caches without a text-encoder cache (<stem>_qi_te.safetensors) were skipped" in project_log.text


@pytest.mark.parametrize("arch,bucket", [("k5", (96, 48)), ("ho1", (96, 32))])
def test_bucket_step_comes_from_the_architecture(tmp_path, arch, bucket):
    write_image(tmp_path / "img" / "a.png", (100, 60))
    (tmp_path / "img" / "a.txt").write_text("a")
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncaption_extension = ".txt"\nresolution = 512\n'
        "enable_bucket = true\nbucket_no_upscale = true\n",
    )
    (params,) = resolve_datasets(cfg, architecture=arch)
    (item,) = ItemPlanner(params, arch_info(arch)).plan(list_items(params)[0])
    # no upscale: the own size floored to the step (16 for Kandinsky 5, 32 for HiDream-O1)
    step = 32 if arch == "ho1" else 16
    assert item.bucket == bucket == (100 // step * step, 60 // step * step)
    assert item.cache_path.name == f"a_0100x0060_{arch}.safetensors"


def test_missing_jsonl_media_fails_or_is_skipped(tmp_path, project_log):
    write_image(tmp_path / "a.png", (32, 32))
    rows = [{"image_path": "a.png", "caption": "a"}, {"image_path": "gone.png", "caption": "b"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nimage_jsonl_file = "{tmp_path / "m.jsonl"}"\ncache_directory = "{tmp_path / "cache"}"\nresolution = 32\n',
    )
    with pytest.raises(UserError, match=r"gone\.png: file not found"):
        cache_latents(latent_args(cfg), architecture="qi", encode=Recorder())
    cache_latents(latent_args(cfg, "--skip_corrupt"), architecture="qi", encode=Recorder())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["a_0032x0032_qi.safetensors"]
    assert "gone.png: file not found (skipped: --skip_corrupt)" in project_log.text


def test_items_sharing_a_name_are_rejected(tmp_path):
    write_image(tmp_path / "img" / "a.png", (32, 32))
    write_image(tmp_path / "img" / "a.jpg", (32, 32))
    (tmp_path / "img" / "a.txt").write_text("a")
    cfg = write_toml(tmp_path / "c.toml", f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncaption_extension = ".txt"\n')
    (params,) = resolve_datasets(cfg, architecture="qi")
    with pytest.raises(UserError, match=r"datasets\[0\]: two items share the name 'a' \(.*a\.jpg and .*a\.png\)"):
        list_items(params)


def test_keep_cache_keeps_caches_of_removed_items(image_project):
    img, cfg = image_project
    cache_latents(latent_args(cfg), architecture="qi", encode=Recorder())
    cache_text_encoder_outputs(text_args(cfg), architecture="qi", encode=toy_text)
    (img / "c.png").unlink()
    (img / "c.txt").unlink()
    cache_latents(latent_args(cfg, "--keep_cache"), architecture="qi", encode=Recorder())
    cache_text_encoder_outputs(text_args(cfg, "--keep_cache"), architecture="qi", encode=toy_text)
    assert (img / "c_0064x0048_qi.safetensors").exists() and (img / "c_qi_te.safetensors").exists()
    cache_latents(latent_args(cfg), architecture="qi", encode=Recorder())
    cache_text_encoder_outputs(text_args(cfg), architecture="qi", encode=toy_text)
    assert sorted(p.name for p in img.glob("*.safetensors")) == [
        "a_0064x0048_qi.safetensors",
        "a_qi_te.safetensors",
        "b_0064x0048_qi.safetensors",
        "b_qi_te.safetensors",
    ]
