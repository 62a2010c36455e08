"""The training loop end to end with the toy architecture (in-process ``train()`` calls, real dataset layer and
real network module): loss, saving, resume equivalence, accumulation, block swap / checkpointing, sampling,
validation."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from toy_arch import FixedNoiseToyTrainer, ToyTrainer, common_argv, toy_parser, write_image_dataset, write_toy_dit

from musubi_tuner.training.args import read_config_from_file
from musubi_tuner.utils.errors import UserError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    config = write_image_dataset(root / "data", 4, batch_size=1)
    dit = write_toy_dit(root / "dit.safetensors")
    return config, dit


def train(config, dit, out, *extra, trainer=None) -> dict[str, torch.Tensor]:
    argv = common_argv(config, dit, out, *extra)
    parser = toy_parser()
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    (trainer or ToyTrainer()).train(args)
    return load_file(str(Path(out) / "toy.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


class LossRecorder(ToyTrainer):
    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def process_batch(self, *args, **kwargs):
        loss, metrics = super().process_batch(*args, **kwargs)
        if torch.is_grad_enabled():
            self.losses.append(float(loss.detach()))
        return loss, metrics


def test_loss_decreases_on_overfit_set(toy, tmp_path):
    rec = LossRecorder()
    train(
        *toy,
        tmp_path,
        "--max_train_steps",
        "60",
        "--timestep_sampling",
        "uniform",
        "--min_timestep",
        "500",
        "--max_timestep",
        "520",
        trainer=rec,
    )
    first, last = sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_saving_naming_pruning_and_metadata(toy, tmp_path):
    train(
        *toy,
        tmp_path,
        "--max_train_epochs", "2",
        "--save_every_n_steps", "2", "--save_last_n_steps", "2",
        "--save_every_n_epochs", "1", "--save_state", "--save_last_n_steps_state", "2",
        "--save_precision", "fp16", "--metadata_title", "Toy ☕",
    )  # fmt: skip
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "toy-000001-state",
        "toy-000001.safetensors",
        "toy-state",
        "toy-step00000004-state",
        "toy-step00000004.safetensors",
        "toy-step00000006-state",
        "toy-step00000006.safetensors",
        "toy.safetensors",
    ]
    final = load_file(str(tmp_path / "toy.safetensors"))
    assert all(v.dtype == torch.float16 for v in final.values())
    with safe_open(str(tmp_path / "toy.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_steps"] == "8" and md["ss_epoch"] == "2" and md["ss_max_train_steps"] == "8"
    assert md["modelspec.title"] == "Toy ☕" and md["ss_base_model_version"] == "wan"
    ts = json.loads((tmp_path / "toy-step00000006-state" / "train_state.json").read_text())
    assert (ts["current_step"], ts["current_epoch"], ts["steps_in_epoch"], ts["seed"]) == (6, 2, 2, 1)
    assert (tmp_path / "toy-step00000006-state" / "network.safetensors").is_file()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_resume_equals_uninterrupted_run(toy, tmp_path):
    full = train(*toy, tmp_path / "full", "--max_train_steps", "8", "--save_every_n_steps", "3", "--save_state")
    # step 3 is mid-epoch (4 batches per epoch): the data order and the in-epoch position must continue exactly
    state = tmp_path / "full" / "toy-step00000003-state"
    resumed = train(
        *toy, tmp_path / "resumed", "--max_train_steps", "8", "--save_every_n_steps", "3", "--save_state", "--resume", str(state)
    )
    assert_same(full, resumed)
    produced = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert produced == [
        "toy-state",
        "toy-step00000006-state",
        "toy-step00000006.safetensors",
        "toy.safetensors",
    ]  # numbering continues
    step6_full = load_file(str(tmp_path / "full" / "toy-step00000006.safetensors"))
    assert_same(step6_full, load_file(str(tmp_path / "resumed" / "toy-step00000006.safetensors")))

    # a musubi-tuner state (no train_state.json, network as model.safetensors): position inferred from the scheduler
    musubi = tmp_path / "musubi-state"
    shutil.copytree(tmp_path / "full" / "toy-step00000006-state", musubi)
    (musubi / "train_state.json").unlink()
    (musubi / "network.safetensors").rename(musubi / "model.safetensors")
    inferred = train(*toy, tmp_path / "inferred", "--max_train_steps", "8", "--resume", str(musubi))
    assert_same(full, inferred)

    with pytest.raises(UserError, match="lora_down.weight' has shape"):
        train(*toy, tmp_path / "bad", "--max_train_steps", "8", "--network_dim", "8", "--resume", str(state))


def test_resume_restores_timestep_pool_and_tracker_run(toy, tmp_path):
    from musubi_tuner.training.trackers import METRICS_FILE, read_metrics

    common = ("--max_train_steps", "8", "--num_timestep_buckets", "4", "--noise_offset", "0.1", "--log_with", "jsonl")
    full = train(*toy, tmp_path / "full", *common, "--logging_dir", str(tmp_path / "logs_full"), "--save_every_n_steps", "3",
                 "--save_state")  # fmt: skip
    logs = tmp_path / "logs"
    train(*toy, tmp_path / "a", *common, "--max_train_steps", "5", "--logging_dir", str(logs), "--save_state_on_train_end")
    (run_dir,) = logs.iterdir()
    # step 5 is mid-epoch 2: the stratified pool of that epoch and the position inside it must be restored
    resumed = train(*toy, tmp_path / "b", *common, "--logging_dir", str(logs), "--resume", str(tmp_path / "a" / "toy-state"))
    assert_same(full, resumed)
    assert [p.name for p in logs.iterdir()] == [run_dir.name]  # the same run directory: the curves continue
    steps = [r["step"] for r in read_metrics(run_dir / METRICS_FILE) if "loss/current" in r]
    assert steps == list(range(1, 9))


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    dit = write_toy_dit(tmp_path / "dit.safetensors")
    big = write_image_dataset(tmp_path / "b2", 2, batch_size=2, seed=3)
    small = write_image_dataset(tmp_path / "b1", 2, batch_size=1, seed=3)
    a = train(big, dit, tmp_path / "a", "--max_train_steps", "3", trainer=FixedNoiseToyTrainer())
    b = train(
        small, dit, tmp_path / "b", "--max_train_steps", "3", "--gradient_accumulation_steps", "2", trainer=FixedNoiseToyTrainer()
    )
    assert_same(a, b, atol=1e-5)


def test_block_swap_and_checkpointing_do_not_change_training(toy, tmp_path):
    base = train(*toy, tmp_path / "base", "--max_train_steps", "3")
    swapped = train(*toy, tmp_path / "swap", "--max_train_steps", "3", "--blocks_to_swap", "2")
    ckpt = train(
        *toy, tmp_path / "ckpt", "--max_train_steps", "3", "--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"
    )
    assert_same(base, swapped, atol=1e-6)
    assert_same(base, ckpt, atol=1e-6)


def test_sampling_during_training(toy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# samples\na red square --w 32 --h 32 --d 5 --s 3\n\na blue square --w 48 --h 32 --f 5 --s 2 --d 7\n", encoding="utf-8"
    )
    plain = train(*toy, tmp_path / "plain", "--max_train_steps", "4")
    sampled = train(
        *toy, tmp_path / "s", "--max_train_steps", "4", "--sample_prompts", str(prompts), "--sample_at_first",
        "--sample_every_n_steps", "2", "--sample_every_n_epochs", "1",
    )  # fmt: skip
    assert_same(plain, sampled)  # sampling does not shift the training random stream
    files = sorted(p.name for p in (tmp_path / "s" / "sample").iterdir())
    pattern = re.compile(r"toy_(000000|000002|000004|e000001)_(00_\d{14}_5\.png|01_\d{14}_7\.mp4)")
    assert all(pattern.fullmatch(f) for f in files), files
    assert len(files) == 8  # steps 0, 2, 4 and epoch 1, two prompts each
    import av

    mp4 = next((tmp_path / "s" / "sample").glob("*.mp4"))
    with av.open(str(mp4)) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (48, 32)


def test_validation_loss_is_logged_and_does_not_disturb_training(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dit = write_toy_dit(tmp_path / "dit.safetensors")
    config = write_image_dataset(tmp_path / "data", 4, validation_items=2)
    plain = train(config, dit, tmp_path / "plain", "--max_train_steps", "4")
    logged = train(
        config,
        dit,
        tmp_path / "v",
        "--max_train_steps",
        "4",
        "--validate_every_n_steps",
        "2",
        "--logging_dir",
        str(tmp_path / "logs"),
    )
    assert_same(plain, logged)
    again = train(config, dit, tmp_path / "v2", "--max_train_steps", "4", "--validate_every_n_steps", "2", "--logging_dir",
                  str(tmp_path / "logs2"))  # fmt: skip
    assert_same(logged, again)
    run_dir = next((tmp_path / "logs").iterdir())
    acc = EventAccumulator(str(next(run_dir.rglob("events.*")).parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/validation" in tags and "loss/validation/q0.10" in tags and "loss/current" in tags
    values = acc.Scalars("loss/validation")
    assert [v.step for v in values] == [2, 4]
    per_q = [acc.Scalars(f"loss/validation/q{q:.2f}")[0].value for q in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert values[0].value == pytest.approx(sum(per_q) / 5, rel=1e-5)
    # fixed quantiles and noise seeds: a second run logs exactly the same validation curve
    acc2 = EventAccumulator(str(next((tmp_path / "logs2").rglob("events.*")).parent))
    acc2.Reload()
    assert [v.value for v in acc2.Scalars("loss/validation")] == [v.value for v in values]


def test_dim_from_weights_and_network_weights(toy, tmp_path):
    first = train(*toy, tmp_path / "a", "--max_train_steps", "2")
    again = train(
        *toy,
        tmp_path / "b",
        "--max_train_steps",
        "1",
        "--network_dim",
        "16",
        "--dim_from_weights",
        "--network_weights",
        str(tmp_path / "a" / "toy.safetensors"),
    )
    assert first.keys() == again.keys()
    assert all(first[k].shape == again[k].shape for k in first)  # rank 4 from the file, not --network_dim 16
    with safe_open(str(tmp_path / "b" / "toy.safetensors"), "pt") as f:
        md = f.metadata()
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("4", "4.0")  # the trained network, not the flags


class WeightProbe(ToyTrainer):
    def on_train_start(self, args, accelerator, transformer, network):
        self.fc1 = transformer.blocks[0].fc1.weight.detach().clone()


def test_base_weights_are_merged_before_training(toy, tmp_path):
    lora = train(*toy, tmp_path / "a", "--max_train_steps", "3")
    probe = WeightProbe()
    train(
        *toy,
        tmp_path / "b",
        "--max_train_steps",
        "1",
        "--base_weights",
        str(tmp_path / "a" / "toy.safetensors"),
        "--base_weights_multiplier",
        "0.5",
        trainer=probe,
    )
    base = load_file(str(toy[1]))["blocks.0.fc1.weight"]
    name = "lora_unet_blocks_0_fc1"
    up, down, alpha = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"], float(lora[f"{name}.alpha"])
    expected = base + 0.5 * (alpha / down.shape[0]) * (up @ down)
    assert not torch.allclose(expected, base)
    assert torch.allclose(probe.fc1, expected, atol=1e-6)


def test_schedule_free_optimizer_switches_around_saves(toy, tmp_path):
    from toy_arch import RecordingSGDScheduleFree

    RecordingSGDScheduleFree.calls.clear()
    train(*toy, tmp_path, "--max_train_steps", "4", "--save_every_n_steps", "2", "--optimizer_type",
          "toy_arch.RecordingSGDScheduleFree", "--lr_scheduler", "linear")  # fmt: skip
    # train for the loop, eval around the step-2 save and the final save (weights are saved in eval mode)
    assert RecordingSGDScheduleFree.calls == ["train", "eval", "train", "eval", "train"]


def test_jsonl_tracker_records_every_step(toy, tmp_path):
    from musubi_tuner.training.trackers import METRICS_FILE, read_metrics

    train(*toy, tmp_path / "a", "--max_train_steps", "3", "--log_with", "jsonl", "--logging_dir", str(tmp_path / "logs"))
    (metrics,) = (tmp_path / "logs").rglob(METRICS_FILE)
    records = [r for r in read_metrics(metrics) if "loss/current" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(isinstance(r["loss/current"], float) for r in records)
