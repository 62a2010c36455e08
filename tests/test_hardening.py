"""Hardening from user testing (issue 12), one test per class of defect, through the CLIs on the tiny K5 bundle.

Bad input ends in one ``error:`` line naming the file / flag / value and exit status 2, before any model loads where
the input allows; no option is silently ignored; nothing partial is left under a name a loader would pick up.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi_tuner import merge_lora
from musubi_tuner.demo.synthetic_data import SyntheticDataset, write_synthetic_video_dataset
from musubi_tuner.kandinsky5_cache_latents import main as cache_latents
from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main as cache_text
from musubi_tuner.kandinsky5_generate_video import main as generate
from musubi_tuner.kandinsky5_train_network import main as train
from musubi_tuner.training.args import DEPENDENT_OPTIONS, setup_parser_common
from musubi_tuner.training.resume import verify_state_dir

REPO = Path(__file__).resolve().parents[1]
TASK = "k5-lite-t2v-5s-sd"
MISSING_DIT = "/nonexistent/dit.safetensors"  # a check that passes with this DiT ran before any model loaded


def _cache(bundle, data: SyntheticDataset, *extra: str) -> None:
    cache_latents(["--dataset_config", str(data.video_toml), "--vae", str(bundle.vae), "--device", "cpu",
                   "--vae_dtype", "float32", "--seed", "0", *extra])  # fmt: skip
    cache_text(["--dataset_config", str(data.video_toml), "--text_encoder_qwen", str(bundle.text_encoder_qwen),
                "--text_encoder_clip", str(bundle.text_encoder_clip), "--device", "cpu", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def cached(tmp_path_factory, k5_bundle) -> SyntheticDataset:
    """Two 17-frame 64x64 clips with latent and text caches written by the caching scripts."""
    data = write_synthetic_video_dataset(tmp_path_factory.mktemp("harden") / "data", n_videos=2, n_images=0, seed=1)
    _cache(k5_bundle, data)
    return data


def train_argv(bundle, data: SyntheticDataset, out: Path, *extra: str, dit: str | None = None) -> list[str]:
    return [
        "--task", TASK, "--dit", dit or str(bundle.dit), "--dataset_config", str(data.video_toml),
        "--network_module", "networks.lora_kandinsky", "--network_dim", "4", "--network_alpha", "4",
        "--output_dir", str(out), "--output_name", "k5", "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0",
        "--seed", "1", "--dit_dtype", "float32", "--max_train_steps", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, k5_bundle, cached) -> Path:
    """Output dir of a 1-step run with ``--save_state``: ``k5.safetensors`` (rank 4) and ``k5-state/``."""
    out = tmp_path_factory.mktemp("harden_run")
    train(train_argv(k5_bundle, cached, out, "--save_state"))
    return out


def gen_argv(bundle, *extra: str, dit: str | None = None) -> list[str]:
    return [
        "--task", TASK, "--dit", dit or str(bundle.dit), "--vae", str(bundle.vae),
        "--text_encoder_qwen", str(bundle.text_encoder_qwen), "--text_encoder_clip", str(bundle.text_encoder_clip),
        "--steps", "2", "--vae_dtype", "float32", "--width", "64", "--height", "64", "--video_length", "5",
        "--device", "cpu", "--prompt", "a red circle", *extra,
    ]  # fmt: skip


def exit_2(main, argv: list[str], capsys) -> str:
    """Run a CLI ``main``; it must exit with status 2 and print one ``error:`` message (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and "error: " in err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# trainer options


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--network_dim", "0"], "argument --network_dim: must be >= 1 (got 0)"),
        (["--learning_rate=-1e-4"], "argument --learning_rate: must be > 0 (got -1e-4)"),
        (["--max_train_steps", "0"], "argument --max_train_steps: must be >= 1"),
        (["--network_dropout", "1.5"], "argument --network_dropout: must be >= 0 and <= 1"),
        (["--gradient_accumulation_steps", "x"], "argument --gradient_accumulation_steps: expected an integer, got 'x'"),
        (["--discrete_flow_shift", "nan"], "argument --discrete_flow_shift: must be a finite number"),
    ],
)
def test_numeric_trainer_options_are_refused_while_parsing(extra, message, capsys):
    err = exit_2(train, ["--task", TASK, *extra], capsys)
    assert message in err and "usage:" not in err and len(err.strip().splitlines()) == 1


def test_numeric_option_in_a_config_file_names_the_file_and_key(tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_text("[network]\nnetwork_dim = 0\n", encoding="utf-8")
    err = exit_2(train, ["--task", TASK, "--config_file", str(config)], capsys)
    assert f"{config}: option 'network_dim': invalid value 0 (must be >= 1" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--gradient_checkpointing_cpu_offload"],
            "--gradient_checkpointing_cpu_offload has no effect without --gradient_checkpointing",
        ),
        (["--save_last_n_steps", "2"], "--save_last_n_steps has no effect without --save_every_n_steps"),
        (["--sample_every_n_steps", "5"], "--sample_every_n_steps has no effect without --sample_prompts"),
        (["--compile_mode", "max-autotune"], "--compile_mode has no effect without --compile"),
        (["--use_pinned_memory_for_block_swap"], "without --blocks_to_swap"),
        (["--loss_on_conditioned_frames"], "--loss_on_conditioned_frames is for image-to-video tasks"),
    ],
)
def test_an_option_without_the_option_it_belongs_to_is_refused(k5_bundle, cached, tmp_path, capsys, extra, message):
    err = exit_2(train, train_argv(k5_bundle, cached, tmp_path, *extra, dit=MISSING_DIT), capsys)
    assert message in err


def test_the_dependent_option_table_names_real_options():
    from musubi_tuner.training.args import check_dependent_options

    dests = {a.dest for a in setup_parser_common()._actions}
    for dest, parents in DEPENDENT_OPTIONS:
        assert dest in dests and set(parents) <= dests, (dest, parents)
    # piecewise_constant is the one built-in schedule that reads --lr_scheduler_args
    check_dependent_options(
        setup_parser_common().parse_args(["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:2,0.1'"])
    )


def test_missing_optional_dependencies_are_reported_before_the_dit_loads(k5_bundle, cached, tmp_path, capsys):
    argv = train_argv(k5_bundle, cached, tmp_path, dit=MISSING_DIT)
    err = exit_2(train, [*argv, "--optimizer_type", "no_such_package.FastAdam"], capsys)
    assert "--optimizer_type no_such_package.FastAdam: cannot import module 'no_such_package'" in err
    err = exit_2(train, [*argv, "--lr_scheduler_type", "no_such_package.Sched"], capsys)
    assert "--lr_scheduler_type 'no_such_package.Sched': cannot import" in err
    if importlib.util.find_spec("bitsandbytes") is None:
        err = exit_2(train, [*argv, "--optimizer_type", "AdamW8bit"], capsys)
        assert "--optimizer_type AdamW8bit needs bitsandbytes" in err


def test_loha_in_the_diffusers_layout_is_refused_at_start(k5_bundle, cached, tmp_path, capsys):
    argv = train_argv(k5_bundle, cached, tmp_path, "--lora_format", "diffusers", dit=MISSING_DIT)
    argv[argv.index("--network_module") + 1] = "networks.loha"
    err = exit_2(train, argv, capsys)
    assert "networks.loha with --lora_format diffusers" in err and "kohya" in err


def test_warmup_longer_than_training_and_too_many_swapped_blocks_warn(k5_bundle, cached, tmp_path, project_log):
    train(train_argv(k5_bundle, cached, tmp_path, "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10",
                     "--blocks_to_swap", "99"))  # fmt: skip
    assert (tmp_path / "k5.safetensors").is_file()
    assert "--lr_warmup_steps 10 is 10 steps, more than the 1 training steps" in project_log.text
    # the tiny DiT has 1 text and 2 visual blocks: training keeps 2 per list resident, so nothing can be swapped
    assert "--blocks_to_swap 99: this model can swap at most 0 blocks when training" in project_log.text


def test_network_weights_of_another_rank_name_the_tensor_and_shapes(k5_bundle, cached, trained, tmp_path, capsys):
    argv = train_argv(k5_bundle, cached, tmp_path, "--network_weights", str(trained / "k5.safetensors"))
    argv[argv.index("--network_dim") + 1] = "8"
    err = exit_2(train, argv, capsys)
    assert "has shape [4, " in err and "but this network's is [8, " in err and "--dim_from_weights" in err


# ---------------------------------------------------------------------------------------------------------------------
# resume


def _state_copy(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained / "k5-state", dest)
    return dest


def test_resume_refuses_damaged_and_incomplete_states(k5_bundle, cached, trained, tmp_path, capsys):
    def refused(state: Path) -> str:
        return exit_2(train, train_argv(k5_bundle, cached, tmp_path / "out", "--resume", str(state), dit=MISSING_DIT), capsys)

    verify_state_dir(trained / "k5-state")  # the intact state passes

    state = _state_copy(trained, tmp_path / "truncated-state")
    data = (state / "network.safetensors").read_bytes()
    (state / "network.safetensors").write_bytes(data[: len(data) // 2])
    assert f"{state / 'network.safetensors'}" in refused(state)

    state = _state_copy(trained, tmp_path / "rng-state")
    data = bytearray((state / "random_states_0.pkl").read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte: accelerate would log "Could not load random states" and go on
    (state / "random_states_0.pkl").write_bytes(bytes(data))
    assert f"{state / 'random_states_0.pkl'}" in refused(state)

    state = _state_copy(trained, tmp_path / "partial-state")
    (state / "optimizer.bin").unlink()
    assert "optimizer.bin missing from the state" in refused(state)

    state = _state_copy(trained, tmp_path / "k5-state.tmp")
    assert "is an incomplete save from an interrupted run" in refused(state)


# ---------------------------------------------------------------------------------------------------------------------
# disk full: one message, nothing left that a glob, loader or --resume would pick up


def _with_file_size_limit(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes beyond it fail with EFBIG (SIGXFSZ ignored)

    return apply


def _run_limited(args: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=_with_file_size_limit(limit)
    )


def test_disk_full_while_merging_leaves_no_partial_file(k5_bundle, trained, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    target = out / "merged.safetensors"
    limit = k5_bundle.dit.stat().st_size // 2
    proc = _run_limited(
        [str(REPO / "merge_lora.py"), "--dit", str(k5_bundle.dit), "--lora_weight", str(trained / "k5.safetensors"),
         "--save_merged_model", str(target), "--no_progress"],
        limit, tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and f"error: writing {target}:" in proc.stderr
    assert list(out.iterdir()) == []  # no merged file, no hidden temporary file


def test_disk_full_while_saving_a_state_leaves_no_state_directory(k5_bundle, cached, tmp_path):
    out = tmp_path / "out"
    # the optimizer state (~160 kB) is the first file over the limit; caches are only read
    proc = _run_limited(
        [str(REPO / "kandinsky5_train_network.py"), *train_argv(k5_bundle, cached, out, "--save_state")], 100_000, tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and f"error: saving the state {out / 'k5-state'}:" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # neither k5-state, nor k5-state.tmp, nor a LoRA


# ---------------------------------------------------------------------------------------------------------------------
# caching


def test_text_encoder_directory_without_tokenizer_files(k5_bundle, cached, tmp_path, capsys):
    qwen = tmp_path / "qwen_no_tokenizer"
    shutil.copytree(k5_bundle.text_encoder_qwen, qwen)
    (qwen / "tokenizer.json").unlink()  # tokenizer_config.json alone is no tokenizer
    argv = ["--dataset_config", str(cached.video_toml), "--text_encoder_qwen", str(qwen),
            "--text_encoder_clip", str(k5_bundle.text_encoder_clip), "--device", "cpu"]  # fmt: skip
    err = exit_2(cache_text, argv, capsys)
    assert f"{qwen}: the tokenizer is missing from the text encoder directory (--text_encoder_qwen)" in err


def test_skip_existing_re_encodes_truncated_caches(k5_bundle, fresh_synthetic_dataset, project_log):
    data = fresh_synthetic_dataset
    _cache(k5_bundle, data)
    latent = sorted(Path(data.video_cache_dir).glob("*_k5.safetensors"))[0]
    te = sorted(Path(data.video_cache_dir).glob("*_k5_te.safetensors"))[0]
    whole = {p: load_file(str(p)) for p in (latent, te)}
    for path in (latent, te):
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) - 100])  # header intact, tensor data cut
    _cache(k5_bundle, data, "--skip_existing")
    for path, tensors in whole.items():
        again = load_file(str(path))
        assert again.keys() == tensors.keys()
        assert f"{path}: unreadable cache file" in project_log.text
    assert torch.equal(load_file(str(te))[next(iter(whole[te]))], next(iter(whole[te].values())))


def test_resolution_not_a_multiple_of_the_step_is_rounded_with_a_warning(k5_bundle, fresh_synthetic_dataset, project_log):
    data = fresh_synthetic_dataset
    config = Path(data.video_toml)
    text = config.read_text(encoding="utf-8")
    assert "resolution = [64, 64]" in text
    config.write_text(
        text.replace("resolution = [64, 64]", "resolution = [72, 64]").replace("enable_bucket = true", "enable_bucket = false")
    )
    cache_latents(["--dataset_config", str(config), "--vae", str(k5_bundle.vae), "--device", "cpu", "--vae_dtype", "float32"])
    assert f"{config}: datasets[0]: key 'resolution'" in project_log.text
    assert "resolution [72, 64] is not a multiple of 16 (kandinsky5's step); using [64, 64]" in project_log.text
    caches = sorted(Path(data.video_cache_dir).glob("*_k5.safetensors"))
    assert caches
    with safe_open(str(caches[0]), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.startswith("latents_")}
    assert all(s[-2:] == [8, 8] for s in shapes.values()), shapes  # 64x64 pixels → 8x8 latents


# ---------------------------------------------------------------------------------------------------------------------
# LoRA files and checkpoints


def test_lora_with_mismatched_factor_ranks_names_the_module_and_shapes(k5_bundle, trained, tmp_path, capsys):
    sd = load_file(str(trained / "k5.safetensors"))
    key = sorted(k for k in sd if k.endswith(".lora_down.weight"))[0]
    sd[key] = sd[key][:3].contiguous()  # rank 3 down, rank 4 up
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    module = key.split(".")[0]
    up = list(sd[key.replace("lora_down", "lora_up")].shape)
    expected = f"module '{module}': lora_up.weight has shape {up} and lora_down.weight has shape [3, 64]"
    err = exit_2(merge_lora.main, ["--dit", str(k5_bundle.dit), "--lora_weight", str(bad),
                                   "--save_merged_model", str(tmp_path / "m.safetensors")], capsys)  # fmt: skip
    assert expected in err and not (tmp_path / "m.safetensors").exists()
    err = exit_2(generate, gen_argv(k5_bundle, "--lora_weight", str(bad), "--output", str(tmp_path / "x.mp4")), capsys)
    assert expected in err


def test_checkpoint_of_another_family_is_refused(k5_bundle, cached, tmp_path, capsys):
    expected = f"{k5_bundle.dit}: checkpoint does not fit task 'k5-lite-t2i-hd': its config says visual_cond=True"
    argv = train_argv(k5_bundle, cached, tmp_path / "out")
    argv[argv.index("--task") + 1] = "k5-lite-t2i-hd"
    assert expected in exit_2(train, argv, capsys)
    assert not (tmp_path / "out" / "k5.safetensors").exists()
    argv = gen_argv(k5_bundle, "--output", str(tmp_path / "x.png"))
    argv[argv.index("--task") + 1] = "k5-lite-t2i-hd"
    argv[argv.index("--vae") + 1] = str(k5_bundle.flux_vae)
    del argv[argv.index("--video_length") : argv.index("--video_length") + 2]
    assert expected in exit_2(generate, argv, capsys)


# ---------------------------------------------------------------------------------------------------------------------
# generation outputs


def test_output_file_is_never_overwritten_without_overwrite(k5_bundle, tmp_path, capsys):
    existing = tmp_path / "x.mp4"
    existing.write_bytes(b"keep me")
    err = exit_2(generate, gen_argv(k5_bundle, "--output", str(existing), dit=MISSING_DIT), capsys)
    assert f"--output {existing}: the file exists; pass --overwrite" in err
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strict_prompts"], "--strict_prompts applies to prompt lines"),
        (["--output_type", "latent", "--crf", "10"], "--crf only affects video files; --output_type latent writes none"),
        (["--output_type", "images", "--save_last_frame"], "--save_last_frame only affects video files"),
    ],
)
def test_generation_options_without_effect_are_refused(k5_bundle, tmp_path, capsys, extra, message):
    err = exit_2(generate, gen_argv(k5_bundle, "--save_path", str(tmp_path), *extra, dit=MISSING_DIT), capsys)
    assert message in err


def test_unwritable_output_dir_is_refused_before_training(k5_bundle, cached, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    err = exit_2(train, train_argv(k5_bundle, cached, blocker / "out", dit=MISSING_DIT), capsys)
    assert f"--output_dir: cannot write to {blocker / 'out'}" in err


def test_unwritable_output_location_is_refused_before_models_load(k5_bundle, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    err = exit_2(generate, gen_argv(k5_bundle, "--save_path", str(blocker / "videos"), dit=MISSING_DIT), capsys)
    assert f"--save_path: cannot write to {blocker / 'videos'}" in err
    err = exit_2(generate, gen_argv(k5_bundle, "--output", str(blocker / "x.mp4"), dit=MISSING_DIT), capsys)
    assert f"--output: cannot write to {blocker}" in err


# ---------------------------------------------------------------------------------------------------------------------
# training samples carry the generator's metadata


def test_training_samples_carry_the_generators_metadata(k5_bundle, cached, tmp_path):
    from blissful_tuner.metadata import read_metadata

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --f 5 --s 2 --d 7\n", encoding="utf-8")
    encoders = ["--text_encoder_qwen", str(k5_bundle.text_encoder_qwen), "--text_encoder_clip", str(k5_bundle.text_encoder_clip)]
    train(train_argv(k5_bundle, cached, tmp_path / "out", "--sample_prompts", str(prompts), "--sample_at_first",
                     "--vae", str(k5_bundle.vae), "--vae_dtype", "float32", *encoders))  # fmt: skip
    (sample,) = sorted((tmp_path / "out" / "sample").glob("*.mp4"))
    trained_md = read_metadata(sample, bt_only=True)
    out = tmp_path / "gen.mp4"
    generate(gen_argv(k5_bundle, "--seed", "7", "--output", str(out)))
    generated_md = read_metadata(out, bt_only=True)
    varying = {"bt_creation_timestamp"}
    shared = set(generated_md) - varying
    assert {"bt_prompt", "bt_seeds", "bt_task", "bt_negative_prompt", "bt_guidance_scale", "bt_video_length"} <= shared
    assert shared <= set(trained_md), shared - set(trained_md)
    assert {k: trained_md[k] for k in shared} == {k: generated_md[k] for k in shared}
    assert trained_md["bt_training_step"] == "0" and trained_md["bt_training_output_name"] == "k5"


def test_modelspec_resolution_comes_from_the_trained_buckets(trained):
    with safe_open(str(trained / "k5.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.resolution"] == "64x64"  # the 64x64 clips' bucket, not the architecture's nominal 1280x720


def test_user_error_under_accelerate_launch_quiet_is_one_message(tmp_path):
    """accelerate re-raises a failed child as its own traceback; ``accelerate launch -q`` leaves our one message."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           str(REPO / "kandinsky5_train_network.py"), "--task", TASK, "--network_dim", "0"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1  # accelerate's status for any failed child (documented in docs/training.md)
    assert "error: argument --network_dim: must be >= 1 (got 0)" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# first contact: the demo


def test_demo_step_echoes_progress_and_logs_everything(tmp_path, capsys):
    from musubi_tuner.demo.run_demo import _run

    script = (
        "import sys, time\n"
        "for i in range(1, 4):\n"
        "    sys.stderr.write(f'\\rsteps:  {i * 33}%|###       | {i}/3 [00:0{i}<00:01, 1.0it/s, loss=0.5]')\n"
        "    sys.stderr.flush()\n"
        "print('training', 'finished')\n"
    )
    log = tmp_path / "step.log"
    _run([sys.executable, "-c", script], log, dict(os.environ))
    out = capsys.readouterr().out
    assert "steps 3/3 99% [00:03<00:01, 1.0it/s, loss=0.5]" in out and "steps 1/3 33%" in out
    assert "training finished" in log.read_text() and "training finished" not in out


def test_demo_default_work_dir_is_git_ignored():
    from musubi_tuner.demo.run_demo import setup_parser

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    work = setup_parser().parse_args([]).work_dir
    proc = subprocess.run(["git", "check-ignore", "-q", f"{work}/bundle/dit.safetensors"], cwd=REPO)
    assert proc.returncode == 0, f"{work}/ is not ignored by .gitignore"


@pytest.mark.parametrize(
    "script", ["kandinsky5_train_network", "flux_2_train_network", "qwen_image_train_network", "wan_train_network"]
)
def test_trainer_help_and_option_errors_do_not_import_torch(script):
    """``--help`` and parse errors answer without importing torch and the model code (start-up: bench/trainer_startup.py)."""
    code = (
        "import sys\n"
        f"from musubi_tuner.{script} import main\n"
        "for argv in (['--help'], ['--network_dim', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, 2), e.code\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torch loaded: False" in proc.stdout and "--network_dim" in proc.stdout
