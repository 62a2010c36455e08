"""``qwen_image_generate_image.py`` through the CLI on the tiny bundle: the five seed fixes of the upstream integration
design and the batch-mode defects of specs/qwen_image.md §9.1, the upstream flags, metadata, latents, Layered layers,
inpainting, and the true-CFG formula."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blissful_tuner.metadata import read_metadata
from musubi_tuner.demo.qwen_image_bundle import write_qwen_image_dataset
from musubi_tuner.qwen_image.generate.args import parse_args, setup_parser
from musubi_tuner.qwen_image.pipeline import true_cfg
from musubi_tuner.qwen_image_generate_image import main

# specs/upstream_flags/qwen_image_{musubi,blissful}.txt (generate script + add_model_version_args)
UPSTREAM_FLAGS = """--dit --num_layers --disable_numpy_memmap --vae --vae_enable_tiling --text_encoder --lora_weight --lora_multiplier
--include_patterns --exclude_patterns --save_merged_model --guidance_scale --prompt --negative_prompt
--automatic_prompt_lang_for_layered --image_size --output_layers --control_image_path --mask_path
--resize_control_to_image_size --resize_control_to_official_size --infer_steps --save_path --seed --embedded_cfg_scale
--flow_shift --fp8 --fp8_scaled --text_encoder_cpu --device --attn_mode --blocks_to_swap --use_pinned_memory_for_block_swap
--output_type --no_metadata --latent_path --lycoris --append_original_name --rcm_threshold --rcm_relative_threshold
--rcm_kernel_size --rcm_dilate_size --rcm_debug_save --from_file --interactive --bell --edit --edit_plus --model_version
--compile""".split()


@pytest.fixture(scope="module")
def qi(qwen_bundle, tmp_path_factory):
    """The bundle plus an edit dataset's control images (two per item) for control inputs."""
    ds = write_qwen_image_dataset(tmp_path_factory.mktemp("qi_gen_data"), n_images=1, controls=2)
    return qwen_bundle, sorted(ds.control_dir.glob("*.png"))


def base(bundle, out: Path, *extra: str, dit=None, vae=None) -> list[str]:
    return [
        "--dit", str(dit or bundle.dit), "--vae", str(vae or bundle.vae), "--text_encoder", str(bundle.text_encoder),
        "--save_path", str(out), "--device", "cpu", "--dit_dtype", "float32", "--vae_dtype", "float32",
        "--infer_steps", "2", *extra,
    ]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def pngs(d: Path) -> list[Path]:
    return sorted(d.glob("*.png")) if d.exists() else []


def test_parser_is_built_once_with_every_upstream_flag():
    """One parser from the shared groups: no duplicate --compile (blissful-tuner's start-up crash, §9.1 item 1)."""
    parser = setup_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    assert [f for f in UPSTREAM_FLAGS if f not in options] == []
    assert sum("--compile" in a.option_strings for a in parser._actions) == 1


def test_batch_file_options_only_lines_wildcards_and_sizes(qi, tmp_path):
    """Seed fixes 1, 2 and 5: an options-only line inherits --prompt; __wildcards__ expand in every line and in the
    per-line negative, reproducibly from the line's seed; N lines of different sizes write N correct images, each
    equal to the one-off generation with the same settings."""
    bundle, _ = qi
    wild = tmp_path / "wild"
    wild.mkdir()
    (wild / "color.txt").write_text("crimson\nteal\nochre\nviolet\n", encoding="utf-8")
    batch = tmp_path / "prompts.txt"
    batch.write_text(
        "a __color__ cat --w 64 --h 48 --d 5 --n no __color__ at all\n"
        "--w 32 --h 32 --d 6\n"
        "a __color__ bird --w 48 --h 32 --d 7 --s 3\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    argv = base(bundle, out, "--from_file", str(batch), "--prompt", "a plain dog", "--prompt_wildcards", str(wild))
    assert run_cli(argv) == 0
    files = pngs(out)
    assert len(files) == 3
    by_seed = {read_metadata(p)["bt_seeds"]: p for p in files}
    sizes = {s: Image.open(p).size for s, p in by_seed.items()}
    assert sizes == {"5": (64, 48), "6": (32, 32), "7": (48, 32)}
    md5, md6, md7 = (read_metadata(by_seed[s]) for s in ("5", "6", "7"))
    assert md6["bt_prompt"] == "a plain dog"
    assert "__" not in md5["bt_prompt"] and md5["bt_prompt_unexpanded"] == "a __color__ cat"
    assert md5["bt_negative_prompt"].startswith("no ") and "__" not in md5["bt_negative_prompt"]
    assert "__" not in md7["bt_prompt"]
    # reproducible: the same batch expands identically
    jobs_args = parse_args(argv)
    from blissful_tuner.generation_loop import load_jobs
    from musubi_tuner.qwen_image.generate.plan import FIELD_MAP, validate_job

    again = load_jobs(jobs_args, field_map=FIELD_MAP, size_multiple=16, validate=validate_job)
    assert [j.prompt for j in again] == [md5["bt_prompt"], "a plain dog", md7["bt_prompt"]]
    assert again[0].negative_prompt == md5["bt_negative_prompt"]
    # the batch image of line 3 equals the one-off generation of the same job
    single = tmp_path / "single"
    assert run_cli(base(bundle, single, "--prompt", md7["bt_prompt"], "--image_size", "32", "48", "--seed", "7",
                        "--infer_steps", "3")) == 0  # fmt: skip
    (one,) = pngs(single)
    assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(by_seed["7"])))


def test_options_only_line_without_prompt_is_an_error_naming_the_line(qi, tmp_path, capsys):
    bundle, _ = qi
    batch = tmp_path / "p.txt"
    batch.write_text("a cat --w 32 --h 32\n--w 32 --h 32 --d 3\n", encoding="utf-8")
    assert run_cli(base(bundle, tmp_path / "o", "--from_file", str(batch))) == 2
    err = capsys.readouterr().err
    assert f"{batch.name}:2" in err or f"{batch}:2" in err
    assert "no prompt" in err and not pngs(tmp_path / "o")


@pytest.mark.parametrize(
    "line,expect",
    [
        ("a cat --w 40 --h 32", "not a multiple of 16"),
        ("a cat --lora_weight x.safetensors", "cannot be changed per line"),
        ("a cat --f 5", "not supported by this script"),
        ("a cat --ci missing.png", "file not found"),
    ],
)
def test_bad_lines_fail_before_any_model_loads(qi, tmp_path, capsys, line, expect):
    """§9.1 items 4 and 5: every line is validated first; errors name file and line; nothing is written."""
    bundle, _ = qi
    batch = tmp_path / "p.txt"
    batch.write_text(f"a good line --w 32 --h 32\n{line}\n", encoding="utf-8")
    out = tmp_path / "o"
    # a DiT path that does not load proves no model was touched: validation fails first
    assert run_cli(base(bundle, out, "--from_file", str(batch))) == 2
    err = capsys.readouterr().err
    assert expect in err and ":2" in err
    assert not out.exists() or not any(out.iterdir())


def test_runtime_failure_is_summarised_and_exit_is_non_zero(qi, tmp_path, capsys):
    """§9.1 item 6: a job that fails at run time is skipped, the others are written, a summary names the line."""
    bundle, controls = qi
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    batch = tmp_path / "p.txt"
    batch.write_text(f"recolor it --ci {controls[0]} --w 32 --h 32\nrecolor it --ci {broken} --w 32 --h 32\n", encoding="utf-8")
    out = tmp_path / "o"
    assert run_cli(base(bundle, out, "--model_version", "edit", "--from_file", str(batch), "--resize_control_to_image_size")) == 2
    err = capsys.readouterr().err
    assert "1 of 2 job(s) failed" in err and ":2" in err and "broken.png" in err
    assert len(pngs(out)) == 1


def test_vl_processor_needed_for_edit_and_found_offline(qi, tmp_path, capsys):
    """Seed fixes 3/4: edit models load the VL processor (from a local path) in batch mode; without one the error
    names --vl_processor; with --vl_processor the same run works."""
    bundle, controls = qi
    te = tmp_path / "te_no_processor"
    shutil.copytree(bundle.text_encoder, te)
    (te / "preprocessor_config.json").unlink()
    batch = tmp_path / "p.txt"
    batch.write_text(f"recolor it --ci {controls[0]} --ci {controls[1]} --w 32 --h 32\n", encoding="utf-8")
    argv = base(bundle, tmp_path / "o", "--model_version", "edit-2511", "--from_file", str(batch), "--resize_control_to_image_size")
    argv[argv.index("--text_encoder") + 1] = str(te)
    assert run_cli(argv) == 2
    assert "--vl_processor" in capsys.readouterr().err
    assert run_cli([*argv, "--vl_processor", str(bundle.text_encoder), "--append_original_name", "--seed", "7"]) == 0
    (png,) = pngs(tmp_path / "o")  # the reference's name: <time>_<seed>_<first control's name>_<batch index>.png
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-\d{{3}}_7_{re.escape(controls[0].stem)}_000\.png", png.name)


def test_interactive_edit_and_layered_auto_caption(qi, tmp_path):
    """Seed fixes 3/4 in interactive mode: an edit job sees its control images; Layered captions its input (batch)."""
    from musubi_tuner.qwen_image_generate_image import run

    bundle, controls = qi
    lines = iter([f"make it green --ci {controls[0]} --w 32 --h 32 --d 1", "# comment", "--w 32 --h 32 --d 2"])

    def read_line(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = parse_args(base(bundle, tmp_path / "i", "--model_version", "edit", "--interactive", "--prompt", "x",
                           "--control_image_path", str(controls[1]), "--resize_control_to_image_size"))  # fmt: skip
    files = run(args, read_line=read_line)
    assert len(files) == 2
    mds = sorted((read_metadata(p) for p in files), key=lambda m: m["bt_seeds"])
    assert mds[0]["bt_control_images"] == controls[0].name and mds[1]["bt_control_images"] == controls[1].name

    layered_in = tmp_path / "input.png"
    Image.new("RGBA", (32, 32), (200, 40, 40, 255)).save(layered_in)
    batch = tmp_path / "l.txt"
    batch.write_text(f"--ci {layered_in} --d 4\n", encoding="utf-8")
    out = tmp_path / "l"
    argv = base(bundle, out, "--model_version", "layered", "--from_file", str(batch), "--automatic_prompt_lang_for_layered",
                "en", "--caption_max_new_tokens", "4", "--output_layers", "2", "--image_size", "32", "32",
                dit=bundle.dit_layered, vae=bundle.vae_layered)  # fmt: skip
    assert run_cli(argv) == 0
    layers = pngs(out)
    assert [re.sub(r"^\d{8}-\d{6}-\d{3}", "T", p.name) for p in layers] == ["T_layer0_4_000.png", "T_layer1_4_000.png"]
    assert Image.open(layers[0]).mode == "RGBA"
    assert read_metadata(layers[0])["bt_prompt"] not in ("", "<auto caption>")


def test_utf8_metadata_latent_output_and_decode(qi, tmp_path):
    """§9.1 item 9: UTF-8 PNG metadata with model version and LoRA; --output_type latent_images + --latent_path."""
    bundle, _ = qi
    from musubi_tuner.networks.lora_qwen_image import create_arch_network
    from musubi_tuner.qwen_image.configs import get_model_version
    from musubi_tuner.qwen_image.models.loading import load_dit

    net = create_arch_network(1.0, 4, 4, None, None, load_dit(get_model_version("original"), bundle.dit, dtype=torch.float32))
    lora = tmp_path / "lora.safetensors"
    net.save_weights(str(lora), torch.float32, None)
    out = tmp_path / "o"
    argv = base(bundle, out, "--prompt", "一只猫 in the snow", "--image_size", "32", "32", "--seed", "9",
                "--output_type", "latent_images", "--lora_weight", str(lora), "--lora_multiplier", "0.5",
                "--embedded_cfg_scale", "2.5")  # fmt: skip
    assert run_cli(argv) == 0
    (png,) = pngs(out)
    md = read_metadata(png)
    assert md["bt_prompt"] == "一只猫 in the snow" and md["bt_model_version"] == "original"
    assert md["bt_lora_0"] == "lora.safetensors: 0.5" and md["bt_guidance_scale"] == "4.0"
    (latent,) = sorted(out.glob("*_latent.safetensors"))
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}_9_000\.png", png.name)
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}_9_latent\.safetensors", latent.name)
    dec = tmp_path / "dec"
    assert run_cli(["--vae", str(bundle.vae), "--text_encoder", str(bundle.text_encoder), "--latent_path", str(latent),
                    "--save_path", str(dec), "--device", "cpu", "--vae_dtype", "float32"]) == 0  # fmt: skip
    (decoded,) = pngs(dec)  # the reference appends the latent's name when decoding
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-\d{{3}}_9_{re.escape(latent.stem)}_000\.png", decoded.name)
    assert np.array_equal(np.asarray(Image.open(decoded)), np.asarray(Image.open(png)))


def test_black_mask_keeps_the_control_image(qi, tmp_path):
    """Inpainting with a mask that regenerates nothing returns the control image (through the VAE) exactly."""
    bundle, controls = qi
    from musubi_tuner.qwen_image.generate.images import to_pixels
    from musubi_tuner.qwen_image.vae import QwenImageVae

    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 0).save(mask)
    out = tmp_path / "o"
    argv = base(bundle, out, "--model_version", "edit", "--prompt", "p", "--control_image_path", str(controls[0]),
                "--mask_path", str(mask), "--image_size", "32", "32")  # fmt: skip
    assert run_cli(argv) == 0
    (png,) = pngs(out)
    vae = QwenImageVae.load(bundle.vae, dtype=torch.float32)
    ref = vae.decode(vae.encode(to_pixels(Image.open(controls[0]).convert("RGB"), (32, 32))))
    want = ((ref[0] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), want)


def test_control_sizes():
    """Default: about 1 MP keeping the aspect (multiples of 16); official: ~1024² in multiples of 32; or the output."""
    from musubi_tuner.qwen_image.generate.images import control_size

    w, h = control_size((800, 600), (64, 48), to_image_size=False, to_official=False)
    assert w % 16 == 0 and h % 16 == 0 and abs(w * h - 1024 * 1024) < 0.03 * 1024 * 1024 and abs(w / h - 4 / 3) < 0.02
    w, h = control_size((600, 800), (64, 48), to_image_size=False, to_official=True)
    assert w % 32 == 0 and h % 32 == 0 and abs(w * h - 1024 * 1024) < 0.05 * 1024 * 1024 and w < h
    assert control_size((600, 800), (64, 48), to_image_size=True, to_official=False) == (64, 48)


def test_true_cfg_norm_rescale():
    """comb = neg + s·(pos − neg), then comb·‖pos‖/‖comb‖ per token (computed here independently)."""
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    got = true_cfg(pos, neg, 4.0)
    for t in range(5):
        comb = [n + 4.0 * (p - n) for p, n in zip(pos[0, t].tolist(), neg[0, t].tolist())]
        scale = sum(p * p for p in pos[0, t].tolist()) ** 0.5 / sum(c * c for c in comb) ** 0.5
        assert got[0, t].tolist() == pytest.approx([c * scale for c in comb], rel=1e-5)


def test_parse_args_rejections():
    def bad(*argv: str) -> str:
        from musubi_tuner.utils.errors import UserError

        with pytest.raises(UserError) as e:
            parse_args(["--text_encoder", ".", "--save_path", "o", "--device", "cpu", *argv])
        return str(e.value)

    assert "multiple of 16" in bad("--prompt", "p", "--image_size", "40", "32", "--output_type", "latent")
    assert "mutually exclusive" in bad("--edit", "--edit_plus", "--prompt", "p")
    assert "conflicts" in bad("--edit", "--model_version", "layered", "--prompt", "p")
    assert "layered" in bad("--automatic_prompt_lang_for_layered", "en", "--prompt", "p")
    assert "no --lora_weight" in bad("--prompt", "p", "--include_patterns", "x")
    assert isinstance(setup_parser(), argparse.ArgumentParser)
