"""Wan Fun-Control (``*-FC`` tasks) on a tiny bundle: control videos cached from a dataset's ``control_directory``, a
training step whose DiT input is ``[noisy 16, control latent 16, start image 16]`` (VideoX-Fun / musubi-tuner layout),
training-time samples with ``--cn`` and ``wan_generate_video.py --control_path``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
from musubi_tuner.utils.errors import UserError


@dataclass
class FcData:
    bundle: object
    config: Path
    controls: Path
    other_controls: Path
    cache: Path


@pytest.fixture(scope="module")
def fc_data(tmp_path_factory) -> FcData:
    """A t2v-1.3B-FC bundle; two 17-frame clips whose control videos (same stems) come from a second synthetic set."""
    from musubi_tuner.demo.wan_bundle import write_wan_bundle
    from musubi_tuner.wan_cache_latents import main as cache_latents
    from musubi_tuner.wan_cache_text_encoder_outputs import main as cache_text

    root = tmp_path_factory.mktemp("wan_fc")
    b = write_wan_bundle(root / "bundle", task="t2v-1.3B-FC", seed=0)
    ds = write_synthetic_video_dataset(root / "data", n_videos=2, n_images=0, seed=1)
    ctrl = write_synthetic_video_dataset(root / "ctrl", n_videos=2, n_images=0, seed=7)
    other = write_synthetic_video_dataset(root / "other", n_videos=1, n_images=0, seed=9)
    text = ds.video_toml.read_text()
    ds.video_toml.write_text(text + f"control_directory = {str(ctrl.root / 'videos')!r}\n".replace("'", '"'))
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(b.vae), "--task", "t2v-1.3B-FC", "--device", "cpu",
                   "--vae_dtype", "float32"])  # fmt: skip
    cache_text(["--dataset_config", str(ds.video_toml), "--t5", str(b.t5), "--device", "cpu"])
    return FcData(b, ds.video_toml, ctrl.root / "videos", other.root / "videos", ds.root / "cache")


def test_control_videos_are_cached_as_their_vae_latents(fc_data):
    from musubi_tuner.wan.generate.conditions import load_video
    from musubi_tuner.wan.vae import load_wan_vae

    files = sorted(fc_data.cache.rglob("clip_000*_wan.safetensors"))
    assert len(files) == 1
    cache = load_file(str(files[0]))
    assert sorted(cache) == ["latents_5x8x8_float32", "latents_control_5x8x8_float32"]
    vae = load_wan_vae(fc_data.bundle.vae, dtype=torch.float32)
    want = vae.encode(load_video(fc_data.controls / "clip_000.mp4", 64, 64, 17, "control")[None])[0]
    assert torch.allclose(cache["latents_control_5x8x8_float32"], want, atol=1e-4)
    assert not torch.allclose(cache["latents_control_5x8x8_float32"], cache["latents_5x8x8_float32"], atol=1e-2)


def test_fun_control_condition_layout():
    from musubi_tuner.wan.conditioning import fun_control_y
    from musubi_tuner.wan.configs import get_task_config
    from musubi_tuner.wan.training import build_dit_kwargs

    g = torch.Generator().manual_seed(0)
    ctrl, img = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 20, 3, 4, 4, generator=g)
    x = torch.randn(2, 16, 3, 4, 4, generator=g)
    batch = {
        "latents_control": ctrl,
        "latents_image": img,
        "t5": [torch.randn(3, 32), torch.randn(5, 32)],
        "clip": torch.zeros(2, 1),
    }
    y = build_dit_kwargs(get_task_config("i2v-14B-FC"), 48, x, batch, torch.tensor([500.0, 10.0]), torch.device("cpu"))["y"]
    assert y.shape == (2, 32, 3, 4, 4)
    assert torch.equal(y[:, :16], ctrl)  # control latent first
    assert torch.equal(y[:, 16:, :1], img[:, 4:, :1])  # then the start image's latent (mask dropped) on frame 0 ...
    assert not y[:, 16:, 1:].any()  # ... and zeros on the later frames
    del batch["latents_image"]
    y = build_dit_kwargs(get_task_config("t2v-1.3B-FC"), 48, x, batch, torch.tensor([1.0, 2.0]), torch.device("cpu"))["y"]
    assert torch.equal(y[:, :16], ctrl) and not y[:, 16:].any()  # no start image: zeros
    one = fun_control_y(ctrl[0], img[0, 4:])  # unbatched (generation): the same layout
    assert torch.equal(one[:16], ctrl[0]) and torch.equal(one[16:, :1], img[0, 4:, :1]) and not one[16:, 1:].any()


def test_training_step_feeds_noisy_control_and_start_channels_and_samples_with_cn(fc_data, tmp_path):
    from musubi_tuner.wan_train_network import main as train_main

    inputs: list[torch.Tensor] = []

    def record(module, args):
        if isinstance(module, torch.nn.Conv3d) and module.in_channels == 48 and torch.is_grad_enabled():
            inputs.append(args[0].detach().clone())

    prompts = tmp_path / "samples.txt"
    prompts.write_text(f"a red ball --w 64 --h 64 --f 5 --s 2 --cn {fc_data.controls / 'clip_001.mp4'}\n")
    b = fc_data.bundle
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train_main(["--task", "t2v-1.3B-FC", "--dit", str(b.dit), "--dataset_config", str(fc_data.config),
                    "--network_module", "networks.lora_wan", "--network_dim", "4", "--output_dir", str(tmp_path / "out"),
                    "--output_name", "fc", "--max_data_loader_n_workers", "0", "--dit_dtype", "float32",
                    "--max_train_steps", "1", "--seed", "3", "--sample_prompts", str(prompts), "--sample_at_first",
                    "--vae", str(b.vae), "--t5", str(b.t5)])  # fmt: skip
    finally:
        handle.remove()
    assert (tmp_path / "out" / "fc.safetensors").is_file()
    assert any(p.suffix == ".mp4" for p in (tmp_path / "out").rglob("*")), "the --cn sample was not written"
    assert len(inputs) == 1  # one training step (sampling runs without grad)
    x = inputs[0]
    controls = [load_file(str(f)) for f in sorted(fc_data.cache.rglob("*_wan.safetensors"))]
    ctrl = [c["latents_control_5x8x8_float32"] for c in controls]
    target = [c["latents_5x8x8_float32"] for c in controls]
    assert x.shape == (1, 48, 5, 8, 8)
    i = next(k for k in range(2) if torch.equal(x[0, 16:32], ctrl[k]))  # control latent of the batch's item
    assert not x[0, 32:].any()  # t2v-FC: no start image
    assert not torch.equal(x[0, :16], target[i]) and x[0, :16].std() > 0.1  # the noisy latent


def test_generate_with_control_video(fc_data, tmp_path):
    from musubi_tuner.wan_generate_video import main as generate

    b = fc_data.bundle
    common = ["--task", "t2v-1.3B-FC", "--dit", str(b.dit), "--vae", str(b.vae), "--t5", str(b.t5), "--prompt", "a ball",
              "--video_size", "64", "64", "--video_length", "5", "--infer_steps", "2", "--device", "cpu",
              "--output_type", "latent", "--seed", "5"]  # fmt: skip
    out = {}
    for name, video in (("a", fc_data.controls / "clip_000.mp4"), ("b", fc_data.other_controls / "clip_000.mp4")):
        generate([*common, "--control_path", str(video), "--save_path", str(tmp_path / name)])
        out[name] = next(iter(load_file(str(next((tmp_path / name).glob("*.safetensors")))).values()))
    assert out["a"].shape[-4:] == (16, 2, 8, 8)
    assert not torch.allclose(out["a"], out["b"])  # the control video steers the result
    from musubi_tuner.wan.generate.args import parse_args

    with pytest.raises(UserError, match="Fun-Control: give --control_path"):
        parse_args([*common, "--save_path", str(tmp_path / "c")])
