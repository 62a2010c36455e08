"""End to end: a video dataset through cache_latents and the text cacher with trivial encoders written here, then
the training DatasetGroup (batches per bucket, varlen lists, shuffling, timesteps, validation split, stale caches)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
import torch.nn.functional as F
from dataset_media_helpers import write_image, write_toml, write_video

from musubi_tuner.dataset.batching import pad_varlen
from musubi_tuner.dataset.cache_format import read_header
from musubi_tuner.dataset.config import load_dataset_group
from musubi_tuner.dataset.latent_caching import LatentBatch, add_latent_cache_args, cache_latents
from musubi_tuner.dataset.text_caching import TextItem, add_text_cache_args, cache_text_encoder_outputs
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import UserError


class ToyVAE:
    """avg-pool 8x spatially; time: first frame alone, then groups of 4 -> (C, (F-1)/4+1, H/8, W/8)."""

    def __init__(self):
        self.batches: list[LatentBatch] = []

    def __call__(self, batch: LatentBatch) -> list[dict[str, torch.Tensor]]:
        self.batches.append(batch)
        x = batch.pixels  # (B, C, F, H, W)
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        first = F.avg_pool3d(x[:, :, :1], (1, 8, 8))
        rest = [F.avg_pool3d(x[:, :, 1:], (4, 8, 8))] if x.shape[2] > 1 else []
        lat = torch.cat([first, *rest], dim=2)
        return [{"latents": lat[i], "latents_image": lat[i, :, :1]} for i in range(x.shape[0])]


class ToyTextEncoder:
    """One 4-dim embedding per word (variable length) + a pooled vector; records what the driver passed."""

    def __init__(self):
        self.calls: list[list[TextItem]] = []

    def __call__(self, items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
        self.calls.append(items)
        out = []
        for it in items:
            n = len(it.caption.split())
            emb = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) + (100.0 if it.is_video else 0.0)
            out.append({"varlen_embed": emb, "pooled": emb.mean(0)})
        return out


def latent_args(cfg, *extra):
    return add_latent_cache_args(argparse.ArgumentParser()).parse_args(
        ["--dataset_config", str(cfg), "--vae", "toy", "--num_workers", "2", *extra]
    )


def text_args(cfg, *extra):
    return add_text_cache_args(argparse.ArgumentParser()).parse_args(["--dataset_config", str(cfg), *extra])


@pytest.fixture
def project(tmp_path):
    vid, img, cache = tmp_path / "vid", tmp_path / "img", tmp_path / "cache"
    write_video(vid / "long.mp4", 30)
    write_video(vid / "mid.mp4", 12)
    write_video(vid / "short.mp4", 5)
    for stem, caption in [("long", "a long clip of light"), ("mid", "mid clip"), ("short", "short")]:
        (vid / f"{stem}.txt").write_text(caption)
    write_image(img / "val.png", (80, 64))
    (img / "val.txt").write_text("a validation image")
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
[general]
resolution = [64, 48]
caption_extension = ".txt"
batch_size = 2

[[datasets]]
video_directory = "{vid}"
cache_directory = "{cache}"
target_frames = [1, 9]

[[datasets]]
image_directory = "{img}"
validation = true
""",
    )
    return tmp_path, cfg, cache


def test_video_end_to_end(project, project_log):
    root, cfg, cache = project
    cache.mkdir()
    (cache / "old_00000-009_0064x0048_k5.safetensors").write_bytes(b"stale")
    (cache / "long_00000-009_0064x0048_wan.safetensors").write_bytes(b"other architecture")
    (cache / "gone_k5_te.safetensors").write_bytes(b"stale te")

    vae = ToyVAE()
    cache_latents(latent_args(cfg), architecture="k5", encode=vae)
    names = sorted(p.name for p in cache.glob("*_k5.safetensors"))
    assert names == [
        "long_00000-001_0064x0048_k5.safetensors",
        "long_00000-009_0064x0048_k5.safetensors",
        "mid_00000-001_0064x0048_k5.safetensors",
        "mid_00000-009_0064x0048_k5.safetensors",
        "short_00000-001_0064x0048_k5.safetensors",
    ]
    assert (cache / "long_00000-009_0064x0048_wan.safetensors").exists()  # other architectures untouched
    # the clip table printed before caching: items per (bucket, frame count)
    assert re.search(r"64x48\s+1\s+3\n.*64x48\s+9\s+2", project_log.text)
    # batches never mix frame counts; the batch size of the config is used
    assert sorted((b.pixels.shape[0], b.frame_count) for b in vae.batches if b.is_video) == [(1, 1), (2, 1), (2, 9)]
    entries, md = read_header(cache / "long_00000-009_0064x0048_k5.safetensors")
    assert md == {"architecture": "kandinsky5", "width": "64", "height": "48", "format_version": "1.0.1", "frame_count": "9"}
    assert entries["latents_3x6x8_float32"]["shape"] == [3, 3, 6, 8]
    assert entries["latents_image_1x6x8_float32"]["shape"] == [3, 1, 6, 8]
    # the clip is the first 9 frames, in order: brightness 8*i decoded back through the toy VAE
    from safetensors.torch import load_file

    lat = load_file(str(cache / "long_00000-009_0064x0048_k5.safetensors"))["latents_3x6x8_float32"]
    expected = [0 / 127.5 - 1, ((8 + 16 + 24 + 32) / 4) / 127.5 - 1, ((40 + 48 + 56 + 64) / 4) / 127.5 - 1]
    assert torch.allclose(lat.mean(dim=(0, 2, 3)), torch.tensor(expected), atol=0.03)
    # the image dataset (validation) is cached in its own directory, 80x64 cropped to the 64x48 bucket
    img_cache = root / "img" / "val_0080x0064_k5.safetensors"
    assert read_header(img_cache)[0]["latents_1x6x8_float32"]["shape"] == [3, 1, 6, 8]

    te = ToyTextEncoder()
    cache_text_encoder_outputs(text_args(cfg), architecture="k5", encode=te)
    assert not (cache / "gone_k5_te.safetensors").exists()
    assert sorted(p.name for p in cache.glob("*_te.safetensors")) == [
        "long_k5_te.safetensors",
        "mid_k5_te.safetensors",
        "short_k5_te.safetensors",
    ]
    assert {it.stem: it.is_video for call in te.calls for it in call} == {"long": True, "mid": True, "short": True, "val": False}
    assert all(len({it.is_video for it in call}) == 1 for call in te.calls)  # image and video never share a call
    entries, md = read_header(cache / "long_k5_te.safetensors")
    assert md["caption1"] == "a long clip of light" and md["architecture"] == "kandinsky5"
    assert entries["varlen_embed_float32"]["shape"] == [5, 4] and entries["pooled_float32"]["shape"] == [4]

    group = load_dataset_group(cfg, architecture="k5", training=True, seed=7, num_timestep_buckets=5)
    assert len(group) == 3 and group.num_train_items == 5
    seen = []
    for i in range(len(group)):
        batch = group[i]
        b = len(batch["item_keys"])
        f_lat = batch["latents"].shape[2]
        assert batch["latents"].shape == (b, 3, f_lat, 6, 8) and f_lat in (1, 3)
        assert batch["latents_image"].shape == (b, 3, 1, 6, 8)
        assert batch["pooled"].shape == (b, 4)
        assert isinstance(batch["embed"], list) and len(batch["embed"]) == b
        padded, mask = pad_varlen(batch["embed"])
        assert mask.sum(1).tolist() == [t.shape[0] for t in batch["embed"]]
        assert padded.shape[:2] == mask.shape
        assert len(batch["timesteps"]) == b and all(0 <= t < 1 for t in batch["timesteps"])
        seen.extend(batch["timesteps"])
    assert sorted(int(t * 5) for t in seen) == [0, 1, 2, 3, 4]  # one uniform per stratum

    # deterministic per epoch (resume reproduces the order), different across epochs
    other = load_dataset_group(cfg, architecture="k5", training=True, seed=7, num_timestep_buckets=5)
    orders = []
    for epoch in (1, 2, 3, 4):
        group.set_current_epoch(epoch)
        other.set_current_epoch(epoch)
        keys = [group[i]["item_keys"] for i in range(len(group))]
        assert keys == [other[i]["item_keys"] for i in range(len(other))]
        assert [group[i]["timesteps"] for i in range(len(group))] == [other[i]["timesteps"] for i in range(len(other))]
        orders.append(keys)
    assert any(o != orders[0] for o in orders[1:])

    val = load_dataset_group(cfg, architecture="k5", training=False, validation=True)
    assert len(val) == 1 and val[0]["latents"].shape == (1, 3, 1, 6, 8) and val[0]["timesteps"] is None
    assert [d.is_validation for d in val.datasets] == [True]


def test_skip_existing_reencodes_mismatched_metadata(project, project_log):
    _, cfg, cache = project
    cache_latents(latent_args(cfg), architecture="k5", encode=ToyVAE())
    vae = ToyVAE()
    cache_latents(latent_args(cfg, "--skip_existing"), architecture="k5", encode=vae)
    assert vae.batches == []
    target = cache / "mid_00000-001_0064x0048_k5.safetensors"
    save_safetensors_atomic(
        {"latents_1x6x8_float32": torch.zeros(3, 1, 6, 8)}, target, {"architecture": "wan", "format_version": "1.0.1"}
    )
    cache_latents(latent_args(cfg, "--skip_existing", "--batch_size", "1"), architecture="k5", encode=vae)
    assert [it.cache_path.name for b in vae.batches for it in b.items] == [target.name]
    assert read_header(target)[1]["architecture"] == "kandinsky5"


def test_training_rejects_foreign_caches_and_reports_empty_dirs(project):
    root, cfg, cache = project
    cache.mkdir()
    with pytest.raises(UserError, match=r"no cached items found \(searched .*cache/\*_k5\.safetensors"):
        load_dataset_group(cfg, architecture="k5", training=True)
    lat = cache / "a_00000-001_0064x0048_k5.safetensors"
    save_safetensors_atomic(
        {"latents_1x6x8_float32": torch.zeros(3, 1, 6, 8)}, lat, {"architecture": "kandinsky5", "format_version": "0.9"}
    )
    save_safetensors_atomic(
        {"pooled_float32": torch.zeros(4)}, cache / "a_k5_te.safetensors", {"architecture": "kandinsky5", "format_version": "1.0.1"}
    )
    with pytest.raises(
        UserError,
        match=r"a_00000-001_0064x0048_k5\.safetensors: cache does not match .*format_version expected '1\.0\.1', found '0\.9'",
    ):
        load_dataset_group(cfg, architecture="k5", training=True)


def test_te_cache_merge_keeps_other_keys_and_drops_stale_dtypes(project, project_log):
    _, cfg, cache = project
    cache.mkdir()
    te_path = cache / "long_k5_te.safetensors"
    save_safetensors_atomic(
        {"other_float32": torch.ones(2), "pooled_float16": torch.ones(4, dtype=torch.float16)},
        te_path,
        {"architecture": "kandinsky5", "format_version": "1.0.1", "caption1": "old caption"},
    )
    cache_text_encoder_outputs(text_args(cfg), architecture="k5", encode=ToyTextEncoder())
    entries, md = read_header(te_path)
    assert set(entries) == {"other_float32", "pooled_float32", "varlen_embed_float32"}
    assert md["caption1"] == "a long clip of light"
    assert "caption changed" in project_log.text
    te = ToyTextEncoder()
    cache_text_encoder_outputs(text_args(cfg, "--skip_existing"), architecture="k5", encode=te)
    assert te.calls == []
    cache_text_encoder_outputs(
        text_args(cfg, "--skip_existing"), architecture="k5", encode=te, extra_metadata={"template": "video"}
    )
    assert sum(len(c) for c in te.calls) == 4 and read_header(te_path)[1]["template"] == "video"


def test_corrupt_video_fails_or_is_skipped(project, project_log):
    root, cfg, cache = project
    (root / "vid" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 200)
    (root / "vid" / "broken.txt").write_text("broken")
    with pytest.raises(UserError, match=r"broken\.mp4: cannot (open|decode) video"):
        cache_latents(latent_args(cfg), architecture="k5", encode=ToyVAE())
    cache_latents(latent_args(cfg, "--skip_corrupt"), architecture="k5", encode=ToyVAE())
    assert "broken.mp4" in project_log.text and "--skip_corrupt" in project_log.text
    assert len(list(cache.glob("*_k5.safetensors"))) == 5


def test_jsonl_images_with_controls_and_debug_image_mode(tmp_path):
    data = tmp_path / "data"
    write_image(data / "a.png", (96, 64))
    write_image(data / "b.png", (64, 96))
    write_image(data / "a_ctl.png", (40, 40), color=(0, 255, 0))
    write_image(data / "b_ctl.png", (40, 40), color=(0, 0, 255))
    rows = [
        {"image_path": "a.png", "caption": "a", "control_path": "a_ctl.png"},
        {"image_path": "b.png", "caption": "b", "control_path": "b_ctl.png"},
    ]
    (data / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nimage_jsonl_file = "{data / "m.jsonl"}"\ncache_directory = "{tmp_path / "cache"}"\n'
        "resolution = 64\nenable_bucket = true\ncontrol_resolution = 32\nbatch_size = 2\n",
    )

    def encode(batch: LatentBatch):
        assert len(batch.controls) == 1 and batch.controls[0].shape[-2:] == (32, 32)
        return [
            {"latents": batch.pixels[i, :, :, ::8, ::8], "latents_control_0": batch.controls[0][i, :, :, ::8, ::8]}
            for i in range(len(batch.items))
        ]

    args = latent_args(cfg, "--debug_mode", "image", "--debug_dir", str(tmp_path / "dbg"))
    cache_latents(args, architecture="qie", encode=encode)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "dbg" / "datasets_0").iterdir()) == [
        "a.png",
        "a_control0.png",
        "b.png",
        "b_control0.png",
    ]

    cache_latents(latent_args(cfg), architecture="qie", encode=encode)
    buckets = [(w, (64 * 64 // w) // 16 * 16) for w in range(32, 80, 16)]  # bucket set of 64x64, step 16
    buckets = sorted({*buckets, *((h, w) for w, h in buckets)})
    for name, (w, h) in [("a_0096x0064_qie", (96, 64)), ("b_0064x0096_qie", (64, 96))]:
        bw, bh = min(buckets, key=lambda x, a=w / h: abs(x[0] / x[1] - a))
        shapes = {k: v["shape"] for k, v in read_header(tmp_path / "cache" / f"{name}.safetensors")[0].items()}
        assert shapes == {
            f"latents_1x{bh // 8}x{bw // 8}_float32": [3, 1, bh // 8, bw // 8],
            "latents_control_0_1x4x4_float32": [3, 1, 4, 4],
        }


def test_debug_console_prints_items_and_writes_nothing(project, capsys):
    _, cfg, cache = project
    cache_latents(
        latent_args(cfg, "--debug_mode", "console", "--console_width", "8", "--console_num_images", "1"),
        architecture="k5",
        encode=ToyVAE(),
    )
    out = capsys.readouterr().out
    assert "long_00000-009" in out and "short_00000-001" in out and "▀" in out
    assert not cache.exists() or not list(cache.iterdir())
