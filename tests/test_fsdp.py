"""FSDP2 sharded training on CPU (gloo): two processes against one, sharded resume, start-up errors, caching.

Kandinsky 5 is the full case (``ARCHS``: resume, sampling, validation, generator load); FLUX.2, Qwen-Image and Wan
T2V are light cases (``LIGHT_ARCHS``: sharding, per-item losses and final LoRA), all trained in one torchrun launch. Noise and timesteps are fixed per item
(``dist_harness.py``), which makes two processes with one batch each and one process accumulating both batches see
the same global batch: with SGD the per-item losses must agree to 1e-5 (relative) and the LoRA weights to 1e-5
(absolute; they are float32 sums in another order). The runs use scaled fp8 base weights (fp8 shards are gathered),
gradient checkpointing, validation and a sample during training.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dist_harness import read_losses
from dist_harness import run as harness_run
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.training.fsdp import ShardingConfig, check_sharding_request
from musubi_tuner.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("dist_harness.py")
FSDP_CONFIG = ROOT / "configs" / "accelerate_fsdp2.yaml"
LORA_ATOL = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
LOSS_RTOL = 1e-5


@dataclass
class ArchCase:
    """What the two-process test needs of an architecture."""

    spec: str  # "module:TrainerClass" of its train script
    argv: Callable[[Path], list[str]]  # trainer argv (tiny bundle, cached dataset, output dir)
    generate_with: Callable[[Path, Path], Path]  # (LoRA file, work dir) -> generator output, LoRA applied
    sample_argv: Callable[[Path], list[str]]  # options for sampling during training with this prompt file


def _k5_case(tmp: Path, bundle) -> ArchCase:
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
    from musubi_tuner.kandinsky5_cache_latents import main as cache_latents
    from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main as cache_text

    ds = write_synthetic_video_dataset(tmp / "data", n_videos=2, n_images=0, seed=1)
    val = write_synthetic_video_dataset(tmp / "val", n_videos=1, n_images=0, seed=2)  # one batch for two processes
    with ds.video_toml.open("a", encoding="utf-8") as f:
        f.write(f'\n[[datasets]]\nvideo_directory = "{val.video_dir.as_posix()}"\ncache_directory = "{val.video_cache_dir.as_posix()}"\n'
                'target_frames = [17]\nframe_extraction = "head"\nvalidation = true\n')  # fmt: skip
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(bundle.vae), "--device", "cpu",
                   "--vae_dtype", "float32", "--seed", "0"])  # fmt: skip
    cache_text(["--dataset_config", str(ds.video_toml), "--text_encoder_qwen", str(bundle.text_encoder_qwen),
                "--text_encoder_clip", str(bundle.text_encoder_clip), "--device", "cpu"])  # fmt: skip

    def argv(out: Path) -> list[str]:
        return ["--task", bundle.task, "--dit", str(bundle.dit), "--dataset_config", str(ds.video_toml),
                "--network_module", "networks.lora_kandinsky", "--network_dim", "4", "--network_alpha", "4",
                "--output_dir", str(out), "--output_name", "lora", "--optimizer_type", "SGD", "--learning_rate", "0.5",
                "--max_data_loader_n_workers", "0", "--seed", "1", "--dit_dtype", "float32", "--max_train_steps", "4",
                "--fp8_base", "--fp8_scaled", "--validate_every_n_steps", "2", "--log_with", "jsonl",
                "--logging_dir", str(out / "logs")]  # fmt: skip

    def generate_with(lora: Path, work: Path) -> Path:
        from musubi_tuner.kandinsky5_generate_video import main as generate

        out = work / "generated.safetensors"
        generate(["--task", bundle.task, "--dit", str(bundle.dit), "--vae", str(bundle.vae),
                  "--text_encoder_qwen", str(bundle.text_encoder_qwen), "--text_encoder_clip", str(bundle.text_encoder_clip),
                  "--prompt", "x", "--seed", "3", "--video_length", "5", "--steps", "2", "--width", "64", "--height", "64",
                  "--output_type", "latent", "--device", "cpu", "--dtype", "float32", "--lora_weight", str(lora),
                  "--output", str(out)])  # fmt: skip
        return out

    def sample_argv(prompts: Path) -> list[str]:
        return ["--sample_prompts", str(prompts), "--vae", str(bundle.vae), "--text_encoder_qwen", str(bundle.text_encoder_qwen),
                "--text_encoder_clip", str(bundle.text_encoder_clip)]  # fmt: skip

    return ArchCase("musubi_tuner.kandinsky5_train_network:Kandinsky5NetworkTrainer", argv, generate_with, sample_argv)


# one line per implemented architecture: name -> builder(tmp dir, request) -> ArchCase
ARCHS: dict[str, Callable[[Path, pytest.FixtureRequest], ArchCase]] = {
    "kandinsky5": lambda tmp, request: _k5_case(tmp, request.getfixturevalue("k5_bundle")),
}


@pytest.fixture(params=sorted(ARCHS))
def arch_case(request, tmp_path_factory) -> ArchCase:
    return ARCHS[request.param](tmp_path_factory.mktemp(f"fsdp_{request.param}"), request)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP")}
    return {**env, "BLISSFUL_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def _launch(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr + proc.stdout


def _share_lines(log: str) -> list[tuple[int, float]]:
    """(process, share of the DiT parameters it holds) of every sharding log line, in log order."""
    found = re.findall(r"FSDP2: process (\d) of 2 holds ([\d,]+) of ([\d,]+) DiT parameters", log)
    return [(int(p), int(a.replace(",", "")) / int(b.replace(",", ""))) for p, a, b in found]


def _shares(log: str) -> dict[int, float]:
    return dict(_share_lines(log))


def _validation_losses(out: Path) -> dict[int, float]:
    (metrics,) = (out / "logs").glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss/validation"] for r in rows if "loss/validation" in r}


def _assert_close_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_and_resume_exactly(arch_case, tmp_path):
    # (1) torchrun with the environment `accelerate launch --config_file configs/accelerate_fsdp2.yaml` exports:
    # 2 CPU processes over gloo, state saved at step 2, one sample before the first step (every process runs the
    # sharded forwards, process 0 saves)
    sharded = tmp_path / "sharded"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --f 5 --s 2 --d 7\n", encoding="utf-8")
    log = _launch(
        [
            *TORCHRUN,
            "--master_port",
            "29561",
            str(HARNESS),
            arch_case.spec,
            *arch_case.argv(sharded),
            "--save_every_n_steps",
            "2",
            "--save_state",
            "--gradient_checkpointing",
            "--sample_at_first",
            *arch_case.sample_argv(prompts),
        ],
        _env(**FSDP_ENV),
    )
    samples = sorted(p.name for p in (sharded / "sample").iterdir())
    assert len(samples) == 1 and "_000000_00_" in samples[0], samples
    shares = _shares(log)
    assert sorted(shares) == [0, 1], log[-3000:]
    assert all(0.45 <= s <= 0.55 for s in shares.values()), shares  # each process holds about half of the DiT

    # (2) one process over the same global batch (accumulating the two per-process batches)
    single = tmp_path / "single"
    harness_run(arch_case.spec, [*arch_case.argv(single), "--gradient_accumulation_steps", "2", "--gradient_checkpointing"])

    losses_sharded, losses_single = read_losses(sharded), read_losses(single, accumulation=2)
    assert losses_sharded.keys() == losses_single.keys() and losses_sharded
    for item, curve in losses_sharded.items():
        assert [s for s, _ in curve] == [s for s, _ in losses_single[item]] == [0, 1, 2, 3], item
        for (_, a), (_, b) in zip(curve, losses_single[item]):
            assert a == pytest.approx(b, rel=LOSS_RTOL), item
    # validation: one batch, so the second process runs a padded round; the mean is the one-process value
    val_sharded = _validation_losses(sharded)
    assert sorted(val_sharded) == [2, 4]
    assert val_sharded == pytest.approx(_validation_losses(single), rel=LOSS_RTOL)
    lora_sharded = load_file(str(sharded / "lora.safetensors"))
    _assert_close_lora(lora_sharded, load_file(str(single / "lora.safetensors")), LORA_ATOL)
    with safe_open(str(sharded / "lora.safetensors"), "pt") as f, safe_open(str(single / "lora.safetensors"), "pt") as g:
        assert f.metadata().keys() == g.metadata().keys()  # the same file format as a one-process run
    state = json.loads((sharded / "lora-step00000002-state" / "train_state.json").read_text())
    assert state["num_processes"] == 2 and state["current_step"] == 2

    # (3) torchrun resume of the sharded state: continues exactly to the uninterrupted run's final LoRA
    resumed = tmp_path / "resumed"
    _launch(
        [
            *TORCHRUN,
            "--master_port",
            "29562",
            str(HARNESS),
            arch_case.spec,
            *arch_case.argv(resumed),
            "--gradient_checkpointing",
            "--resume",
            str(sharded / "lora-step00000002-state"),
        ],
        _env(**FSDP_ENV),
    )
    _assert_close_lora(load_file(str(resumed / "lora.safetensors")), lora_sharded, 1e-7)
    assert _validation_losses(resumed)[4] == pytest.approx(val_sharded[4], rel=1e-6)
    assert {k: [s + 2 for s, _ in v] for k, v in read_losses(resumed).items()} == {
        k: [s for s, _ in v if s >= 2] for k, v in losses_sharded.items()
    }

    # (4) the generator loads the sharded run's LoRA
    assert arch_case.generate_with(sharded / "lora.safetensors", tmp_path).is_file()


# ---------------------------------------------------------------------------------------------------------------------
# the other architectures: one light run each (sharding, per-item losses, final LoRA), all in one torchrun launch. The
# Kandinsky 5 case above covers what is shared by every architecture (resume, sampling, validation, generator load).


def _light_argv(out: Path, *arch_args: str) -> list[str]:
    return [*arch_args, "--network_dim", "4", "--network_alpha", "4", "--output_dir", str(out), "--output_name", "lora",
            "--optimizer_type", "SGD", "--learning_rate", "0.5", "--max_data_loader_n_workers", "0", "--seed", "1",
            "--dit_dtype", "float32", "--max_train_steps", "2", "--fp8_base", "--fp8_scaled",
            "--gradient_checkpointing"]  # fmt: skip


def _flux2_light(tmp: Path, bundle) -> tuple[str, Callable[[Path], list[str]]]:
    from musubi_tuner.demo.flux2_data import write_flux2_dataset
    from musubi_tuner.flux_2_cache_latents import main as cache_latents
    from musubi_tuner.flux_2_cache_text_encoder_outputs import main as cache_text

    ds = write_flux2_dataset(tmp / "data", n_images=4)  # batch size 2: one batch per process and step
    cache_latents(["--dataset_config", str(ds.t2i_toml), "--vae", str(bundle.vae), "--device", "cpu", "--num_workers", "1"])
    cache_text(["--dataset_config", str(ds.t2i_toml), "--text_encoder", str(bundle.text_encoder_qwen3),
                "--model_version", "klein-4b", "--device", "cpu", "--num_workers", "1"])  # fmt: skip
    return "musubi_tuner.flux_2_train_network:Flux2NetworkTrainer", lambda out: _light_argv(
        out, "--model_version", "klein-4b", "--dit", str(bundle.dit_klein), "--dataset_config", str(ds.t2i_toml),
        "--network_module", "networks.lora_flux_2", "--timestep_sampling", "flux2_shift")  # fmt: skip


def _wan_light(tmp: Path, bundle) -> tuple[str, Callable[[Path], list[str]]]:
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
    from musubi_tuner.wan_cache_latents import main as cache_latents
    from musubi_tuner.wan_cache_text_encoder_outputs import main as cache_text

    ds = write_synthetic_video_dataset(tmp / "data", n_videos=2, n_images=0, seed=1)
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(bundle.vae), "--device", "cpu", "--vae_dtype", "float32"])
    cache_text(["--dataset_config", str(ds.video_toml), "--t5", str(bundle.t5), "--device", "cpu"])
    return "musubi_tuner.wan_train_network:WanNetworkTrainer", lambda out: _light_argv(
        out, "--task", bundle.task, "--dit", str(bundle.dit), "--dataset_config", str(ds.video_toml),
        "--network_module", "networks.lora_wan")  # fmt: skip


def _qwen_light(tmp: Path, bundle) -> tuple[str, Callable[[Path], list[str]]]:
    from musubi_tuner.demo.qwen_image_bundle import write_qwen_image_dataset
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text

    ds = write_qwen_image_dataset(tmp / "data", n_images=2, batch_size=1)
    common = ["--dataset_config", str(ds.toml), "--device", "cpu", "--model_version", "original", "--num_workers", "1"]
    cache_latents([*common, "--vae", str(bundle.vae), "--vae_dtype", "float32"])
    cache_text([*common, "--text_encoder", str(bundle.text_encoder)])
    return "musubi_tuner.qwen_image_train_network:QwenImageNetworkTrainer", lambda out: _light_argv(
        out, "--model_version", "original", "--dit", str(bundle.dit), "--dataset_config", str(ds.toml),
        "--network_module", "networks.lora_qwen_image", "--timestep_sampling", "qwen_shift")  # fmt: skip


# one line per architecture checked with a light run: name -> (builder, its bundle fixture)
LIGHT_ARCHS: dict[str, tuple[Callable[[Path, object], tuple[str, Callable[[Path], list[str]]]], str]] = {
    "flux_2": (_flux2_light, "flux2_bundle"),
    "qwen_image": (_qwen_light, "qwen_bundle"),
    "wan_t2v": (_wan_light, "wan_t2v_bundle"),
}


@dataclass
class LightRuns:
    cases: dict[str, tuple[str, Callable[[Path], list[str]]]]  # name -> (trainer spec, argv for an output dir)
    sharded: dict[str, Path]  # name -> output dir of its two-process run
    shares: dict[str, dict[int, float]]  # name -> process -> share of the DiT parameters it held


@pytest.fixture(scope="module")
def light_runs(request, tmp_path_factory) -> LightRuns:
    root = tmp_path_factory.mktemp("fsdp_light")
    cases = {name: build(root / name, request.getfixturevalue(fixture)) for name, (build, fixture) in LIGHT_ARCHS.items()}
    sharded = {name: root / name / "sharded" for name in cases}
    plan = root / "plan.json"
    plan.write_text(json.dumps([[spec, argv(sharded[name])] for name, (spec, argv) in cases.items()]), encoding="utf-8")
    log = _launch([*TORCHRUN, "--master_port", "29564", str(HARNESS), "runs", str(plan)], _env(**FSDP_ENV))
    # each process logs its share once per run, in the plan's order
    per_process = {p: [share for q, share in _share_lines(log) if q == p] for p in (0, 1)}
    assert all(len(v) == len(cases) for v in per_process.values()), log[-3000:]
    shares = {name: {p: per_process[p][i] for p in (0, 1)} for i, name in enumerate(cases)}
    return LightRuns(cases, sharded, shares)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(LIGHT_ARCHS))
def test_fsdp2_two_processes_match_one_process(arch, light_runs, tmp_path):
    spec, argv = light_runs.cases[arch]
    assert all(0.45 <= s <= 0.55 for s in light_runs.shares[arch].values()), light_runs.shares[arch]
    single = tmp_path / "single"
    harness_run(spec, [*argv(single), "--gradient_accumulation_steps", "2"])
    losses_sharded, losses_single = read_losses(light_runs.sharded[arch]), read_losses(single, accumulation=2)
    assert losses_sharded.keys() == losses_single.keys()
    assert sorted(s for curve in losses_sharded.values() for s, _ in curve) == [0, 0, 1, 1]  # one batch per process and step
    for item, curve in losses_sharded.items():
        assert [s for s, _ in curve] == [s for s, _ in losses_single[item]], item
        for (_, a), (_, b) in zip(curve, losses_single[item]):
            assert a == pytest.approx(b, rel=LOSS_RTOL), item
    sharded_lora = light_runs.sharded[arch] / "lora.safetensors"
    _assert_close_lora(load_file(str(sharded_lora)), load_file(str(single / "lora.safetensors")), LORA_ATOL)
    with safe_open(str(sharded_lora), "pt") as f, safe_open(str(single / "lora.safetensors"), "pt") as g:
        assert f.metadata().keys() == g.metadata().keys()


# ---------------------------------------------------------------------------------------------------------------------
# start-up errors: sharding that cannot engage stops before anything is loaded


def _args(**kw) -> Namespace:
    return Namespace(**{"blocks_to_swap": 0, "block_swap_h2d_only": False, "use_pinned_memory_for_block_swap": False, **kw})


def test_shipped_fsdp2_config_exports_what_the_trainer_reads():
    """``accelerate launch --config_file configs/accelerate_fsdp2.yaml`` turns the file into the FSDP environment."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(FSDP_CONFIG))
    assert config.distributed_type == "FSDP" and config.num_processes == 2
    assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is True
    assert config.fsdp_config["fsdp_offload_params"] is False


def test_sharding_config_from_accelerate_env():
    assert ShardingConfig.from_env({}) is None
    assert ShardingConfig.from_env({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "2"}) is None
    cfg = ShardingConfig.from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert cfg == ShardingConfig(version=2, reshard_after_forward=False)
    # accelerate's default when the config has no fsdp_version is FSDP1
    assert ShardingConfig.from_env({"ACCELERATE_USE_FSDP": "true"}).version == 1
    with pytest.raises(UserError, match="FSDP_VERSION='two'"):
        ShardingConfig.from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "two"})


@pytest.mark.parametrize(
    "env, args, cuda, message",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, False, "only FSDP2 is supported: set fsdp_version: 2"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            {"blocks_to_swap": 4},
            True,
            "--blocks_to_swap 4 cannot be combined",
        ),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "true"},
            {},
            True,
            "ACCELERATE_USE_CPU=true (use_cpu)",
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, {}, False, "fsdp_offload_params"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            {"offload_dit_during_sampling": True},
            False,
            "--offload_dit_during_sampling cannot be combined with FSDP sharding",
        ),
    ],
)
def test_sharding_that_cannot_engage_is_an_error(env, args, cuda, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_sharding_request(ShardingConfig.from_env(env), _args(**args), cuda_available=cuda, env=env)


def test_fsdp_config_with_block_swap_stops_the_trainer_at_start(tmp_path, monkeypatch):
    """Through the real trainer: the error comes before any model is loaded, and nothing is written."""
    from toy_arch import common_argv, run, write_image_dataset, write_toy_dit

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    config, dit = write_image_dataset(tmp_path / "data", 2), write_toy_dit(tmp_path / "dit.safetensors")
    with pytest.raises(UserError, match="--blocks_to_swap 1 cannot be combined with FSDP sharding"):
        run(common_argv(config, dit, tmp_path / "out", "--blocks_to_swap", "1"))
    assert not (tmp_path / "out").exists()


def test_check_sharding_passes_for_a_plain_request():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    check_sharding_request(ShardingConfig.from_env(env), _args(), cuda_available=False, env=env)


# ---------------------------------------------------------------------------------------------------------------------
# caching with two processes


@pytest.mark.slow
def test_caching_with_two_processes_writes_each_item_once(tmp_path):
    from toy_arch import write_image_dataset

    reference = write_image_dataset(tmp_path / "data", 5)  # five items: an uneven split; cached by one process
    one_dir = tmp_path / "data" / "train_cache"
    two_dir = tmp_path / "two_cache"
    two_dir.mkdir()
    (two_dir / "gone_00000-001_0032x0032_wan.safetensors").write_bytes(b"stale")  # removed once all are done
    config = tmp_path / "two.toml"
    config.write_text(reference.read_text().replace(one_dir.as_posix(), two_dir.as_posix()))
    _launch(
        [*TORCHRUN, "--master_port", "29563", str(HARNESS), "cache-toy", str(config), str(tmp_path / "records")],
        _env(),
    )
    records = {p.name: p.read_text().split() for p in (tmp_path / "records").glob("encoded_*.txt")}
    assert sorted(records) == ["encoded_0.txt", "encoded_1.txt"]
    encoded = records["encoded_0.txt"] + records["encoded_1.txt"]
    assert len(encoded) == len(set(encoded)) == 10  # 5 latents + 5 captions, each encoded by exactly one process
    assert all(records.values()) and {len(v) for v in records.values()} == {4, 6}  # 3 + 2 items per kind
    one = sorted(p.name for p in one_dir.iterdir())
    assert sorted(p.name for p in two_dir.iterdir()) == one and len(one) == 10
    for name in one:
        a, b = load_file(str(one_dir / name)), load_file(str(two_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_skip_corrupt_with_two_processes_removes_the_old_caches_of_every_process_share(tmp_path):
    import numpy as np
    from PIL import Image
    from toy_arch import write_image_dataset

    config = write_image_dataset(tmp_path / "data", 4)  # cached by one process: 4 latent + 4 TE caches
    images, cache_dir = tmp_path / "data" / "train", tmp_path / "data" / "train_cache"
    before = sorted(p.name for p in cache_dir.glob("*_wan.safetensors"))
    assert len(before) == 4
    # items 0 and 1 now fail only when decoded (header readable, pixel data cut): item 0 is process 0's share, item 1
    # process 1's (every 2nd item from the process index)
    for i in (0, 1):
        noisy = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(noisy).save(images / f"train_{i:03d}.png")
        data = (images / f"train_{i:03d}.png").read_bytes()
        (images / f"train_{i:03d}.png").write_bytes(data[: len(data) // 2])
    log = _launch(
        [*TORCHRUN, "--master_port", "29564", str(HARNESS), "cache-toy", str(config), str(tmp_path / "records"), "--skip_corrupt"],
        _env(),
    )
    assert log.count("cannot decode image") == 2 and "--skip_corrupt" in log
    records = {p.name: p.read_text().split() for p in (tmp_path / "records").glob("encoded_*.txt")}
    latents = sorted(e for v in records.values() for e in v if e.startswith("latent:"))
    assert latents == [f"latent:{before[2]}", f"latent:{before[3]}"]  # one good item per process, re-encoded
    assert sorted(p.name for p in cache_dir.glob("*_wan.safetensors")) == before[2:]  # both failed items' caches gone
