"""Bad input gets one clear message and a non-zero exit (ARCHITECTURE_CHECKLIST item 11) for the Qwen-Image scripts:
a LoRA of another architecture, a missing text-encoder directory, caches of another model version, a DiT of another
architecture, edit training without controls, wrong control counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from musubi_tuner.demo.qwen_image_bundle import write_qwen_image_dataset
from musubi_tuner.qwen_image_cache_latents import main as cache_latents
from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text
from musubi_tuner.qwen_image_generate_image import main as generate
from musubi_tuner.qwen_image_train_network import main as train


def exit_code(fn, argv: list[str]) -> int:
    try:
        fn(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def gen_args(bundle, out: Path, *extra: str) -> list[str]:
    return ["--dit", str(bundle.dit), "--vae", str(bundle.vae), "--text_encoder", str(bundle.text_encoder),
            "--save_path", str(out), "--device", "cpu", "--infer_steps", "1", "--image_size", "32", "32", *extra]  # fmt: skip


def test_lora_of_another_architecture_is_refused_naming_its_keys(qwen_bundle, tmp_path, capsys):
    lora = tmp_path / "k5_lora.safetensors"
    save_file(
        {
            "lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_up.weight": torch.zeros(64, 4),
        },
        str(lora),
    )
    assert exit_code(generate, gen_args(qwen_bundle, tmp_path / "o", "--prompt", "p", "--lora_weight", str(lora))) == 2
    err = capsys.readouterr().err
    assert "k5_lora.safetensors" in err and ("kandinsky" in err.lower() or "visual_transformer_blocks" in err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_missing_or_wrong_text_encoder_and_dit(qwen_bundle, tmp_path, capsys):
    assert exit_code(generate, [*gen_args(qwen_bundle, tmp_path / "o", "--prompt", "p")[:4], "--text_encoder",
                                str(tmp_path / "nope"), "--save_path", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "nope" in capsys.readouterr().err
    argv = gen_args(qwen_bundle, tmp_path / "o", "--prompt", "p")
    argv[argv.index("--dit") + 1] = str(qwen_bundle.vae_file)
    assert exit_code(generate, argv) == 2
    assert "not a Qwen-Image DiT" in capsys.readouterr().err


def test_caches_of_another_version_and_controls(qwen_bundle, tmp_path, capsys):
    ds = write_qwen_image_dataset(tmp_path / "d", n_images=1)
    common = ["--dataset_config", str(ds.toml), "--device", "cpu", "--num_workers", "1"]
    # edit versions need control images: refused while caching, naming the dataset
    assert exit_code(cache_latents, [*common, "--vae", str(qwen_bundle.vae), "--model_version", "edit"]) == 2
    assert "control" in capsys.readouterr().err
    # T2I caches (suffix qi) do not train an edit model (suffix qie)
    assert exit_code(cache_latents, [*common, "--vae", str(qwen_bundle.vae)]) == 0
    assert exit_code(cache_text, [*common, "--text_encoder", str(qwen_bundle.text_encoder)]) == 0
    capsys.readouterr()
    argv = ["--dit", str(qwen_bundle.dit), "--dataset_config", str(ds.toml), "--network_module", "networks.lora_qwen_image",
            "--output_dir", str(tmp_path / "out"), "--output_name", "lora", "--max_train_steps", "1", "--model_version", "edit-2509"]  # fmt: skip
    assert exit_code(train, argv) == 2
    assert "_qie.safetensors" in capsys.readouterr().err  # names what it looked for
    assert not (tmp_path / "out" / "lora.safetensors").exists()


@pytest.mark.parametrize(
    "version,controls,expect",
    [("original", 1, "takes none"), ("edit", 2, "takes one control image"), ("layered", 0, "exactly one control image")],
)
def test_control_counts_per_version(qwen_bundle, tmp_path, capsys, version, controls, expect):
    ctrl = tmp_path / "c.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(ctrl)
    extra = ["--model_version", version, "--prompt", "p"]
    if controls:
        extra += ["--control_image_path", *[str(ctrl)] * controls]
    assert exit_code(generate, gen_args(qwen_bundle, tmp_path / "o", *extra)) == 2
    assert expect in capsys.readouterr().err
