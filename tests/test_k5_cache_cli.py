"""The two Kandinsky 5 caching scripts end to end on the tiny bundle: file names, keys, shapes, I2V image latents,
--nabla_resize, --skip_existing, templates and token budgets in the TE cache, errors, and the root wrappers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from musubi_tuner.dataset.architectures import arch_info
from musubi_tuner.dataset.cache_format import latent_metadata, save_cache, te_metadata
from musubi_tuner.dataset.config import load_dataset_group, resolve_datasets
from musubi_tuner.dataset.loading import ItemPlanner
from musubi_tuner.dataset.sources import list_items
from musubi_tuner.kandinsky5.caching import nabla_size, text_batch, text_from_batch
from musubi_tuner.kandinsky5.text_encoders import format_prompt, template_prefix
from musubi_tuner.kandinsky5.vae import FLUX_VAE_SCALING_FACTOR, HUNYUAN_VAE_SCALING_FACTOR, load_k5_vae
from musubi_tuner.kandinsky5_cache_latents import main as cache_latents_main
from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main as cache_te_main

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, datasets: list[dict], *, resolution=(64, 64), enable_bucket: bool = True) -> Path:
    """A dataset TOML: ``[general]`` + one ``[[datasets]]`` per dict (values written as TOML literals)."""

    def lit(v):
        if isinstance(v, (str, Path)):
            return '"' + str(v).replace("\\", "\\\\") + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return str(v)

    lines = [
        "[general]",
        f"resolution = {lit(list(resolution))}",
        'caption_extension = ".txt"',
        "batch_size = 1",
        f"enable_bucket = {lit(enable_bucket)}",
    ]
    for d in datasets:
        lines += ["", "[[datasets]]"] + [f"{k} = {lit(v)}" for k, v in d.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def video_ds(data, cache: Path, frames: int = 17) -> dict:
    return {"video_directory": data.video_dir, "cache_directory": cache, "target_frames": [frames], "frame_extraction": "head"}


def image_ds(data, cache: Path) -> dict:
    return {"image_directory": data.image_dir, "cache_directory": cache}


def te_args(bundle, config: Path, *extra: str) -> list[str]:
    return [
        "--dataset_config",
        str(config),
        "--text_encoder_qwen",
        str(bundle.text_encoder_qwen),
        "--text_encoder_clip",
        str(bundle.text_encoder_clip),
        "--device",
        "cpu",
        "--num_workers",
        "1",
        *extra,
    ]


def lat_args(config: Path, vae: Path, *extra: str) -> list[str]:
    return ["--dataset_config", str(config), "--vae", str(vae), "--device", "cpu", "--num_workers", "2", *extra]


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def stamp(paths) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def exit_error(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def video_caches(k5_bundle, synthetic_video_dataset, tmp_path_factory):
    """Latent (posterior mode, fp32) and TE caches of the 4 synthetic clips, written once for this module."""
    root = tmp_path_factory.mktemp("k5_video_caches")
    config = write_config(root / "video.toml", [video_ds(synthetic_video_dataset, root / "cache")])
    cache_latents_main(lat_args(config, k5_bundle.vae, "--vae_dtype", "float32", "--vae_posterior", "mode"))
    cache_te_main(te_args(k5_bundle, config))
    return config, root / "cache"


def test_latent_cache_names_keys_and_shapes(video_caches, synthetic_video_dataset):
    config, cache = video_caches
    (params,) = resolve_datasets(config, architecture="k5")
    w, h = synthetic_video_dataset.size
    frames = synthetic_video_dataset.frames
    files = sorted(cache.glob("*_k5.safetensors"))
    assert [f.name for f in files] == [f"clip_{i:03d}_00000-{frames:03d}_{w:04d}x{h:04d}_k5.safetensors" for i in range(4)]
    bucket = ItemPlanner(params, arch_info("k5")).selector.select((w, h))
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, bucket[1] // 8, bucket[0] // 8
    tensors, md = read(files[0])
    assert set(tensors) == {
        f"latents_{lat_f}x{lat_h}x{lat_w}_float32",
        f"latents_image_2x{lat_h}x{lat_w}_float32",
        "vae_scaling_factor_float32",
    }
    assert tensors[f"latents_{lat_f}x{lat_h}x{lat_w}_float32"].shape == (16, lat_f, lat_h, lat_w)
    assert tensors[f"latents_image_2x{lat_h}x{lat_w}_float32"].shape == (16, 2, lat_h, lat_w)
    assert float(tensors["vae_scaling_factor_float32"]) == pytest.approx(HUNYUAN_VAE_SCALING_FACTOR)
    assert md == latent_metadata("kandinsky5", w, h, frames)


def test_latents_image_are_first_and_last_pixel_frames_encoded_alone(video_caches, k5_bundle):
    """Posterior mode makes the cache deterministic, so it can be recomputed from the loaded pixels."""
    config, cache = video_caches
    (params,) = resolve_datasets(config, architecture="k5")
    planner = ItemPlanner(params, arch_info("k5"))
    source = next(s for s in list_items(params) if s.stem == "clip_000")
    (loaded,) = planner.load(planner.plan(source))
    pixels = loaded.pixels[None]  # (1, 3, 17, H, W), exactly what the driver handed to encode
    vae = load_k5_vae(k5_bundle.vae, dtype=torch.float32)
    video = vae.encode_video(pixels, sample=False)[0]
    first = vae.encode_video(pixels[:, :, :1], sample=False)[0, :, 0]
    last = vae.encode_video(pixels[:, :, -1:], sample=False)[0, :, 0]

    tensors, _ = read(next(cache.glob("clip_000_*_k5.safetensors")))
    latents = next(v for k, v in tensors.items() if k.startswith("latents_5x"))
    image = next(v for k, v in tensors.items() if k.startswith("latents_image_"))
    torch.testing.assert_close(latents, video, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(image[:, 0], first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(image[:, 1], last, rtol=1e-4, atol=1e-4)
    # the last latent frame of the clip summarises 4 pixel frames: not the same as the last frame encoded alone
    assert not torch.allclose(image[:, 1], latents[:, -1], atol=1e-3)


def test_te_cache_varlen_keys_valid_length_and_video_template(video_caches, k5_bundle, synthetic_video_dataset):
    _, cache = video_caches
    tok = AutoTokenizer.from_pretrained(k5_bundle.text_encoder_qwen)
    crop = len(tok(template_prefix("video"), add_special_tokens=False)["input_ids"])
    for stem, caption in synthetic_video_dataset.captions.items():
        if not stem.startswith("clip_"):
            continue
        tensors, md = read(cache / f"{stem}_k5_te.safetensors")
        assert set(tensors) == {"varlen_text_embeds_bfloat16", "varlen_pooled_embed_bfloat16", "varlen_attention_mask"}
        full = tok(format_prompt(caption, "video"), add_special_tokens=False)["input_ids"]
        valid = len(full) - crop  # prompt tokens + <|im_end|>
        assert tensors["varlen_text_embeds_bfloat16"].shape == (valid, k5_bundle.dit_config["in_text_dim"])
        assert tensors["varlen_pooled_embed_bfloat16"].shape == (k5_bundle.dit_config["in_text_dim2"],)
        assert tensors["varlen_attention_mask"].dtype == torch.bool and tensors["varlen_attention_mask"].all()
        assert tensors["varlen_attention_mask"].shape == (valid,)
        assert md["caption1"] == caption and md["architecture"] == "kandinsky5"
        assert (md["k5_template"], md["k5_qwen_max_length"], md["k5_crop_start"]) == ("video", "256", str(crop))


def test_training_batches_read_varlen_and_upstream_text_caches(video_caches, synthetic_video_dataset, tmp_path):
    config, cache = video_caches
    # ours: varlen lists, padded by text_batch with a key mask
    two = write_config(tmp_path / "b2.toml", [{**video_ds(synthetic_video_dataset, cache), "batch_size": 2}])
    group = load_dataset_group(two, architecture="k5", training=False)
    batch = group[0]
    assert isinstance(batch["text_embeds"], list) and len(batch["text_embeds"]) == 2
    embeds, mask, pooled = text_batch(batch)
    lengths = [t.shape[0] for t in batch["text_embeds"]]
    assert embeds.shape[:2] == (2, max(lengths)) and mask.sum(1).tolist() == lengths and pooled.shape[0] == 2
    for i in range(2):
        emb, pool = text_from_batch(batch, i)
        torch.testing.assert_close(emb, batch["text_embeds"][i])
        torch.testing.assert_close(embeds[i, : lengths[i]], emb)

    # upstream musubi-tuner keys: text_embeds / pooled_embed / attention_mask (a padded one must be cropped)
    up = tmp_path / "upstream"
    up.mkdir()
    for lat in cache.glob("*_k5.safetensors"):
        shutil.copy(lat, up / lat.name)
    stems = sorted(s for s in synthetic_video_dataset.captions if s.startswith("clip_"))
    expected = {}
    for j, stem in enumerate(stems):
        t, _ = read(cache / f"{stem}_k5_te.safetensors")
        emb = t["varlen_text_embeds_bfloat16"]
        padded = torch.cat([emb, torch.full((3, emb.shape[1]), 7.0, dtype=emb.dtype)]) if j == 0 else emb
        m = torch.zeros(padded.shape[0], dtype=torch.bool)
        m[: emb.shape[0]] = True
        named = {"text_embeds": padded, "pooled_embed": t["varlen_pooled_embed_bfloat16"], "attention_mask": m}
        save_cache(up / f"{stem}_k5_te.safetensors", named, te_metadata("kandinsky5", synthetic_video_dataset.captions[stem]))
        expected[stem] = (emb, t["varlen_pooled_embed_bfloat16"])
    group = load_dataset_group(
        write_config(tmp_path / "up.toml", [video_ds(synthetic_video_dataset, up)]), architecture="k5", training=False
    )
    seen = set()
    for k in range(len(group)):
        batch = group[k]
        assert torch.is_tensor(batch["text_embeds"])  # upstream keys are stacked, not lists
        stem = Path(batch["item_keys"][0]).name.split("_00000-")[0]
        emb, pool = text_from_batch(batch, 0)
        torch.testing.assert_close(emb, expected[stem][0])
        torch.testing.assert_close(pool, expected[stem][1])
        seen.add(stem)
    assert seen == set(stems)


def test_nabla_resize_and_skip_existing(k5_bundle, synthetic_video_dataset, tmp_path, caplog):
    cache = tmp_path / "cache"
    # 144x64 buckets (bucketing off): not multiples of 128 in either direction
    config = write_config(
        tmp_path / "img.toml", [image_ds(synthetic_video_dataset, cache)], resolution=(144, 64), enable_bucket=False
    )
    base = lat_args(config, k5_bundle.vae, "--vae_dtype", "float32")
    cache_latents_main(base)
    files = sorted(cache.glob("*_k5.safetensors"))
    assert len(files) == 4 and all(f.name.endswith("_0064x0064_k5.safetensors") for f in files)  # original size
    assert "latents_1x8x18_float32" in read(files[0])[0]

    before = stamp(files)
    cache_latents_main(base + ["--skip_existing"])
    assert stamp(files) == before  # nothing rewritten

    with caplog.at_level("INFO"):
        cache_latents_main(base + ["--nabla_resize", "--skip_existing"])
    nw, nh = nabla_size(144, 64)
    assert (nw, nh) == (256, 128)
    assert "resized to 256x128" in caplog.text
    for f in files:
        tensors, _ = read(f)
        lat = tensors[f"latents_1x{nh // 8}x{nw // 8}_float32"]
        assert lat.shape == (16, 1, 16, 32)
        image = tensors[f"latents_image_2x{nh // 8}x{nw // 8}_float32"]
        torch.testing.assert_close(image[:, 0], lat[:, 0])  # images: the latent duplicated
        torch.testing.assert_close(image[:, 1], lat[:, 0])
    assert stamp(files) != before  # switching --nabla_resize re-encoded despite --skip_existing


def test_seeded_posterior_samples_are_reproducible(k5_bundle, synthetic_video_dataset, tmp_path):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "img.toml", [image_ds(synthetic_video_dataset, cache)])
    runs = []
    for extra in (["--seed", "3"], ["--seed", "3"], ["--vae_posterior", "mode"]):
        cache_latents_main(lat_args(config, k5_bundle.vae, "--vae_dtype", "float32", *extra))
        runs.append(read(next(cache.glob("still_000_*_k5.safetensors")))[0]["latents_1x8x8_float32"])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], runs[2])  # sampled, not the mode


def copy_controls(data, dest: Path) -> Path:
    dest.mkdir()
    for png in data.image_dir.glob("*.png"):
        shutil.copy(png, dest / png.name)
    return dest


def test_image_model_training_uses_the_flux_vae(k5_bundle, synthetic_video_dataset, tmp_path, capsys):
    """Image Lite I2I: FLUX.1 VAE latents of the target and of the source (control) image."""
    cache = tmp_path / "cache"
    controls = copy_controls(synthetic_video_dataset, tmp_path / "controls")
    config = write_config(tmp_path / "img.toml", [{**image_ds(synthetic_video_dataset, cache), "control_directory": controls}])
    cache_latents_main(lat_args(config, k5_bundle.flux_vae, "--task", "k5-lite-i2i-hd", "--vae_posterior", "mode"))
    tensors, _ = read(next(cache.glob("still_000_*_k5.safetensors")))
    keys = {"latents_1x8x8_bfloat16", "latents_image_2x8x8_bfloat16", "latents_control_0_1x8x8_bfloat16"}  # FLUX default bf16
    assert keys <= set(tensors)
    assert float(tensors["vae_scaling_factor_float32"]) == pytest.approx(FLUX_VAE_SCALING_FACTOR)
    # the controls are copies of the targets: same pixels, same latents
    torch.testing.assert_close(tensors["latents_control_0_1x8x8_bfloat16"], tensors["latents_1x8x8_bfloat16"])

    err = exit_error(capsys, cache_latents_main, lat_args(config, k5_bundle.flux_vae, "--image_model_training", "--nabla_resize"))
    assert "--nabla_resize cannot be combined with --image_model_training" in err
    vconfig = write_config(tmp_path / "vid.toml", [video_ds(synthetic_video_dataset, tmp_path / "vcache")])
    err = exit_error(capsys, cache_latents_main, lat_args(vconfig, k5_bundle.flux_vae, "--task", "k5-lite-t2i-hd"))
    assert "datasets[0]" in err and "single images" in err
    assert not list((tmp_path / "vcache").glob("*.safetensors"))


def test_latent_cli_errors(k5_bundle, synthetic_video_dataset, tmp_path, capsys):
    config = write_config(tmp_path / "img.toml", [image_ds(synthetic_video_dataset, tmp_path / "cache")])
    err = exit_error(capsys, cache_latents_main, lat_args(config, tmp_path / "no_such_vae"))
    assert "no_such_vae" in err and "--vae" in err
    err = exit_error(capsys, cache_latents_main, lat_args(config, k5_bundle.vae, "--task", "k5-nope"))
    assert "unknown Kandinsky 5 task 'k5-nope'" in err and "k5-lite-t2v-5s-sd" in err
    err = exit_error(capsys, cache_latents_main, lat_args(config, k5_bundle.vae, "--vae_dtype", "int8"))
    assert "--vae_dtype" in err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_te_templates_per_dataset_and_rebuild_on_budget_change(k5_bundle, synthetic_video_dataset, tmp_path, caplog):
    vcache, icache = tmp_path / "v", tmp_path / "i"
    config = write_config(
        tmp_path / "both.toml",
        [video_ds(synthetic_video_dataset, vcache, frames=9), image_ds(synthetic_video_dataset, icache)],
    )
    cache_te_main(te_args(k5_bundle, config))
    vfiles, ifiles = sorted(vcache.glob("*_k5_te.safetensors")), sorted(icache.glob("*_k5_te.safetensors"))
    assert len(vfiles) == 4 and len(ifiles) == 4
    assert {read(f)[1]["k5_template"] for f in vfiles} == {"video"}
    assert {read(f)[1]["k5_template"] for f in ifiles} == {"image"}
    assert read(vfiles[0])[1]["k5_qwen_max_length"] == "256" and read(ifiles[0])[1]["k5_qwen_max_length"] == "512"

    before = stamp(vfiles + ifiles)
    cache_te_main(te_args(k5_bundle, config, "--skip_existing"))
    assert stamp(vfiles + ifiles) == before

    cache_te_main(te_args(k5_bundle, config, "--skip_existing", "--qwen_max_length", "4"))
    after = stamp(vfiles + ifiles)
    assert all(after[k] != before[k] for k in before)  # every cache rebuilt
    for f in vfiles + ifiles:
        tensors, md = read(f)
        assert md["k5_qwen_max_length"] == "4"
        assert tensors["varlen_text_embeds_bfloat16"].shape[0] == 4  # captions are longer than 4 tokens: truncated

    # --task sets the budget: a video task uses 256 for images too (the image template, as at inference for F = 1)
    cache_te_main(te_args(k5_bundle, config, "--skip_existing", "--task", "k5-lite-t2v-5s-sd"))
    assert read(ifiles[0])[1]["k5_qwen_max_length"] == "256" and read(ifiles[0])[1]["k5_template"] == "image"


def test_te_image_edit_training_shows_the_control_image(k5_bundle, synthetic_video_dataset, tmp_path, capsys):
    controls = copy_controls(synthetic_video_dataset, tmp_path / "controls")
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "edit.toml", [{**image_ds(synthetic_video_dataset, cache), "control_directory": controls}])
    cache_te_main(te_args(k5_bundle, config, "--image_edit_training"))
    tok = AutoTokenizer.from_pretrained(k5_bundle.text_encoder_qwen)
    caption = synthetic_video_dataset.captions["still_000"]
    tensors, md = read(cache / "still_000_k5_te.safetensors")
    assert md["k5_template"] == "image_edit"
    n_prompt = len(tok(caption, add_special_tokens=False)["input_ids"])
    # prompt, <|vision_start|>, 4 image tokens (64 px image at half size -> 56x56 minimum -> 2x2 merged), <|vision_end|>, <|im_end|>
    assert tensors["varlen_text_embeds_bfloat16"].shape[0] == n_prompt + 1 + 4 + 1 + 1

    plain = write_config(tmp_path / "plain.toml", [image_ds(synthetic_video_dataset, tmp_path / "c2")])
    err = exit_error(capsys, cache_te_main, te_args(k5_bundle, plain, "--image_edit_training"))
    assert "control" in err and "datasets[0]" in err
    err = exit_error(capsys, cache_te_main, te_args(k5_bundle, plain, "--image_edit_training", "--task", "k5-lite-t2v-5s-sd"))
    assert "k5-lite-i2i-hd" in err


def test_te_cli_errors(k5_bundle, synthetic_video_dataset, tmp_path, capsys):
    vconfig = write_config(tmp_path / "v.toml", [video_ds(synthetic_video_dataset, tmp_path / "cache")])
    err = exit_error(capsys, cache_te_main, te_args(k5_bundle, vconfig, "--task", "k5-unknown"))
    assert "unknown Kandinsky 5 task 'k5-unknown'" in err
    err = exit_error(capsys, cache_te_main, te_args(k5_bundle, vconfig, "--text_encoder_cpu", "--text_encoder_auto"))
    assert "--text_encoder_cpu and --text_encoder_auto are mutually exclusive" in err
    err = exit_error(capsys, cache_te_main, te_args(k5_bundle, vconfig, "--quantized_qwen", "--text_encoder_cpu"))
    assert "mutually exclusive" in err
    err = exit_error(capsys, cache_te_main, te_args(k5_bundle, vconfig, "--quantized_qwen"))
    try:
        import bitsandbytes  # noqa: F401

        assert "CUDA" in err
    except ImportError:
        assert "--quantized_qwen needs bitsandbytes" in err
    err = exit_error(capsys, cache_te_main, te_args(k5_bundle, vconfig, "--task", "k5-lite-t2i-hd"))
    assert "Image Lite" in err and "datasets[0]" in err
    err = exit_error(
        capsys,
        cache_te_main,
        te_args(k5_bundle, vconfig)[:2] + ["--text_encoder_qwen", str(tmp_path / "nope"), "--text_encoder_clip", "x"],
    )
    assert "nope" in err and "--text_encoder_qwen" in err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_root_wrappers_run_as_scripts(k5_bundle, synthetic_video_dataset, tmp_path):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "img.toml", [image_ds(synthetic_video_dataset, cache)])
    lat = subprocess.run(
        [sys.executable, "kandinsky5_cache_latents.py", *lat_args(config, k5_bundle.vae_file, "--num_workers", "1")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert lat.returncode == 0, lat.stderr
    tensors, _ = read(next(cache.glob("still_000_0064x0064_k5.safetensors")))
    assert "latents_1x8x8_float16" in tensors  # HunyuanVideo VAE default dtype fp16 (single-file VAE)
    te = subprocess.run(
        [sys.executable, "kandinsky5_cache_text_encoder_outputs.py", *te_args(k5_bundle, config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert te.returncode == 0, te.stderr
    assert read(cache / "still_000_k5_te.safetensors")[1]["k5_template"] == "image"
