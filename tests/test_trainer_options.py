"""Common parser, --config_file precedence, optimizers (§7), LR schedulers (§8), metadata (§12), save naming and
pruning (§10) — unit level."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from musubi_tuner.training import saving
from musubi_tuner.training.args import parse_kv_args, read_config_from_file, setup_parser_common
from musubi_tuner.training.lr_schedulers import RexLR, get_lr_scheduler, parse_step_count
from musubi_tuner.training.metadata import finalize_metadata, training_metadata
from musubi_tuner.training.optimizers import get_optimizer, resolve_optimizer_class
from musubi_tuner.utils.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "musubi_tuner"


def parse(*argv: str):
    return setup_parser_common().parse_args(list(argv))


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


# -------------------------------------------------------------------------------------------------- parser / config


def test_every_common_option_is_consumed():
    """§20 #10: each option of the common parser is read somewhere in the trainer code."""
    code = (SRC / "hv_train_network.py").read_text() + "".join(p.read_text() for p in (SRC / "training").glob("*.py"))
    code += (SRC / "modules" / "attention.py").read_text()  # attention flags are read by attention_mode_from_args
    code += "".join(p.read_text() for p in (SRC / "memory").glob("*.py"))  # the --estimate_memory options
    parser = setup_parser_common()
    unused = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        dest = action.dest
        if not re.search(rf"args\.{dest}\b|\"{dest}\"|'{dest}'|{dest}=args", code):
            unused.append(dest)
    assert not unused


def test_config_file_flattened_and_cli_wins(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        '[model]\ndit = "from_file.safetensors"\n[opt]\nlearning_rate = 0.5\noptimizer_args = ["weight_decay=0.1"]\n'
        "gradient_checkpointing = true\nmax_train_steps = 7\n",
        encoding="utf-8",
    )
    parser = setup_parser_common()
    argv = ["--config_file", str(tmp_path / "run"), "--learning_rate", "0.25"]
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    assert args.dit == "from_file.safetensors"
    assert args.learning_rate == 0.25  # CLI overrides the file
    assert args.max_train_steps == 7 and args.gradient_checkpointing is True
    assert args.optimizer_args == ["weight_decay=0.1"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("no_such_option = 1\n", "unknown option 'no_such_option'"),
        ("max_train_steps = 'many'\n", "max_train_steps"),
        ("sdpa = 3\n", "sdpa"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path, text, match):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text, encoding="utf-8")
    parser = setup_parser_common()
    argv = ["--config_file", str(cfg)]
    with pytest.raises(UserError, match=match):
        read_config_from_file(parser.parse_args(argv), parser, argv)


def test_string_seed_is_hashed_and_defaults():
    a = parse("--seed", "hello")
    assert isinstance(a.seed, int) and a.seed == parse("--seed", "hello").seed and 0 <= a.seed < 2**32
    d = parse()
    assert (d.max_train_steps, d.learning_rate, d.max_grad_norm, d.lr_scheduler, d.timestep_sampling) == (
        1600,
        2e-6,
        1.0,
        "constant",
        "sigma",
    )
    assert (d.gradient_accumulation_steps, d.mixed_precision, d.discrete_flow_shift, d.mode_scale, d.network_alpha) == (
        1,
        "no",
        1.0,
        1.29,
        1,
    )


def test_kv_args_are_literals():
    assert parse_kv_args(["weight_decay=0.01", "betas=(0.9,0.95)", "name='x'"], "--optimizer_args") == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.95),
        "name": "x",
    }
    with pytest.raises(UserError, match="--optimizer_args: value of 'mode' is not a Python literal"):
        parse_kv_args(["mode=fast"], "--optimizer_args")


# -------------------------------------------------------------------------------------------------- optimizers


def test_default_optimizer_is_adamw():
    args = parse("--learning_rate", "0.01")
    name, _, opt = get_optimizer(args, params())
    assert type(opt) is torch.optim.AdamW and name == "torch.optim.adamw.AdamW"
    assert resolve_optimizer_class("") is torch.optim.AdamW


def test_optimizer_names_and_args():
    assert resolve_optimizer_class("sgd") is torch.optim.SGD
    assert resolve_optimizer_class("torch.optim.RMSprop") is torch.optim.RMSprop
    args = parse("--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.3", "betas=(0.8,0.9)")
    _, desc, opt = get_optimizer(args, params())
    assert opt.param_groups[0]["weight_decay"] == 0.3 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert desc == "weight_decay=0.3,betas=(0.8, 0.9)"
    with pytest.raises(UserError, match="AdamW8bit needs bitsandbytes"):
        resolve_optimizer_class("AdamW8bit")
    with pytest.raises(UserError, match="not a torch.optim optimizer"):
        resolve_optimizer_class("NoSuchOpt")


def test_adafactor_relative_step_forces_scheduler():
    args = parse("--optimizer_type", "adafactor", "--learning_rate", "0.001")
    _, _, opt = get_optimizer(args, [{"params": params(), "lr": 0.001}])
    assert type(opt).__name__ == "Adafactor" and args.lr_scheduler == "adafactor:0.001"
    sched = get_lr_scheduler(args, opt, 1)
    assert type(sched).__name__ == "AdafactorSchedule"


# -------------------------------------------------------------------------------------------------- schedulers


def test_step_count_forms():
    assert parse_step_count("10", 200, "x") == 10
    assert parse_step_count("0.1", 200, "x") == 20
    assert parse_step_count("25%", 200, "x") == 50
    with pytest.raises(UserError):
        parse_step_count("ten", 200, "x")


def lrs(args, steps, processes=1):
    opt = torch.optim.SGD(params(), lr=args.learning_rate)
    sched = get_lr_scheduler(args, opt, processes)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        for _ in range(processes):
            sched.step()
    return out


def test_rex_formula():
    args = parse("--lr_scheduler", "rex", "--learning_rate", "1.0", "--max_train_steps", "10", "--lr_warmup_steps", "2")
    got = lrs(args, 10)
    m = 0.01
    expected = []
    for s in range(10):
        if s < 2:
            expected.append(m + (1 - m) * s / 2)
        else:
            z = 1 - (s - 2) / 8
            expected.append(m + (1 - m) * z / (0.1 + 0.9 * z))
    assert got == pytest.approx(expected)
    assert isinstance(get_lr_scheduler(args, torch.optim.SGD(params(), lr=1.0), 1), RexLR)


def test_transformers_schedulers_and_process_scaling():
    args = parse("--lr_scheduler", "linear", "--learning_rate", "1.0", "--max_train_steps", "10", "--lr_warmup_steps", "20%")
    one = lrs(args, 10)
    assert one[:3] == pytest.approx([0.0, 0.5, 1.0]) and one[-1] == pytest.approx(0.125)
    assert lrs(args, 10, processes=2) == pytest.approx(one)  # per optimizer step, independent of process count
    args = parse(
        "--lr_scheduler",
        "cosine_with_restarts",
        "--lr_scheduler_num_cycles",
        "2",
        "--learning_rate",
        "1.0",
        "--max_train_steps",
        "8",
    )
    assert lrs(args, 8)[4] == pytest.approx(1.0)
    args = parse("--lr_scheduler", "piecewise_constant", "--learning_rate", "1.0", "--lr_scheduler_args", "step_rules='1:2,0.1'")
    assert lrs(args, 4) == pytest.approx([1.0, 1.0, 0.1, 0.1])
    args = parse("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5", "--learning_rate", "1.0")
    assert lrs(args, 5) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])
    with pytest.raises(UserError, match="unknown"):
        lrs(parse("--lr_scheduler", "nope"), 1)


def test_polynomial_inverse_sqrt_and_wsd_options():
    args = parse(
        "--lr_scheduler", "polynomial", "--lr_scheduler_power", "2", "--learning_rate", "1.0", "--max_train_steps", "4"
    )  # fmt: skip
    # transformers' polynomial decay to lr_end 1e-7: (lr − end)·(1 − s/T)^power + end
    assert lrs(args, 4) == pytest.approx([(1 - 1e-7) * (1 - s / 4) ** 2 + 1e-7 for s in range(4)])
    args = parse("--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "4", "--learning_rate", "1.0")
    one = lrs(args, 6)
    assert one == pytest.approx([1 / math.sqrt((s + 4) / 4) for s in range(6)])
    assert lrs(args, 6, processes=2) == pytest.approx(one)  # the timescale counts optimizer steps too
    args = parse(
        "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "25%",
        "--lr_scheduler_min_lr_ratio", "0.5", "--learning_rate", "1.0", "--max_train_steps", "8",
    )  # fmt: skip
    got = lrs(args, 8)
    # transformers' WSD warms up from the floor: min_lr_ratio + (1 − min_lr_ratio)·s/W
    assert got[:2] == pytest.approx([0.5, 0.75]) and got[2:6] == pytest.approx([1.0] * 4)
    # cosine decay over the last 2 steps towards 0.5·lr: 0.5 + 0.5·(1 + cos(π·1/2))/2 at step 7
    assert got[6:] == pytest.approx([1.0, 0.75])
    with pytest.raises(UserError, match="--lr_decay_steps is used by --lr_scheduler warmup_stable_decay"):
        lrs(parse("--lr_scheduler", "linear", "--lr_decay_steps", "3"), 1)


# -------------------------------------------------------------------------------------------------- noise extras


def test_noise_offset_per_batch_and_channel():
    from musubi_tuner.training.noise import apply_noise_offset

    latents = torch.randn(3, 4, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(latents)
    out = apply_noise_offset(latents, noise, 0.1, generator=torch.Generator().manual_seed(7))
    draw = torch.randn(3, 4, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out, noise + 0.1 * draw, atol=1e-6)
    out = apply_noise_offset(latents, noise, 0.1, adaptive_scale=2.0, generator=torch.Generator().manual_seed(7))
    offset = (0.1 + 2.0 * latents.mean(dim=(2, 3, 4), keepdim=True).abs()).clamp(min=0)
    assert torch.allclose(out, noise + offset * draw, atol=1e-6)
    # random strength: a single factor uniform in [0, 1) scales the offset (drawn before the normal)
    g = torch.Generator().manual_seed(3)
    out = apply_noise_offset(latents, noise, 0.1, random_strength=True, generator=g)
    g = torch.Generator().manual_seed(3)
    strength = float(torch.rand(1, generator=g))
    assert torch.allclose(out, noise + 0.1 * strength * torch.randn(3, 4, 1, 1, 1, generator=g), atol=1e-6)


def test_pyramid_noise_is_normalised_and_low_frequency():
    from musubi_tuner.training.noise import pyramid_noise

    noise = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pyramid_noise(noise.clone(), 6, 0.8, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape and float(out.std()) == pytest.approx(1.0, abs=1e-4)

    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert abs(neighbour_corr(noise)) < 0.05 and neighbour_corr(out) > 0.15
    # frames are folded into the batch: each frame gets its own low-frequency field
    assert not torch.allclose(out[:, :, 0] - noise[:, :, 0] / out.std(), out[:, :, 1] - noise[:, :, 1] / out.std())


def test_show_timesteps_exits_before_loading_anything(capsys):
    from toy_arch import ToyTrainer

    # no --dit, a dataset config that does not exist: --show_timesteps needs neither
    args = parse("--dataset_config", "missing.toml", "--timestep_sampling", "logsnr", "--show_timesteps", "console")
    ToyTrainer().train(args)
    out = capsys.readouterr().out
    assert "logsnr" in out and "100000 samples" in out


def test_noise_options_need_noise_offset(tmp_path):
    from toy_arch import ToyTrainer

    for flag in (["--adaptive_noise_scale", "0.1"], ["--noise_offset_random_strength"]):
        args = parse("--dataset_config", "x.toml", "--dit", "x", *flag)
        with pytest.raises(UserError, match="needs --noise_offset"):
            ToyTrainer().train(args)


# -------------------------------------------------------------------------------------------------- metadata / saving


def metadata_args(*extra: str):
    return parse(
        "--output_name", "my_lora", "--network_module", "networks.lora", "--network_dim", "4", "--dit", "/x/dit.safetensors", *extra
    )


def build_md(args):
    base = training_metadata(
        args,
        arch_full_name="kandinsky5",
        session_id=1,
        training_started_at=0.0,
        num_train_items=4,
        num_batches_per_epoch=2,
        num_epochs=3,
        optimizer_desc="torch.optim.adamw.AdamW()",
        datasets_json="[]",
        network_args={"conv_dim": "4"},
    )
    return finalize_metadata(base, args, "kandinsky5", steps=5, epoch=2)


def test_metadata_keys():
    md = build_md(metadata_args("--metadata_title", "Café ☕", "--min_timestep", "100", "--metadata_reso", "640,480"))
    assert md["ss_base_model_version"] == "kandinsky5" and md["ss_sd_model_name"] == "dit.safetensors"
    assert md["ss_steps"] == "5" and md["ss_epoch"] == "2" and json.loads(md["ss_network_args"]) == {"conv_dim": "4"}
    assert md["modelspec.sai_model_spec"] == "1.0.0" and md["modelspec.architecture"] == "Kandinsky-5/lora"
    assert md["modelspec.title"] == "Café ☕"  # UTF-8 kept (§20 #19)
    assert md["modelspec.timestep_range"] == "100,1000" and md["modelspec.resolution"] == "640x480"
    assert all(isinstance(v, str) for v in md.values())
    assert "ss_noise_offset" not in md and "ss_multires_noise_discount" not in md  # extras only when used
    noisy = build_md(metadata_args("--noise_offset", "0.05", "--multires_noise_iterations", "6"))
    assert (noisy["ss_noise_offset"], noisy["ss_multires_noise_iterations"], noisy["ss_multires_noise_discount"]) == (
        "0.05",
        "6",
        "0.3",
    )
    minimal = build_md(metadata_args("--no_metadata"))
    assert {k for k in minimal if k.startswith("ss_")} == {
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
    }
    assert minimal["modelspec.title"] == "my_lora"


def test_save_names_and_precision():
    assert saving.epoch_name("x", 3) == "x-000003" and saving.step_name("x", 120) == "x-step00000120"
    assert saving.state_dir("/o", "x-000003") == Path("/o/x-000003-state")
    assert saving.save_dtype(parse()) is torch.float32
    assert saving.save_dtype(parse("--save_precision", "bf16")) is torch.bfloat16
    assert saving.save_dtype(parse("--save_precision", "float")) is torch.float32


def test_pruning_rules(tmp_path):
    args = SimpleNamespace(
        output_dir=str(tmp_path),
        output_name="x",
        save_every_n_steps=2,
        save_last_n_steps=3,
        save_last_n_steps_state=None,
        save_every_n_epochs=2,
        save_last_n_epochs=2,
        save_last_n_epochs_state=1,
    )
    for s in (2, 4, 6, 8):
        (tmp_path / f"x-step{s:08d}.safetensors").write_bytes(b"")
    saving.prune_step_saves(args, 8)  # r = 8 - 3 - 1 = 4 -> delete step 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"x-step{s:08d}.safetensors" for s in (2, 6, 8)]
    for e in (2, 4, 6):
        (tmp_path / f"x-{e:06d}.safetensors").write_bytes(b"")
        (tmp_path / f"x-{e:06d}-state").mkdir()
    saving.prune_epoch_saves(args, 6)  # LoRA: 6 - 2*2 = 2 deleted; state: 6 - 1*2 = 4 deleted
    names = {p.name for p in tmp_path.iterdir()}
    assert "x-000002.safetensors" not in names and "x-000004.safetensors" in names
    assert "x-000004-state" not in names and "x-000002-state" in names


def test_hugging_face_options_refused():
    from musubi_tuner.training.args import check_unsupported_hf

    with pytest.raises(UserError, match="--huggingface_repo_id: Hugging Face upload/download is not supported"):
        check_unsupported_hf(parse("--huggingface_repo_id", "me/x"))
    check_unsupported_hf(parse())


def test_image_flow_shift_applies_to_single_frame_video_batches_only():
    from musubi_tuner.hv_train_network import NetworkTrainer

    argv = ["--dataset_config", "x.toml", "--dit", "x.safetensors", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0"]
    args = setup_parser_common().parse_args([*argv, "--image_flow_shift", "1.0"])
    trainer = NetworkTrainer()
    trainer._build_timestep_samplers(args)
    u = [0.1, 0.5, 0.9]

    def draw(frames: int) -> torch.Tensor:
        latents = torch.zeros(3, 4, frames, 8, 8)
        batch = {"timesteps": u}
        return trainer.get_noisy_model_input_and_timesteps(args, torch.zeros_like(latents), latents, batch, "cpu", torch.float32)[1]

    unshifted, shifted = draw(1), draw(5)
    # same base draws; the multi-frame batch gets shift 3: t' = 3t / (1 + 2t), the single-frame batch shift 1 (identity)
    assert torch.allclose(shifted, 3 * unshifted / (1 + 2 * unshifted), atol=1e-6)
    assert not torch.allclose(shifted, unshifted)
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing (range-checked option)
        setup_parser_common().parse_args([*argv, "--image_flow_shift", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_own_schedules_equal_transformers(name):
    """The common schedules are computed without importing transformers (start-up time); same values as its own."""
    from transformers import get_scheduler

    steps, warmup = 12, 0 if name == "constant" else 3
    argv = ["--lr_scheduler", name, "--learning_rate", "0.5", "--max_train_steps", str(steps), "--lr_warmup_steps", str(warmup)]
    ours = lrs(parse(*argv, "--lr_scheduler_num_cycles", "2", "--lr_scheduler_power", "2"), steps + 2)
    opt = torch.optim.SGD(params(), lr=0.5)
    specific = {"cosine_with_restarts": {"num_cycles": 2}, "polynomial": {"power": 2.0}}.get(name, {})
    kwargs = {} if name.startswith("constant") else {"num_training_steps": steps}
    if name != "constant":
        kwargs["num_warmup_steps"] = warmup
    ref_sched = get_scheduler(name, opt, scheduler_specific_kwargs=specific, **kwargs)
    ref = []
    for _ in range(steps + 2):
        ref.append(opt.param_groups[0]["lr"])
        ref_sched.step()
    assert ours == pytest.approx(ref, abs=1e-12)
