"""Wan end to end on the tiny official-format bundles: caching scripts → trainer (T2V through ``accelerate launch`` of
the root wrapper, 2.1 I2V with CLIP, 2.2 A14B ``--expert both``) → ``wan_generate_video.py`` with the trained LoRAs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.trainer import WanNetworkTrainer
from musubi_tuner.wan.training import route_timesteps
from musubi_tuner.wan_train_network import main as train_main
from musubi_tuner.wan_train_network import setup_parser

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class WanData:
    config: Path
    start_image: Path
    root: Path


@pytest.fixture(scope="session")
def wan_data(tmp_path_factory, wan_i2v_bundle) -> WanData:
    """Two 17-frame 64x64 clips cached with the real scripts: latents + I2V condition + CLIP tokens, UMT5 states."""
    from musubi_tuner.wan_cache_latents import main as cache_latents
    from musubi_tuner.wan_cache_text_encoder_outputs import main as cache_text

    b = wan_i2v_bundle
    ds = write_synthetic_video_dataset(tmp_path_factory.mktemp("wan_train") / "data", n_videos=2, n_images=0, seed=1)
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(b.vae), "--device", "cpu", "--vae_dtype", "float32",
                   "--i2v", "--clip", str(b.clip)])  # fmt: skip
    cache_text(["--dataset_config", str(ds.video_toml), "--t5", str(b.t5), "--device", "cpu"])
    return WanData(ds.video_toml, ds.start_image, ds.root)


def argv(task: str, dit: Path, data: WanData, out: Path, *extra: str) -> list[str]:
    return [
        "--task", task, "--dit", str(dit), "--dataset_config", str(data.config), "--network_module", "networks.lora_wan",
        "--network_dim", "4", "--network_alpha", "4", "--output_dir", str(out), "--output_name", "wan",
        "--learning_rate", "1e-2", "--max_data_loader_n_workers", "0", "--seed", "1", "--dit_dtype", "float32",
        "--max_train_steps", "2", *extra,
    ]  # fmt: skip


def modules(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".", 1)[0] for k in f.keys()}


def test_cache_keys(wan_data):
    files = sorted((wan_data.root / "cache").rglob("*_wan.safetensors"))
    assert files
    with safe_open(str(files[0]), "pt") as f:
        keys = set(f.keys())
    assert {"latents_5x8x8_float32", "latents_image_5x8x8_float32", "clip_float16"} <= keys
    te = sorted((wan_data.root / "cache").rglob("*_wan_te.safetensors"))
    with safe_open(str(te[0]), "pt") as f:
        assert [k for k in f.keys()] == ["varlen_t5_bfloat16"]


def test_t2v_training_through_accelerate_launch(wan_data, wan_t2v_bundle, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_cpu_threads_per_process", "1",
           str(ROOT / "wan_train_network.py"), *argv("t2v-1.3B", wan_t2v_bundle.dit, wan_data, tmp_path, "--sdpa")]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lora = tmp_path / "wan.safetensors"
    names = modules(lora)
    assert len(names) == 2 * 10  # 2 blocks x (self q/k/v/o, cross q/k/v/o, ffn.0, ffn.2)
    assert "lora_unet_blocks_1_cross_attn_o" in names and "lora_unet_blocks_0_ffn_2" in names
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_wan_task"] == "t2v-1.3B"


def test_i2v_training_with_clip_tokens_saved_in_diffusers_layout(wan_data, wan_i2v_bundle, tmp_path):
    train_main(argv("i2v-14B", wan_i2v_bundle.dit, wan_data, tmp_path, "--lora_format", "diffusers"))
    with safe_open(str(tmp_path / "wan.safetensors"), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    names = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert len(names) == 2 * 12 and "transformer.blocks.0.attn2.add_k_proj" in names and "transformer.blocks.1.ffn.net.2" in names
    assert md["ss_lora_format"] == "diffusers"


class ExpertRecorder(WanNetworkTrainer):
    """The real trainer, recording which expert each step ran."""

    ran: list[str] = []

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype):
        expert = batch.get("_wan_expert")
        type(self).ran.append(expert)
        assert all((t >= 500.0) == (expert == "high") for t in timesteps.tolist())
        return super().call_dit(args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype)


@pytest.fixture(scope="session")
def a14b_loras(wan_data, wan_a14b_bundle, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("a14b_out")
    b = wan_a14b_bundle
    a = argv("i2v-A14B", b.dit, wan_data, out, "--expert", "both", "--dit_high_noise", str(b.dit_high_noise),
             "--timestep_boundary", "500", "--offload_inactive_dit", "--max_train_steps", "6")  # fmt: skip
    parser = setup_parser()
    ExpertRecorder.ran = []
    ExpertRecorder().train(parser.parse_args(a))
    return out, list(ExpertRecorder.ran)


def test_expert_both_writes_one_lora_per_expert(a14b_loras):
    out, ran = a14b_loras
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["wan_high_noise.safetensors", "wan_low_noise.safetensors"]
    assert set(ran) == {"high", "low"}, ran  # both experts were routed to within 6 steps (seed 1)
    for expert, rng in (("high", "500,1000"), ("low", "0,500")):
        path = out / f"wan_{expert}_noise.safetensors"
        with safe_open(str(path), "pt") as f:
            md = f.metadata()
        assert md["modelspec.timestep_range"] == rng and md["ss_wan_expert"] == expert and md["ss_wan_timestep_boundary"] == "0.5"
        sd = load_file(str(path))
        assert all(k.startswith("lora_unet_blocks_") for k in sd)
        # lora_up starts at zero: only the trained expert's file has moved
        assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_up" in k)


def _four_block_expert(path: Path, seed: int) -> Path:
    """A tiny i2v-A14B expert with 4 blocks (the bundle's 2 leave nothing to swap in training)."""
    import json

    from musubi_tuner.demo.wan_bundle import randomize_, tiny_dit_params
    from musubi_tuner.utils.atomic import save_safetensors_atomic
    from musubi_tuner.wan.models.dit import WanModel

    params = {**tiny_dit_params("i2v-A14B"), "num_layers": 4}
    model = WanModel(**params)
    randomize_(model, seed)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_safetensors_atomic(sd, path, metadata={"wan_dit_config": json.dumps(params, sort_keys=True)})
    return path


class SwapRecorder(WanNetworkTrainer):
    """The real trainer, recording per step: the expert, whether it swaps blocks, whether the other one does."""

    seen: list[tuple[str, bool, bool]] = []

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype):
        out = super().call_dit(args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype)
        e = batch["_wan_expert"]
        other = transformer.expert("low" if e == "high" else "high")
        type(self).seen.append((e, transformer.expert(e).blocks_to_swap, other.offloaders is not None))
        return out


def test_expert_both_with_block_swap_and_comfyui_files(wan_data, tmp_path):
    low, high = _four_block_expert(tmp_path / "low.safetensors", 0), _four_block_expert(tmp_path / "high.safetensors", 1)
    out = tmp_path / "out"
    a = argv("i2v-A14B", low, wan_data, out, "--expert", "both", "--dit_high_noise", str(high), "--timestep_boundary", "500",
             "--offload_inactive_dit", "--blocks_to_swap", "2", "--lora_format", "comfyui", "--max_train_steps", "6")  # fmt: skip
    SwapRecorder.seen = []
    SwapRecorder().train(setup_parser().parse_args(a))
    assert {e for e, *_ in SwapRecorder.seen} == {"high", "low"}, SwapRecorder.seen
    assert all(swapped == 2 and not other for _, swapped, other in SwapRecorder.seen)  # the active expert swaps 2 blocks
    for expert in ("high", "low"):
        path = out / f"wan_{expert}_noise.safetensors"
        with safe_open(str(path), "pt") as f:
            keys, md = list(f.keys()), f.metadata()
        assert md["ss_wan_expert"] == expert and md["ss_lora_format"] == "comfyui"
        assert all(k.startswith("diffusion_model.blocks.") and ".lora_" in k for k in keys)
        assert "diffusion_model.blocks.3.cross_attn.o.lora_A.weight" in keys and len(keys) == 4 * 10 * 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["wan_high_noise.safetensors", "wan_low_noise.safetensors"]


@pytest.mark.parametrize("value", ["875", "0.875"])
def test_expert_high_limits_timesteps_either_scale(value, wan_data, wan_a14b_bundle, tmp_path):
    b = wan_a14b_bundle
    args = setup_parser().parse_args(
        argv("t2v-A14B", b.dit_high_noise, wan_data, tmp_path, "--expert", "high", "--timestep_boundary", value)
    )
    trainer = WanNetworkTrainer()
    trainer.handle_model_specific_args(args)
    assert args.min_timestep == pytest.approx(875.0) and args.max_timestep is None
    md = trainer.extra_metadata(args)
    assert md["modelspec.timestep_range"] == "875,1000"


def test_two_expert_task_needs_explicit_expert(wan_data, wan_a14b_bundle, tmp_path):
    with pytest.raises(UserError, match="choose --expert both"):
        WanNetworkTrainer().handle_model_specific_args(
            setup_parser().parse_args(argv("i2v-A14B", wan_a14b_bundle.dit, wan_data, tmp_path))
        )
    with pytest.raises(UserError, match="--timestep_boundary '1500'"):
        setup_parser().parse_args(argv("i2v-A14B", wan_a14b_bundle.dit, wan_data, tmp_path, "--timestep_boundary", "1500"))


def test_route_timesteps_puts_the_batch_on_one_side():
    g = torch.Generator().manual_seed(0)
    t, expert = route_timesteps(torch.tensor([0.9, 0.1, 0.95, 0.3]), 0.875, lambda k: torch.rand(k, generator=g))
    assert expert == "high" and bool((t >= 0.875).all())
    t, expert = route_timesteps(torch.tensor([0.2, 0.99]), 0.875, lambda k: torch.rand(k, generator=g))
    assert expert == "low" and bool((t < 0.875).all())


def test_generate_a14b_with_expert_loras_and_batch_file(a14b_loras, wan_a14b_bundle, wan_data, tmp_path):
    from blissful_tuner.metadata import read_metadata
    from musubi_tuner.wan_generate_video import main as generate

    out, _ = a14b_loras
    b = wan_a14b_bundle
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"a red ball --w 48 --h 32 --f 5 --d 3 --i {wan_data.start_image}\nblue sky --w 32 --h 32 --f 1 --d 4 --i {wan_data.start_image}\n"
    )
    common = ["--task", "i2v-A14B", "--dit", str(b.dit), "--dit_high_noise", str(b.dit_high_noise), "--vae", str(b.vae),
              "--t5", str(b.t5), "--infer_steps", "3", "--save_path", str(tmp_path / "gen"), "--device", "cpu",
              "--lora_weight", str(out / "wan_low_noise.safetensors"),
              "--lora_weight_high_noise", str(out / "wan_high_noise.safetensors"), "--timestep_boundary", "0.9"]  # fmt: skip
    generate([*common, "--from_file", str(prompts)])
    files = sorted((tmp_path / "gen").iterdir())
    assert [f.suffix for f in files] == [".mp4", ".png"] or sorted(f.suffix for f in files) == [".mp4", ".png"]
    md = read_metadata(next(f for f in files if f.suffix == ".mp4"))
    assert (
        md["bt_task"] == "i2v-A14B" and md["bt_timestep_boundary"] == "0.9" and "wan_high_noise" in md["bt_lora_weight_high_noise"]
    )


def test_generate_refuses_flags_by_name(wan_t2v_bundle, tmp_path):
    from musubi_tuner.wan.generate.args import parse_args

    b = wan_t2v_bundle
    base = ["--task", "t2v-1.3B", "--dit", str(b.dit), "--vae", str(b.vae), "--t5", str(b.t5), "--prompt", "x",
            "--save_path", str(tmp_path), "--video_size", "32", "32", "--video_length", "5"]  # fmt: skip
    for extra, msg in (
        (["--one_frame_inference", "target_index=1"], "--one_frame_inference"),
        (["--sample_solver", "euler_a"], "euler_a is not implemented"),
        (["--save_merged_model", "m.safetensors"], "merge_lora.py"),
        (["--dit_high_noise", str(b.dit)], "two-expert"),
        (["--riflex_index", "6"], "--rope_func comfy"),
        (["--video_length", "6"], "4n\\+1"),
    ):
        with pytest.raises(UserError, match=msg):
            parse_args([*base, *extra])
    with pytest.raises(UserError, match="multiple of 16"):
        parse_args([*base[:-5], "--video_size", "40", "32", "--video_length", "5"])


def test_ti2v_5b_caches_trains_and_generates(tmp_path_factory, wan_data):
    """TI2V-5B: 48-channel latents from the Wan 2.2 VAE, per-token timesteps in training, first-frame conditioning."""
    from musubi_tuner.demo.wan_bundle import write_wan_bundle
    from musubi_tuner.wan_cache_latents import main as cache_latents
    from musubi_tuner.wan_cache_text_encoder_outputs import main as cache_text
    from musubi_tuner.wan_generate_video import main as generate

    root = tmp_path_factory.mktemp("ti2v")
    b = write_wan_bundle(root / "bundle", task="ti2v-5B", seed=0)
    ds = write_synthetic_video_dataset(root / "data", n_videos=1, n_images=0, seed=2)
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(b.vae22), "--task", "ti2v-5B", "--device", "cpu"])
    cache_text(["--dataset_config", str(ds.video_toml), "--t5", str(b.t5), "--device", "cpu"])
    files = sorted((root / "data").rglob("*_wan.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        assert [k for k in f.keys() if k.startswith("latents")] == ["latents_5x4x4_bfloat16"]  # 48 ch, ×16 spatial
        assert f.get_slice("latents_5x4x4_bfloat16").get_shape()[0] == 48
    out = root / "out"
    train_main(["--task", "ti2v-5B", "--dit", str(b.dit), "--dataset_config", str(ds.video_toml), "--network_module",
                "networks.lora_wan", "--network_dim", "4", "--output_dir", str(out), "--output_name", "ti2v",
                "--max_data_loader_n_workers", "0", "--dit_dtype", "float32", "--max_train_steps", "1"])  # fmt: skip
    assert len(modules(out / "ti2v.safetensors")) == 20
    generate(["--task", "ti2v-5B", "--dit", str(b.dit), "--vae", str(b.vae22), "--t5", str(b.t5), "--prompt", "a ball",
              "--image_path", str(wan_data.start_image), "--video_size", "64", "64", "--video_length", "5",
              "--infer_steps", "2", "--save_path", str(root / "gen"), "--device", "cpu", "--output_type", "latent"])  # fmt: skip
    latent = load_file(str(next((root / "gen").glob("*.safetensors"))))
    assert next(iter(latent.values())).shape[-4:] == (48, 2, 4, 4)
    from musubi_tuner.wan.generate.args import parse_args

    with pytest.raises(UserError, match="multiple of 32"):
        parse_args(["--task", "ti2v-5B", "--dit", str(b.dit), "--vae", str(b.vae22), "--t5", str(b.t5), "--prompt", "x",
                  "--video_size", "48", "64", "--video_length", "5", "--save_path", str(root / "gen")])  # fmt: skip


def test_text_cache_of_another_encoder_is_one_clear_error(wan_data, wan_t2v_bundle, tmp_path):
    import shutil

    from musubi_tuner.utils.atomic import save_safetensors_atomic

    data = tmp_path / "data"
    shutil.copytree(wan_data.root, data)
    config = data / wan_data.config.name
    config.write_text(wan_data.config.read_text().replace(str(wan_data.root), str(data)))
    for te in data.rglob("*_wan_te.safetensors"):
        with safe_open(str(te), "pt") as f:
            md, t = f.metadata(), f.get_tensor("varlen_t5_bfloat16")
        save_safetensors_atomic({"varlen_text_embeds_bfloat16": t}, te, md)
    args = setup_parser().parse_args(
        argv("t2v-1.3B", wan_t2v_bundle.dit, WanData(config, wan_data.start_image, data), tmp_path / "out")
    )
    with pytest.raises(UserError, match="_wan_te.safetensors\\) has no Wan T5 states"):
        WanNetworkTrainer().train(args)
