"""``kandinsky5_generate_video.py`` end to end on the tiny bundle: outputs, I2V, LoRAs, batch files, aliases, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blissful_tuner.metadata import read_metadata
from musubi_tuner.demo.bundles import tiny_dit_config, write_tiny_dit
from musubi_tuner.kandinsky5_generate_video import main, parse_args, run
from musubi_tuner.utils.prompt_lines import seed_to_int

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(k5_bundle) -> list[str]:
    b = k5_bundle
    return [
        "--task", "k5-lite-t2v-5s-sd", "--dit", str(b.dit), "--vae", str(b.vae),
        "--text_encoder_qwen", str(b.text_encoder_qwen), "--text_encoder_clip", str(b.text_encoder_clip),
        "--steps", "2", "--vae_dtype", "float32", "--width", "64", "--height", "64", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("k5_images")
    rng = np.random.RandomState(0)
    a, b = d / "first.png", d / "last.png"
    Image.fromarray((rng.rand(64, 96, 3) * 255).astype("uint8")).save(a)
    Image.fromarray((rng.rand(64, 96, 3) * 255).astype("uint8")).save(b)
    return a, b


def generate(argv: list[str]) -> list[Path]:
    return run(parse_args(argv))


def frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def user_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_t2v_mp4_with_metadata_into_a_new_directory(base, tmp_path):
    out = tmp_path / "a" / "b"
    files = generate(base + ["--prompt", "a red ball", "--video_length", "7", "--save_path", str(out), "--seed", "kitty"])
    seed = seed_to_int("kitty")
    video = [p for p in files if p.suffix == ".mp4"]
    assert len(video) == 1 and video[0].parent == out and video[0].stem.endswith(f"_{seed}")
    frames = frames_of(video[0])
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)  # 7 pixel frames rounded up to 9
    assert (out / f"{video[0].stem}_first.png").is_file()
    md = read_metadata(video[0])
    assert md["bt_seeds"] == str(seed) and md["bt_prompt"] == "a red ball" and md["bt_infer_steps"] == "2"
    assert md["bt_model_type"] == "Kandinsky 5 Lite" and md["bt_video_length"] == "9" and md["bt_width"] == "64"
    assert md["bt_negative_prompt"].startswith("Static, 2D cartoon")


def test_single_frame_png_and_exact_output_file(base, tmp_path):
    out = tmp_path / "new" / "still.png"
    files = generate(base + ["--prompt", "a cat", "--video_length", "1", "--output", str(out), "--seed", "3"])
    assert files == [out]
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.text["bt_seeds"] == "3"
    video = tmp_path / "clip.mkv"
    files = generate(base + ["--prompt", "a cat", "--frames", "2", "--output", str(video), "--no_metadata"])
    assert video in files and (tmp_path / "clip_first.png").is_file()
    assert len(frames_of(video)) == 5  # 2 latent frames = 5 pixel frames
    assert "bt_seeds" not in read_metadata(video)


def test_i2v_first_last_latents_equal_the_encoded_images(base, images, tmp_path, k5_bundle):
    from musubi_tuner.kandinsky5.configs import get_task_config
    from musubi_tuner.kandinsky5.pipeline import prepare_reference_images
    from musubi_tuner.kandinsky5.vae import load_k5_vae

    first, last = images
    out = tmp_path / "i2v.mp4"
    argv = base + ["--task", "k5-lite-i2v-5s-sd", "--prompt", "x", "--i", str(first), "--image_last", str(last)]
    generate(argv + ["--video_length", "9", "--output", str(out), "--output_type", "both", "--seed", "5"])
    frames = frames_of(out)
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)  # size follows the reference image
    latent = load_file(tmp_path / "i2v_latent.safetensors")["latent"]
    assert latent.shape == (3, 8, 12, 16)

    task = get_task_config("k5-lite-i2v-5s-sd")
    a, b, _ = prepare_reference_images(task, first, last)
    vae = load_k5_vae(k5_bundle.vae, "hunyuan_video", torch.float32)
    expected = vae.encode_image_condition(a, b, generator=torch.Generator().manual_seed(5))[0]
    torch.testing.assert_close(latent[0], expected[:, 0].permute(1, 2, 0), rtol=0, atol=0)
    torch.testing.assert_close(latent[2], expected[:, 1].permute(1, 2, 0), rtol=0, atol=0)


@pytest.fixture(scope="module")
def lora_file(k5_bundle, tmp_path_factory) -> Path:
    from musubi_tuner.kandinsky5.configs import get_task_config
    from musubi_tuner.kandinsky5.models.loading import load_dit
    from musubi_tuner.networks.lora_kandinsky import create_arch_network

    dit = load_dit(get_task_config(k5_bundle.task), k5_bundle.dit, dtype=torch.float32)
    net = create_arch_network(1.0, 4, 4.0, None, None, dit)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("lora") / "k5_lora.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "networks.lora_kandinsky"})
    return path


def test_lora_on_load_changes_the_output_and_equals_a_merged_dit(base, k5_bundle, lora_file, tmp_path):
    from musubi_tuner.merge_lora import main as merge_main

    common = ["--prompt", "a dog", "--video_length", "5", "--seed", "1", "--output_type", "latent"]

    def latent(extra: list[str], name: str) -> torch.Tensor:
        generate(base + common + extra + ["--output", str(tmp_path / f"{name}.safetensors")])
        return load_file(tmp_path / f"{name}.safetensors")["latent"]

    plain = latent([], "plain")
    with_lora = latent(["--lora_weight", str(lora_file), "--lora_multiplier", "0.8"], "lora")
    assert not torch.allclose(plain, with_lora, atol=1e-3)
    merged = tmp_path / "merged.safetensors"
    merge_main(["--dit", str(k5_bundle.dit), "--lora_weight", str(lora_file), "--lora_multiplier", "0.8",
                "--save_merged_model", str(merged), "--no_progress"])  # fmt: skip
    base_merged = [a if a != str(k5_bundle.dit) else str(merged) for a in base]
    generate(base_merged + common + ["--output", str(tmp_path / "merged_out.safetensors")])
    torch.testing.assert_close(load_file(tmp_path / "merged_out.safetensors")["latent"], with_lora, rtol=0, atol=1e-5)
    md = read_metadata(tmp_path / "lora.safetensors")
    assert md["bt_lora_0"] == "k5_lora.safetensors: 0.8"


def test_output_both_then_decode_from_latent_reproduces_the_video(base, tmp_path):
    out = tmp_path / "gen"
    files = generate(base + ["--prompt", "waves", "--video_length", "5", "--save_path", str(out), "--output_type", "both"])
    video = next(p for p in files if p.suffix == ".mp4")
    latent = next(p for p in files if p.name.endswith("_latent.safetensors"))
    dec = tmp_path / "decoded"
    again = generate(["--decode_from_latent", str(latent), "--vae", base[base.index("--vae") + 1], "--vae_dtype", "float32",
                      "--save_path", str(dec), "--device", "cpu"])  # fmt: skip
    decoded = next(p for p in again if p.suffix == ".mp4")
    assert decoded.name == video.name
    a, b = frames_of(video), frames_of(decoded)
    assert len(a) == len(b) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert read_metadata(decoded)["bt_prompt"] == "waves"


def test_from_file_three_lines_three_sizes(base, tmp_path):
    batch = tmp_path / "prompts.txt"
    lines = [
        "# three jobs",
        "a cat --w 64 --h 64 --f 5 --d 1",
        "a dog --w 96 --h 64 --f 1 --d 2 --n blurry",
        "--w 64 --h 96 --d 3 --cs 1",
    ]
    batch.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "batch"
    files = generate(base + ["--prompt", "cli prompt", "--from_file", str(batch), "--save_path", str(out), "--frames", "2"])
    videos = sorted((p for p in files if p.suffix in (".mp4", ".png") and "_first" not in p.name), key=lambda p: p.stem[-1])
    assert [p.stem.rsplit("_", 1)[1] for p in videos] == ["1", "2", "3"]
    assert (len(frames_of(videos[0])), frames_of(videos[0])[0].shape) == (5, (64, 64, 3))
    with Image.open(videos[1]) as im:
        assert im.size == (96, 64) and im.text["bt_negative_prompt"] == "blurry"
    assert (len(frames_of(videos[2])), frames_of(videos[2])[0].shape) == (5, (96, 64, 3))  # --frames 2 from the CLI
    assert read_metadata(videos[2])["bt_prompt"] == "cli prompt"


def test_cfg_schedule_and_dpmpp_run(base, tmp_path):
    out = tmp_path / "s.safetensors"
    argv = ["--prompt", "x", "--video_length", "5", "--steps", "3", "--cfg_schedule", "1, 3:2.5", "--scheduler", "dpm++"]
    generate(
        base + argv + ["--output", str(out), "--output_type", "latent", "--cfgzerostar_scaling", "--preview_latent_every", "2"]
    )
    assert (tmp_path / "latent_preview.mp4").is_file()
    md = read_metadata(out)
    assert md["bt_cfg_schedule"] == "1, 3:2.5" and md["bt_scheduler"] == "dpm++" and md["bt_infer_steps"] == "3"
    assert torch.isfinite(load_file(out)["latent"]).all()


def test_image_lite_t2i_and_ti2i(k5_bundle, images, tmp_path):
    dit, _ = write_tiny_dit(tmp_path / "t2i", tiny_dit_config("k5-lite-t2i-hd"), seed=1)
    b = k5_bundle
    argv = ["--task", "k5-lite-t2i-hd", "--dit", str(dit), "--vae", str(b.flux_vae), "--text_encoder_qwen",
            str(b.text_encoder_qwen), "--text_encoder_clip", str(b.text_encoder_clip), "--steps", "2",
            "--vae_dtype", "float32", "--width", "64", "--height", "48", "--prompt", "a house"]  # fmt: skip
    generate(argv + ["--output", str(tmp_path / "t2i.png")])
    with Image.open(tmp_path / "t2i.png") as im:
        assert im.size == (64, 48) and im.text["bt_task"] == "k5-lite-t2i-hd"
    generate(argv + ["--image", str(images[0]), "--ti2i_denoise_percent", "0.5", "--output", str(tmp_path / "ti2i.png")])
    with Image.open(tmp_path / "ti2i.png") as im:
        assert im.size == (96, 64) and im.text["bt_ti2i_denoise_percent"] == "0.5"
    i2i, _ = write_tiny_dit(tmp_path / "i2i", tiny_dit_config("k5-lite-i2i-hd"), seed=2)
    argv[argv.index("--task") + 1], argv[argv.index("--dit") + 1] = "k5-lite-i2i-hd", str(i2i)
    generate(argv + ["--image", str(images[1]), "--output", str(tmp_path / "i2i.png")])  # Qwen sees the image
    with Image.open(tmp_path / "i2i.png") as im:
        assert im.size == (96, 64) and im.text["bt_image"] == "last.png"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "3", "--guidance_scale", "4"], "--guidance_scale 4.0 and --guidance 3.0"),
        (["--task", "k5-nope"], "valid tasks: k5-lite-t2i-hd"),
        (["--video_length", "9", "--frames", "3"], "exclusive"),
        (["--force_nabla_attn"], "multiple of 128"),
        (["--fp8_fast"], "CUDA"),
        (["--attn_mode", "torch", "--xformers"], "different attention kernels"),
        (["--task", "k5-lite-i2v-5s-sd"], "give --image"),
        (["--nabla_p", "0.8"], "--nabla_p has no effect: task k5-lite-t2v-5s-sd uses dense attention"),
        (["--task", "k5-lite-t2v-10s-sd", "--force_traditional_attn", "--nabla_p", "0.8"], "--force_traditional_attn"),
    ],
)
def test_user_errors_exit_2(base, tmp_path, capsys, extra, message):
    err = user_error(base + ["--prompt", "x", "--save_path", str(tmp_path)] + extra, capsys)
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_root_wrapper_subprocess(base, tmp_path):
    out = tmp_path / "w.png"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "kandinsky5_generate_video.py"), *base, "--prompt", "x", "--video_length", "1",
           "--steps", "1", "--output", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file()


def test_interactive_keeps_models_and_skips_bad_lines(base, tmp_path):
    lines = iter(["a cat --f 1 --d 1", "a dog --w abc", "", "a dog --f 5 --d 2 --w 96"])

    def read_line(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = tmp_path / "inter"
    args = parse_args(base + ["--interactive", "--save_path", str(out), "--offload_dit_during_sampling"])
    files = run(args, read_line=read_line)
    still = next(p for p in files if p.suffix == ".png" and p.stem.endswith("_1"))
    video = next(p for p in files if p.suffix == ".mp4")
    with Image.open(still) as im:
        assert im.size == (64, 64)
    assert video.stem.endswith("_2") and frames_of(video)[0].shape == (64, 96, 3)


def test_block_swap_gives_the_same_latent(base, tmp_path):
    common = ["--prompt", "x", "--video_length", "5", "--seed", "4", "--output_type", "latent"]
    generate(base + common + ["--output", str(tmp_path / "a.safetensors")])
    generate(base + common + ["--output", str(tmp_path / "b.safetensors"), "--blocks_to_swap", "1"])
    torch.testing.assert_close(load_file(tmp_path / "a.safetensors")["latent"], load_file(tmp_path / "b.safetensors")["latent"])


def test_crf_and_bitrate_reach_the_video_file(base, tmp_path):
    common = ["--prompt", "noise", "--video_length", "9", "--seed", "6", "--no_metadata"]
    sizes = {}
    for name, extra in (("lossless", ["--crf", "0"]), ("crf51", ["--crf", "51"]), ("rate", ["--video_bitrate", "20000"])):
        out = tmp_path / f"{name}.mp4"
        generate(base + common + extra + ["--output", str(out)])
        sizes[name] = out.stat().st_size
        assert len(frames_of(out)) == 9
    # --crf / --video_bitrate drive the encoder (the default CRF 12 would give one size for all three)
    assert sizes["lossless"] > 4 * sizes["crf51"] and sizes["lossless"] > 4 * sizes["rate"]


def test_compile_options_compile_every_block_with_the_given_backend(base, tmp_path):
    from torch._dynamo import register_backend

    graphs: list[int] = []

    @register_backend(name="k5_test_counting")
    def counting(gm, example_inputs):  # noqa: ANN001 - dynamo backend signature
        graphs.append(len(example_inputs))
        return gm.forward

    common = ["--prompt", "x", "--video_length", "5", "--seed", "8", "--output_type", "latent", "--steps", "1"]
    generate(base + common + ["--output", str(tmp_path / "eager.safetensors")])
    args = parse_args(base + common + ["--output", str(tmp_path / "compiled.safetensors"), "--compile",
                                       "--compile_backend", "k5_test_counting", "--compile_dynamic", "false"])  # fmt: skip
    assert args.compile_dynamic is False
    run(args)
    assert graphs, "--compile_backend was never called"
    torch.testing.assert_close(
        load_file(tmp_path / "compiled.safetensors")["latent"], load_file(tmp_path / "eager.safetensors")["latent"]
    )
