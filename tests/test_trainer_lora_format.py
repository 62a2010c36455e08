"""``--lora_format {kohya, comfyui, diffusers}`` when the trainer saves LoRAs (specs/networks.md §6.4, §6.5).

Kandinsky 5 tiny runs with the same seed in each format: the dotted files carry the right prefix and module names,
``convert_lora.py --target default`` brings them back to the kohya run's ΔW, state directories stay native (resume
works), and the generator gives the same latent with any of the three files. Architectures without a name table
(or networks with modules outside it) are refused before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_k5_train import argv_for, expected_modules, k5_data, train  # noqa: F401  (k5_data: session fixture)
from toy_arch import ToyTrainer, common_argv, toy_parser, write_image_dataset, write_toy_dit

from musubi_tuner.convert_lora import main as convert_lora
from musubi_tuner.training.args import read_config_from_file
from musubi_tuner.training.resume import NETWORK_FILE
from musubi_tuner.utils.errors import UserError

PREFIX = {"comfyui": "diffusion_model", "diffusers": "transformer"}


@pytest.fixture(scope="module")
def runs(k5_bundle, k5_data, tmp_path_factory):  # noqa: F811
    """One 3-step run per format, same seed (rank 4, alpha 1 so that folding alpha changes the factors).

    Every run saves a state at step 2; ``kohya`` also keeps the plain state dict of its file."""
    root = tmp_path_factory.mktemp("lora_format")
    out = {}
    for fmt in ("kohya", "comfyui", "diffusers"):
        argv = argv_for(k5_bundle, k5_data, root / fmt, "--lora_format", fmt, "--save_every_n_steps", "2", "--save_state")
        argv[argv.index("--network_alpha") + 1] = "1"
        train(argv)
        out[fmt] = root / fmt
    return out


def _delta(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kohya module name → ΔW = up @ down · alpha / rank."""
    names = {k.split(".")[0] for k in sd}
    return {
        n: sd[f"{n}.lora_up.weight"].float()
        @ sd[f"{n}.lora_down.weight"].float()
        * (float(sd[f"{n}.alpha"]) / sd[f"{n}.lora_down.weight"].shape[0])
        for n in names
    }


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_dotted_file_has_prefix_names_and_converts_back_to_the_kohya_run(runs, k5_bundle, fmt, tmp_path):
    kohya = load_file(str(runs["kohya"] / "k5.safetensors"))
    path = runs[fmt] / "k5.safetensors"
    sd = load_file(str(path))
    cfg = k5_bundle.dit_config
    modules = expected_modules(cfg["num_visual_blocks"], cfg["num_text_blocks"])
    head = PREFIX[fmt] + "."
    assert all(k.startswith(head) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert f"{head}visual_transformer_blocks.0.cross_attention.to_key.lora_A.weight" in sd
    assert {"lora_unet_" + k[len(head) :].rsplit(".", 2)[0].replace(".", "_") for k in sd} == modules
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "kandinsky5" and md["ss_steps"] == "3"
    assert not any(k.startswith("sshs_") for k in md)  # hashes would describe the kohya tensors

    # the trainer's file is what convert_lora --target other writes from the kohya file
    other = tmp_path / "other.safetensors"
    convert_lora(["--input", str(runs["kohya"] / "k5.safetensors"), "--output", str(other), "--target", "other",
                  "--diffusers_prefix", PREFIX[fmt]])  # fmt: skip
    expected = load_file(str(other))
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)

    back = tmp_path / "back.safetensors"
    convert_lora(["--input", str(path), "--output", str(back), "--target", "default"])
    restored = load_file(str(back))
    assert restored.keys() == kohya.keys()
    # alpha 1 / rank 4 is folded as sqrt(1/4) = 0.5 into both factors, exactly; alpha comes back as the rank
    for k, v in kohya.items():
        if k.endswith(".alpha"):
            assert float(restored[k]) == 4.0
        else:
            assert torch.equal(restored[k], v * 0.5), k
    d_kohya, d_back = _delta(kohya), _delta(restored)
    assert all(torch.equal(d_kohya[n], d_back[n]) for n in d_kohya)


def test_state_directories_stay_native_and_resume(runs, k5_bundle, k5_data, tmp_path):  # noqa: F811
    kohya = load_file(str(runs["kohya"] / "k5.safetensors"))
    for fmt in ("comfyui", "diffusers"):
        state = runs[fmt] / "k5-step00000002-state"
        assert json.loads((state / "train_state.json").read_text())["current_step"] == 2
        native = load_file(str(state / NETWORK_FILE))
        assert {k.split(".")[0] for k in native} == {k.split(".")[0] for k in kohya}  # kohya names ...
        assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in native)  # ... and layout
        assert (
            load_file(str(runs[fmt] / "k5-step00000002.safetensors")).keys() == load_file(str(runs[fmt] / "k5.safetensors")).keys()
        )

    # resume the comfyui run from step 2: the final file equals the uninterrupted comfyui run
    state = runs["comfyui"] / "k5-step00000002-state"
    argv = argv_for(
        k5_bundle, k5_data, tmp_path / "resumed", "--lora_format", "comfyui", "--save_every_n_steps", "2", "--resume", str(state)
    )
    argv[argv.index("--network_alpha") + 1] = "1"
    resumed = train(argv)
    full = load_file(str(runs["comfyui"] / "k5.safetensors"))
    assert not (tmp_path / "resumed" / "k5-step00000002.safetensors").exists()  # step 2 is not redone
    assert resumed.keys() == full.keys()
    assert all(torch.allclose(resumed[k], full[k], atol=1e-6, rtol=0) for k in full)


def test_generator_loads_every_format_to_the_same_latent(runs, k5_bundle, tmp_path):
    from musubi_tuner.kandinsky5_generate_video import main as generate

    b = k5_bundle
    common = ["--task", "k5-lite-t2v-5s-sd", "--dit", str(b.dit), "--vae", str(b.vae), "--text_encoder_qwen",
              str(b.text_encoder_qwen), "--text_encoder_clip", str(b.text_encoder_clip), "--prompt", "x", "--seed", "3",
              "--video_length", "5", "--steps", "2", "--width", "64", "--height", "64", "--output_type", "latent",
              "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    latents = {}
    for fmt in ("kohya", "comfyui", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        lora = ["--lora_weight", str(runs[fmt] / "k5.safetensors"), "--lora_multiplier", "30"]  # tiny LoRA: amplify
        generate(common + lora + ["--output", str(out)])
        latents[fmt] = load_file(str(out))["latent"]
    generate(common + ["--output", str(tmp_path / "base.safetensors")])
    base = load_file(str(tmp_path / "base.safetensors"))["latent"]
    assert not torch.equal(base, latents["kohya"])  # the LoRA is applied
    torch.testing.assert_close(latents["comfyui"], latents["kohya"], atol=1e-5, rtol=0)
    torch.testing.assert_close(latents["diffusers"], latents["kohya"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# refused before training


class NoTableTrainer(ToyTrainer):
    """An architecture without a conversion name table; loading its model is a test failure."""

    @property
    def architecture_full_name(self) -> str:
        return "toy"

    def load_transformer(self, *args, **kwargs):
        raise AssertionError("the model must not be loaded")


def _toy_args(argv: list[str]):
    parser = toy_parser()
    return read_config_from_file(parser.parse_args(argv), parser, argv)


def test_architecture_without_name_table_fails_at_argument_validation(tmp_path):
    args = _toy_args(common_argv(tmp_path / "missing.toml", tmp_path / "missing.safetensors", tmp_path / "out",
                                 "--lora_format", "comfyui"))  # fmt: skip
    with pytest.raises(UserError, match=r"--lora_format comfyui: architecture 'toy' has no LoRA name table.*kohya"):
        NoTableTrainer().train(args)
    assert not (tmp_path / "out").exists()


def test_network_modules_outside_the_name_table_fail_before_training(tmp_path):
    """The toy DiT poses as Wan (``architecture_full_name`` "wan") but its modules are not Wan modules."""
    config = write_image_dataset(tmp_path / "data", 1)
    dit = write_toy_dit(tmp_path / "dit.safetensors", dim=8, num_blocks=1)
    args = _toy_args(common_argv(config, dit, tmp_path / "out", "--lora_format", "comfyui"))
    with pytest.raises(UserError, match=r"--lora_format comfyui: \d+ of \d+ network module\(s\) are not in the wan name table"):
        ToyTrainer().train(args)
    assert not list(Path(tmp_path / "out").glob("*.safetensors"))


def test_lora_format_choices_are_validated(tmp_path):
    with pytest.raises(SystemExit):
        _toy_args(common_argv(tmp_path / "c.toml", tmp_path / "d.safetensors", tmp_path / "out", "--lora_format", "peft"))
