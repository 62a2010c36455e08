"""FLF2V training (specs/wan.md §8): ``wan_cache_latents.py --task flf2v-14B`` caches the first + last frame condition
and both frames' CLIP tokens; the trainer's DiT input from that cache equals what the FLF2V generator builds from the
same two frames; training runs and an I2V cache is refused by name."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.configs import get_task_config

TASK = get_task_config("flf2v-14B")


@pytest.fixture(scope="module")
def flf2v(tmp_path_factory):
    from musubi_tuner.demo.wan_bundle import write_wan_bundle
    from musubi_tuner.wan_cache_latents import main as cache_latents
    from musubi_tuner.wan_cache_text_encoder_outputs import main as cache_text

    root = tmp_path_factory.mktemp("flf2v")
    bundle = write_wan_bundle(root / "bundle", task="flf2v-14B", seed=0)
    ds = write_synthetic_video_dataset(root / "data", n_videos=2, n_images=0, seed=3)
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(bundle.vae), "--device", "cpu", "--vae_dtype",
                   "float32", "--task", "flf2v-14B", "--clip", str(bundle.clip)])  # fmt: skip
    cache_text(["--dataset_config", str(ds.video_toml), "--t5", str(bundle.t5), "--device", "cpu"])
    return bundle, ds


def _first_cached_item(ds):
    """The pixels the latent cacher encoded for one clip (the shared driver's planner and loader) and its cache file."""
    from musubi_tuner.dataset.architectures import arch_info
    from musubi_tuner.dataset.config import resolve_datasets
    from musubi_tuner.dataset.latent_caching import plan_dataset

    params = resolve_datasets(ds.video_toml, architecture="wan")[0]
    with ThreadPoolExecutor(1) as pool:
        planner, groups = plan_dataset(params, arch_info("wan"), skip_corrupt=False, pool=pool)
        loaded = planner.load(groups[0])[0]
    return loaded.pixels, loaded.item.cache_path


def _png(pixels: torch.Tensor, path):
    arr = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
    return path


def test_training_input_equals_the_flf2v_generator_layout(flf2v, tmp_path):
    from musubi_tuner.wan.generate.conditions import image_condition
    from musubi_tuner.wan.text_encoders import WanClipEncoder
    from musubi_tuner.wan.training import build_dit_kwargs
    from musubi_tuner.wan.vae import load_wan_vae

    bundle, ds = flf2v
    pixels, cache_path = _first_cached_item(ds)
    _, frames, h, w = pixels.shape
    cache = load_file(str(cache_path))
    lat_key = next(k for k in cache if k.startswith("latents_") and not k.startswith("latents_image"))
    y_cached = cache[lat_key.replace("latents_", "latents_image_")]
    assert cache["clip_float16"].shape[:2] == (2, 257)  # first, last (the tiny CLIP is narrower than 1280)

    # the generator, given the clip's first and last frames as start / end images
    vae = load_wan_vae(bundle.vae, kind=TASK.vae, dtype=torch.float32, device="cpu")
    clip = WanClipEncoder.load(bundle.clip, dtype=torch.float32, device="cpu")
    first, last = _png(pixels[:, 0], tmp_path / "first.png"), _png(pixels[:, -1], tmp_path / "last.png")
    y_gen, clip_gen, _ = image_condition(TASK, vae, clip, first, last, frames, w, h, "cpu")

    # the trainer's DiT input from the cache
    noisy = torch.randn(1, 16, *y_cached.shape[1:])
    batch = {"latents_image": y_cached[None], "clip": cache["clip_float16"][None], "t5": [torch.randn(3, 32)]}
    kw = build_dit_kwargs(TASK, 36, noisy, batch, torch.tensor([500.0]), torch.device("cpu"))
    assert kw["y"].shape == (1, 20, *y_gen.shape[1:])
    torch.testing.assert_close(kw["y"][0], y_gen, rtol=0, atol=1e-4)
    assert kw["y"][0, :4, 0].eq(1).all() and kw["y"][0, 3, -1].eq(1).all() and kw["y"][0, :4, 1:-1].eq(0).all()
    assert kw["clip_fea"].shape == clip_gen.shape and clip_gen.shape[:2] == (2, 257)  # the DiT's (2B, 257, width)
    torch.testing.assert_close(kw["clip_fea"].float(), clip_gen.half().float(), rtol=0, atol=1e-3)
    assert (clip_gen[0] - clip_gen[1]).abs().max() > 1e-3  # two different frames, not one twice


def test_flf2v_trains_and_refuses_an_i2v_cache(flf2v, tmp_path):
    from musubi_tuner.wan.trainer import WanNetworkTrainer
    from musubi_tuner.wan.training import build_dit_kwargs
    from musubi_tuner.wan_train_network import setup_parser

    bundle, ds = flf2v
    argv = ["--task", "flf2v-14B", "--dit", str(bundle.dit), "--dataset_config", str(ds.video_toml), "--network_module",
            "networks.lora_wan", "--network_dim", "4", "--output_dir", str(tmp_path), "--output_name", "flf",
            "--max_data_loader_n_workers", "0", "--seed", "1", "--dit_dtype", "float32", "--max_train_steps", "2"]  # fmt: skip
    WanNetworkTrainer().train(setup_parser().parse_args(argv))
    sd = load_file(str(tmp_path / "flf.safetensors"))
    assert any("cross_attn_k_img" in k for k in sd)
    i2v_batch = {"latents_image": torch.zeros(1, 20, 2, 4, 4), "clip": torch.zeros(1, 257, 1280), "t5": [torch.zeros(3, 32)]}
    with pytest.raises(UserError, match="--task flf2v-14B"):
        build_dit_kwargs(TASK, 36, torch.zeros(1, 16, 2, 4, 4), i2v_batch, torch.tensor([1.0]), torch.device("cpu"))
    with pytest.raises(UserError, match="re-cache with --task i2v-14B"):
        flf_batch = {**i2v_batch, "clip": torch.zeros(1, 2, 257, 1280)}
        build_dit_kwargs(get_task_config("i2v-14B"), 36, torch.zeros(1, 16, 2, 4, 4), flf_batch, torch.tensor([1.0]), "cpu")
