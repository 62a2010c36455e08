"""Batch/interactive machinery with encode/generate/save functions defined here, and the shared argument groups."""

from __future__ import annotations

import argparse

import pytest

from blissful_tuner.blissful_core import add_blissful_generation_args, add_blissful_k5_args, parse_blissful_args
from blissful_tuner.generation_loop import interactive_jobs, load_jobs, run_interactive, run_jobs
from blissful_tuner.seeds import seed_to_int
from musubi_tuner.utils.errors import UserError


def _parser():
    p = argparse.ArgumentParser()
    # What a generate script defines itself.
    p.add_argument("--prompt", default=None)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--seed", default=None)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--video_length", type=int, default=17)
    p.add_argument("--infer_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--flow_shift", type=float, default=5.0)
    p.add_argument("--scheduler_scale", type=float, default=5.0)
    p.add_argument("--image", default=None)
    p.add_argument("--task", default="k5-lite")
    p.add_argument("--lora_weight", nargs="*", default=None)
    add_blissful_generation_args(p)
    add_blissful_k5_args(p)
    return p


def _args(*argv):
    return parse_blissful_args(_parser().parse_args(list(argv)))


def test_batch_file_jobs_in_order_with_overrides_seeds_and_wildcards(tmp_path):
    wc = tmp_path / "wc"
    wc.mkdir()
    (wc / "animal.txt").write_text("cat\ndog\nfox\n", encoding="utf-8")
    img = tmp_path / "in.png"
    img.write_bytes(b"x")
    batch = tmp_path / "batch.txt"
    batch.write_text(
        "# comment\n"
        "a __animal__ --w 256 --d kitty --n no __animal__\n"
        "--s 8 --fs 3 --cs 1-4 --i " + str(img) + "\n"
        "\n"
        "third --g 7 --d 5\n",
        encoding="utf-8",
    )
    args = _args(
        "--prompt",
        "cli prompt",
        "--negative_prompt",
        "cli neg",
        "--from_file",
        str(batch),
        "--seed",
        "11",
        "--prompt_wildcards",
        str(wc),
    )
    jobs = load_jobs(args, size_multiple=16)
    assert [j.index for j in jobs] == [0, 1, 2]
    j0, j1, j2 = jobs
    assert j0.seed == seed_to_int("kitty") and j0.args.seed == j0.seed and j0.args.width == 256
    assert j0.raw_prompt == "a __animal__" and j0.prompt.split()[1] in ("cat", "dog", "fox")
    assert j0.negative_prompt.split()[1] in ("cat", "dog", "fox")  # the per-line negative is expanded too
    assert j0.location.endswith("batch.txt:2")
    # Options-only line inherits the CLI prompt; aliases are set together; CLI seed string → its integer.
    assert j1.prompt == "cli prompt" and j1.negative_prompt == "cli neg" and j1.seed == 11
    assert (j1.args.infer_steps, j1.args.flow_shift, j1.args.scheduler_scale, j1.args.image) == (8, 3.0, 3.0, str(img))
    assert j2.args.guidance_scale == 7.0 and j2.args.width == 512 and args.width == 512  # CLI args untouched
    again = load_jobs(args, size_multiple=16)
    assert [j.prompt for j in again] == [j.prompt for j in jobs]  # wildcards reproducible from the seed


def test_batch_errors_name_lines(tmp_path):
    batch = tmp_path / "b.txt"
    batch.write_text(
        "--w 64\nok --w 100\nfine --cs 30\nx --i missing.png\ny --task other\nz --lora_weight a.safetensors\n", encoding="utf-8"
    )
    with pytest.raises(UserError) as e:
        load_jobs(_args("--from_file", str(batch)), size_multiple=16)
    msg = str(e.value)
    assert "b.txt:1: no prompt" in msg
    assert "b.txt:2: width 100 is not a multiple of 16" in msg
    assert "b.txt:3" in msg and "'30'" in msg
    assert "b.txt:4: file not found: missing.png" in msg
    assert "b.txt:5: --task cannot be changed per line" in msg
    assert "b.txt:6: --lora_weight cannot be changed per line" in msg


def test_single_cli_job_and_random_seed():
    jobs = load_jobs(_args("--prompt", "hello"))
    assert len(jobs) == 1 and jobs[0].prompt == "hello" and isinstance(jobs[0].seed, int)
    with pytest.raises(UserError, match="no prompt"):
        load_jobs(_args())


def test_run_jobs_encodes_once_per_prompt_and_skips_failures(tmp_path):
    batch = tmp_path / "b.txt"
    batch.write_text("same\nsame --d 3\nboom\nother\nsame --w 256\n", encoding="utf-8")
    jobs = load_jobs(_args("--from_file", str(batch), "--seed", "1"))
    log = []

    def encode(job):
        log.append(("encode", job.prompt, job.args.width))
        return f"emb:{job.prompt}"

    def generate(job, emb):
        log.append(("generate", job.index))
        if job.prompt == "boom":
            raise RuntimeError("out of memory")
        return (emb, job.seed)

    def save(job, latent):
        log.append(("save", job.index))
        return [tmp_path / f"{job.index}.png"]

    results = run_jobs(
        jobs,
        encode,
        generate,
        save,
        after_encode=lambda: log.append("free encoders"),
        after_generate=lambda: log.append("free dit"),
    )
    encodes = [e for e in log if e[0] == "encode"]
    assert encodes == [("encode", "same", 512), ("encode", "boom", 512), ("encode", "other", 512), ("encode", "same", 256)]
    assert log.index("free encoders") < log.index(("generate", 0)) and log.index("free dit") < log.index(("save", 0))
    assert [e for e in log if e[0] == "generate"] == [("generate", i) for i in range(5)]
    assert [e for e in log if e[0] == "save"] == [("save", i) for i in (0, 1, 3, 4)]
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert results[2].failed_stage == "generating" and "out of memory" in results[2].error
    assert results[1].outputs == [tmp_path / "1.png"]


def test_interactive_lines_errors_and_ctrl_c(capsys):
    lines = iter(["first --d 4", "", "bad --w x", "second --task t", "third", "boom", "fourth"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = _args("--interactive", "--negative_prompt", "neg")
    jobs = interactive_jobs(args, read_line=read)
    encoded = []

    def encode(job):
        encoded.append(job.prompt)
        return job.prompt

    def generate(job, emb):
        if emb == "boom":
            raise KeyboardInterrupt
        return emb

    results = run_interactive(jobs, encode, generate, lambda job, lat: [lat])
    assert [r.job.prompt for r in results] == ["first", "third", "boom", "fourth"]
    assert results[0].job.seed == 4 and results[0].job.negative_prompt == "neg"
    assert results[2].error == "interrupted" and results[3].outputs == ["fourth"]


def test_argument_groups_and_validation(tmp_path):
    # Both groups together on one parser (argparse raises on any option string defined twice).
    both = add_blissful_k5_args(add_blissful_generation_args(argparse.ArgumentParser()))
    assert len({s for a in both._actions for s in a.option_strings}) > 30
    a = _args("--codec", "prores")
    assert a.container == "mkv" and a.save_first_frame is True and a.compile_dynamic is None
    assert _args("--no-metadata").no_metadata is True
    assert _args("--no-save_first_frame").save_first_frame is False
    assert _args("--latent_path", "a.safetensors", "b.safetensors").decode_from_latent == ["a.safetensors", "b.safetensors"]
    assert _args("--use_nabla_attn").force_nabla_attn is True
    f = tmp_path / "b.txt"
    f.write_text("x\n", encoding="utf-8")
    bad = [
        (["--from_file", str(f), "--interactive"], "cannot be combined"),
        (["--text_encoder_cpu", "--quantized_qwen"], "text-encoder placement"),
        (["--force_traditional_attn", "--force_nabla_attn"], "cannot be combined"),
        (["--cfgzerostar_scaling", "--perp_neg", "1.5"], "cannot be combined"),
        (["--cfg_schedule", "1-30"], "'1-30'"),
        (["--preview_latent_every", "0"], ">= 1"),
        (["--preview_vae", str(tmp_path)], "needs --preview_latent_every"),
        (["--nabla_p", "1.5"], "--nabla_p"),
        (["--from_file", str(tmp_path / "none.txt")], "not found"),
        (["--crf", "10", "--video_bitrate", "1000"], "cannot be combined"),
        (["--codec", "prores", "--crf", "10"], "--crf is for h264/h265"),
        (["--codec", "prores", "--video_bitrate", "1000"], "--video_bitrate is for h264/h265"),
        (["--video_bitrate", "0"], "> 0"),
        (["--decode_from_latent", "a", "--interactive"], "cannot be combined"),
    ]
    for argv, fragment in bad:
        with pytest.raises(UserError, match=fragment):
            _args(*argv)
    sde = _parser().parse_args(["--preview_latent_every", "2"])
    sde.scheduler = "dpm++sde"
    with pytest.raises(UserError, match="SDE"):
        parse_blissful_args(sde)
