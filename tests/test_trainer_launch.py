"""Subprocess runs: ``accelerate launch`` with 1 and 2 CPU processes (gloo), and a run killed with SIGKILL while it
writes a state (the previous state stays intact and resumable; the partial one is never taken for a state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from toy_arch import ToyTrainer, common_argv, toy_parser, write_image_dataset, write_toy_dit

TOY = Path(__file__).with_name("toy_arch.py")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_launch")
    return write_image_dataset(root / "data", 4, batch_size=1), write_toy_dit(root / "dit.safetensors")


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "BLISSFUL_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1", **extra}
    e.pop("WORLD_SIZE", None)
    return e


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_launch_cpu(toy, tmp_path, processes):
    out = tmp_path / "out"
    # the example configs: accelerate_cpu.yaml (one process) and accelerate_multi_gpu.yaml, which on a machine
    # without CUDA runs CPU processes over gloo
    config = CONFIGS / ("accelerate_cpu.yaml" if processes == 1 else "accelerate_multi_gpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(processes),
           "--mixed_precision", "no", "--main_process_port", "29533", str(TOY),
           *common_argv(*toy, out, "--max_train_steps", "2", "--save_state_on_train_end", "--toy_fixed_noise")]  # fmt: skip
    proc = subprocess.run(cmd, env=env(BLISSFUL_LOG_LEVEL="INFO", COLUMNS="200"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if processes == 2:  # a real process group: barriers and the gradient all-reduce go through gloo
        assert "process 1 of 2: MULTI_CPU, backend gloo" in proc.stderr
    assert load_file(str(out / "toy.safetensors"))
    state = json.loads((out / "toy-state" / "train_state.json").read_text())
    assert state["num_processes"] == processes and state["current_step"] == 2
    # 4 batches per epoch: one process runs 2 of them (epoch 1), two processes split them 2 + 2 (still epoch 1)
    assert state["current_epoch"] == 1 and state["steps_in_epoch"] == 2
    assert sorted(p.name for p in (out / "toy-state").glob("random_states_*")) == [
        f"random_states_{i}.pkl" for i in range(processes)
    ]


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_state(toy, tmp_path):
    out = tmp_path / "out"
    argv = common_argv(*toy, out, "--max_train_steps", "6", "--save_every_n_steps", "2", "--save_state")
    proc = subprocess.run(
        [sys.executable, str(TOY), *argv],
        env=env(MUSUBI_TUNER_TEST_KILL_DURING_SAVE="4"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    previous = out / "toy-step00000002-state"
    assert json.loads((previous / "train_state.json").read_text())["current_step"] == 2
    assert not (out / "toy-step00000004-state").exists()  # the interrupted save never appears complete
    assert (out / "toy-step00000004-state.tmp").is_dir()
    # resuming from the intact previous state finishes the run and rewrites step 4
    parser = toy_parser()
    ToyTrainer().train(parser.parse_args([*argv, "--resume", str(previous)]))
    assert (out / "toy-step00000004-state" / "train_state.json").is_file()
    assert not (out / "toy-step00000004-state.tmp").exists()
    assert load_file(str(out / "toy.safetensors"))
