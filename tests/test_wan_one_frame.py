"""Wan one-frame training and inference (wan.one_frame; musubi-tuner's one-frame mode on the 2.1 I2V model):
``wan_cache_latents.py --one_frame`` on an image dataset with control images writes the one-frame keys; the trainer's
DiT input from that cache (RoPE time indices, condition, CLIP tokens) equals what the generator builds for the same
images and options; the loss covers the generated frame only; ``--one_frame_inference`` / ``--of`` write one image;
bad option strings are one error naming the option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.configs import get_task_config
from musubi_tuner.wan.one_frame import OneFrameOptions, parse_one_frame_options

TASK = get_task_config("i2v-14B")
SIZE = 32
OPTIONS = "target_index=9,control_index=0"


@pytest.fixture(scope="module")
def one_frame_data(tmp_path_factory, wan_i2v_bundle):
    """Two 32x32 target images, one control image each, cached with --one_frame (target 9, clean [0])."""
    from musubi_tuner.wan_cache_latents import main as cache_latents
    from musubi_tuner.wan_cache_text_encoder_outputs import main as cache_text

    root = tmp_path_factory.mktemp("one_frame")
    images, controls = root / "images", root / "controls"
    images.mkdir()
    controls.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(images / f"item{i}.png")
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(controls / f"item{i}.png")
        (images / f"item{i}.txt").write_text(f"a picture number {i}")
    toml = root / "dataset.toml"
    toml.write_text(
        f'[general]\nresolution = [{SIZE}, {SIZE}]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n\n'
        f'[[datasets]]\nimage_directory = "{images}"\ncontrol_directory = "{controls}"\ncache_directory = "{root / "cache"}"\n'
        "fp_1f_target_index = 9\nfp_1f_clean_indices = [0]\nfp_1f_no_post = true\n"
    )
    b = wan_i2v_bundle
    cache_latents(["--dataset_config", str(toml), "--vae", str(b.vae), "--device", "cpu", "--vae_dtype", "float32",
                   "--task", "i2v-14B", "--clip", str(b.clip), "--one_frame"])  # fmt: skip
    cache_text(["--dataset_config", str(toml), "--t5", str(b.t5), "--device", "cpu"])
    return root, toml


def _cache(root, i=0):
    return load_file(str(next((root / "cache").glob(f"item{i}_*_wan.safetensors"))))


def _pixels(path):
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None, :, None] / 127.5 - 1.0  # (1, 3, 1, H, W)


def test_cache_keys_and_layout(one_frame_data, wan_i2v_bundle):
    from musubi_tuner.wan.vae import load_wan_vae

    root, _ = one_frame_data
    cache = _cache(root)
    h = SIZE // 8
    assert {"latents_2x4x4_float32", "latents_image_2x4x4_float32", "clip_float16", "f_indices_int32"} <= set(cache)
    assert cache["f_indices_int32"].tolist() == [0, 9]
    y, lat = cache["latents_image_2x4x4_float32"], cache["latents_2x4x4_float32"]
    assert y.shape == (20, 2, h, h) and cache["clip_float16"].shape[0] == 257
    assert y[:4, 0].eq(1).all() and y[:4, 1].eq(0).all()  # control frame given, target frame generated
    vae = load_wan_vae(wan_i2v_bundle.vae, kind=TASK.vae, dtype=torch.float32, device="cpu")
    control = vae.encode(_pixels(root / "controls" / "item0.png"))[0, :, 0]
    target = vae.encode(_pixels(root / "images" / "item0.png"))[0, :, 0]
    blank = vae.encode(torch.zeros(1, 3, 1, SIZE, SIZE))[0, :, 0]
    torch.testing.assert_close(y[4:, 0], control, rtol=0, atol=1e-4)
    torch.testing.assert_close(lat[:, 0], control, rtol=0, atol=1e-4)
    torch.testing.assert_close(lat[:, 1], target, rtol=0, atol=1e-4)
    torch.testing.assert_close(y[4:, 1], blank, rtol=0, atol=1e-4)


def test_training_input_equals_the_generator_and_loss_is_on_the_target_frame(one_frame_data, wan_i2v_bundle):
    from musubi_tuner.wan.generate.conditions import one_frame_condition
    from musubi_tuner.wan.models.dit import rope_axis_dims, rope_cos_sin
    from musubi_tuner.wan.models.loading import load_dit
    from musubi_tuner.wan.text_encoders import WanClipEncoder
    from musubi_tuner.wan.trainer import WanNetworkTrainer
    from musubi_tuner.wan.training import build_dit_kwargs
    from musubi_tuner.wan.vae import load_wan_vae

    root, _ = one_frame_data
    b = wan_i2v_bundle
    cache = _cache(root)
    vae = load_wan_vae(b.vae, kind=TASK.vae, dtype=torch.float32, device="cpu")
    clip = WanClipEncoder.load(b.clip, dtype=torch.float32, device="cpu")
    control = root / "controls" / "item0.png"
    options = parse_one_frame_options(OPTIONS)
    y_gen, clip_gen = one_frame_condition(TASK, vae, clip, control, None, None, options, SIZE, SIZE, "cpu")

    batch = {
        "latents_image": cache["latents_image_2x4x4_float32"][None],
        "clip": cache["clip_float16"][None],
        "f_indices": cache["f_indices_int32"][None],
        "t5": [torch.randn(3, 32)],
    }
    latents = cache["latents_2x4x4_float32"][None]
    noise = torch.randn_like(latents)
    kw = build_dit_kwargs(TASK, 36, 0.5 * latents + 0.5 * noise, batch, torch.tensor([500.0]), torch.device("cpu"))
    assert kw["frame_indices"].tolist() == [list(options.frame_indices)] == [[0, 9]]
    torch.testing.assert_close(kw["y"][0], y_gen, rtol=0, atol=1e-4)
    torch.testing.assert_close(kw["clip_fea"][0].float(), clip_gen[0].half().float(), rtol=0, atol=1e-3)

    # RoPE: the generated frame's time angle is 9·θ_k, written out here
    dit = load_dit(TASK, b.dit, device="cpu", dtype=torch.float32)
    head = dit.dim // dit.num_heads
    cos, _ = rope_cos_sin((2, 2, 2), head, torch.device("cpu"), time_positions=[0, 9])
    at = rope_axis_dims(head)[0]
    theta = [10000.0 ** (-2 * k / at) for k in range(at // 2)]
    row = 2 * 2  # first token of latent frame 1
    assert cos[0, row, 0, : at // 2].tolist() == pytest.approx([math.cos(9 * t) for t in theta], abs=1e-6)

    # the trainer's step: prediction and target of the generated frame only
    trainer = WanNetworkTrainer()
    trainer.task = TASK

    class _Acc:
        device = torch.device("cpu")

    noisy = kw["x"]
    out = trainer.call_dit(None, _Acc(), dit, latents, batch, noise, noisy, torch.tensor([500.0]), torch.float32)
    full = dit(noisy, torch.tensor([500.0]), batch["t5"], kw["clip_fea"], kw["y"], frame_indices=kw["frame_indices"])
    assert out.pred.shape == (1, 16, 1, 4, 4)
    torch.testing.assert_close(out.pred, full[:, :, 1:2].float())
    torch.testing.assert_close(out.target, (noise - latents)[:, :, 1:2])
    plain = dit(noisy, torch.tensor([500.0]), batch["t5"], kw["clip_fea"], kw["y"])
    assert (plain[:, :, 1] - full[:, :, 1]).abs().max() > 1e-5  # index 9, not 1: the RoPE position reaches the model

    # per-sample indices in one batch give what each sample gets alone
    other = dit(noisy, torch.tensor([500.0]), batch["t5"], kw["clip_fea"], kw["y"], frame_indices=[0, 5])
    both = dit(noisy.expand(2, -1, -1, -1, -1), torch.tensor([500.0, 500.0]), batch["t5"] * 2, kw["clip_fea"].expand(2, -1, -1),
               kw["y"].expand(2, -1, -1, -1, -1), frame_indices=torch.tensor([[0, 9], [0, 5]]))  # fmt: skip
    torch.testing.assert_close(both, torch.cat([full, other]), rtol=1e-5, atol=1e-5)


def test_one_frame_training_runs(one_frame_data, wan_i2v_bundle, tmp_path):
    from musubi_tuner.wan.trainer import WanNetworkTrainer
    from musubi_tuner.wan_train_network import setup_parser

    _, toml = one_frame_data
    b = wan_i2v_bundle
    seen = []

    class Spy(WanNetworkTrainer):
        def call_dit(self, args, accelerator, transformer, latents, batch, *rest):
            out = super().call_dit(args, accelerator, transformer, latents, batch, *rest)
            seen.append((batch["f_indices"].tolist(), tuple(latents.shape), tuple(out.pred.shape)))
            return out

    root, _ = one_frame_data
    prompts = tmp_path / "samples.txt"
    prompts.write_text(f"a ball --w {SIZE} --h {SIZE} --s 2 --d 1 --i {root / 'controls' / 'item0.png'} --of {OPTIONS}\n")
    argv = ["--task", "i2v-14B", "--dit", str(b.dit), "--dataset_config", str(toml), "--network_module",
            "networks.lora_wan", "--network_dim", "4", "--output_dir", str(tmp_path), "--output_name", "of",
            "--max_data_loader_n_workers", "0", "--seed", "1", "--dit_dtype", "float32", "--max_train_steps", "2",
            "--one_frame", "--sample_prompts", str(prompts), "--sample_at_first", "--t5", str(b.t5), "--vae", str(b.vae),
            "--clip", str(b.clip)]  # fmt: skip
    Spy().train(setup_parser().parse_args(argv))
    assert seen and all(s == ([[0, 9]], (1, 16, 2, 4, 4), (1, 16, 1, 4, 4)) for s in seen)
    assert any("cross_attn_k_img" in k for k in load_file(str(tmp_path / "of.safetensors")))
    samples = list((tmp_path / "sample").iterdir())  # one image per sample prompt, not a video
    assert [f.suffix for f in samples] == [".png"], samples

    prompts.write_text(f"a ball --i {root / 'controls' / 'item0.png'}\n")
    with pytest.raises(UserError, match="need one-frame options on every prompt"):
        WanNetworkTrainer().train(setup_parser().parse_args(argv))


def test_generator_writes_one_image(one_frame_data, wan_i2v_bundle, tmp_path):
    from musubi_tuner.wan_generate_video import main as generate

    root, _ = one_frame_data
    b = wan_i2v_bundle
    control = root / "controls" / "item1.png"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --i {control} --ci {control} --of {OPTIONS} --d 1\n")
    generate(["--task", "i2v-14B", "--dit", str(b.dit), "--vae", str(b.vae), "--t5", str(b.t5), "--clip", str(b.clip),
              "--video_size", str(SIZE), str(SIZE), "--infer_steps", "2", "--device", "cpu", "--from_file", str(prompts),
              "--save_path", str(tmp_path / "gen")])  # fmt: skip
    files = sorted((tmp_path / "gen").iterdir())
    assert [f.suffix for f in files] == [".png"], files
    with Image.open(files[0]) as im:
        assert im.size == (SIZE, SIZE) and im.info.get("bt_one_frame_inference") == OPTIONS


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("target_index=9,no_8x", "'no_8x'"),
        ("target_index=nine", "'target_index=nine'"),
        ("control_index=0", "no target_index"),
        ("target_index=0,control_index=0", "target_index=0 is also a control index"),
        ("target_index=5,control_index=0;x", "'control_index=0;x'"),
        ("target_index=5000", "5000"),
    ],
)
def test_option_string_errors_name_the_option(text, msg):
    with pytest.raises(UserError, match=msg):
        parse_one_frame_options(text)


def test_option_string_meaning():
    o = parse_one_frame_options(" control_index=10;0 , target_index=5, no_2x,no_4x,no_post")
    assert o == OneFrameOptions(5, (10, 0)) and o.frame_indices == (0, 5, 10) and o.target_position == 1
    assert parse_one_frame_options("target_index=9").frame_indices == (0, 9)


def test_generator_refuses_bad_one_frame_input(wan_i2v_bundle, wan_t2v_bundle, tmp_path):
    from musubi_tuner.wan.generate.args import parse_args

    b = wan_i2v_bundle
    base = ["--task", "i2v-14B", "--dit", str(b.dit), "--vae", str(b.vae), "--t5", str(b.t5), "--clip", str(b.clip),
            "--prompt", "x", "--image_path", "i.png", "--save_path", str(tmp_path), "--video_size", "32", "32"]  # fmt: skip
    with pytest.raises(UserError, match="--one_frame_inference: unknown one-frame option 'foo=1'"):
        parse_args([*base, "--one_frame_inference", "target_index=3,foo=1"])
    with pytest.raises(UserError, match="--control_image_path needs --one_frame_inference"):
        parse_args([*base, "--control_image_path", "c.png"])
    with pytest.raises(UserError, match="--control_image_mask_path"):
        parse_args([*base, "--one_frame_inference", OPTIONS, "--control_image_mask_path", "m.png"])
    t = wan_t2v_bundle
    with pytest.raises(UserError, match="not t2v-1.3B"):
        parse_args(["--task", "t2v-1.3B", "--dit", str(t.dit), "--vae", str(t.vae), "--t5", str(t.t5), "--prompt", "x",
                    "--save_path", str(tmp_path), "--one_frame_inference", OPTIONS])  # fmt: skip


def test_cache_refuses_a_dataset_without_one_frame_keys_by_name(one_frame_data, wan_i2v_bundle, tmp_path, capsys):
    from musubi_tuner.wan_cache_latents import main as cache_latents

    root, toml = one_frame_data
    text = toml.read_text().replace(str(root / "cache"), str(tmp_path / "cache"))
    bad = tmp_path / "no_keys.toml"
    bad.write_text(text.replace("fp_1f_target_index = 9\n", ""))
    argv = ["--vae", str(wan_i2v_bundle.vae), "--device", "cpu", "--vae_dtype", "float32", "--task", "i2v-A14B", "--one_frame"]
    with pytest.raises(SystemExit) as exc:
        cache_latents(["--dataset_config", str(bad), *argv])
    assert (
        exc.value.code != 0 and "datasets[0]: one-frame caching (--one_frame) needs fp_1f_target_index" in capsys.readouterr().err
    )
    bad.write_text(text.replace("fp_1f_clean_indices = [0]", "fp_1f_clean_indices = [0, 4]"))
    with pytest.raises(SystemExit):
        cache_latents(["--dataset_config", str(bad), *argv])
    assert "fp_1f_clean_indices lists 2 clean frame(s) but the item has 1 control image(s)" in capsys.readouterr().err
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # nothing half-written
