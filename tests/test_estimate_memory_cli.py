"""``--estimate_memory`` / ``estimate_memory.py`` on the tiny Kandinsky 5 bundle (specs/memory_estimator.md §10 test 6):
exit 0, no tensor data opened, the table printed, the JSON schema pinned, deterministic suggestions, real-run errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from musubi_tuner import estimate_memory

TRAIN_KEYS = {"schema", "mode", "architecture", "config", "shapes", "device", "host", "calibration", "suggestions", "notes",
              "seconds", "verdicts"}  # fmt: skip
TRACED_KEYS = {"params", "buffers", "grads", "activations", "temp", "optimizer", "trainable", "peak", "phase_peaks",
               "largest_tensor", "largest_tensor_op"}  # fmt: skip
FORMULA_KEYS = {"swap_saved", "offload_saved", "bnb_state", "fsdp", "context", "workspaces", "slack"}
HOST_KEYS = {"baseline", "load_peak", "steady", "pinned", "peak", "available", "fits"}


@pytest.fixture(scope="module")
def cached(k5_bundle, tmp_path_factory):
    """The tiny bundle's caches for two 17-frame clips, written by the real caching scripts."""
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
    from musubi_tuner.kandinsky5_cache_latents import main as cache_latents
    from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main as cache_text

    ds = write_synthetic_video_dataset(tmp_path_factory.mktemp("estimate") / "data", n_videos=2, n_images=0, seed=1)
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(k5_bundle.vae), "--device", "cpu",
                   "--vae_dtype", "float32", "--seed", "0"])  # fmt: skip
    cache_text(["--dataset_config", str(ds.video_toml), "--text_encoder_qwen", str(k5_bundle.text_encoder_qwen),
                "--text_encoder_clip", str(k5_bundle.text_encoder_clip), "--device", "cpu"])  # fmt: skip
    return ds


def _train_argv(bundle, ds, tmp_path, *extra):
    return ["--task", bundle.task, "--dit", str(bundle.dit), "--dataset_config", str(ds.video_toml),
            "--network_module", "networks.lora_kandinsky", "--network_dim", "4", "--output_dir", str(tmp_path / "out"),
            "--output_name", "x", "--max_data_loader_n_workers", "0", "--gpu_memory", "24", *extra]  # fmt: skip


def _refuse_tensor_reads(monkeypatch) -> None:
    """Any read of tensor data (weights or caches) from now on fails the test."""
    import safetensors
    import safetensors.torch

    from musubi_tuner.dataset import group
    from musubi_tuner.utils import safetensors_utils

    def refuse(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(os, "preadv", refuse)
    monkeypatch.setattr(safetensors_utils, "_pread", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(group, "load_tensors", refuse)


@pytest.fixture
def no_tensor_data(monkeypatch):
    """Any read of tensor data (weights or caches) fails the test."""
    _refuse_tensor_reads(monkeypatch)


@pytest.fixture
def no_tensor_data_after_caching(monkeypatch):
    """A function that, once called (after the test wrote its caches), makes any read of tensor data fail the test."""

    def arm() -> None:
        _refuse_tensor_reads(monkeypatch)

    return arm


def test_train_estimate_reads_headers_only_and_pins_the_schema(k5_bundle, cached, tmp_path, capsys, no_tensor_data):
    out = tmp_path / "e.json"
    argv = ["train", *_train_argv(k5_bundle, cached, tmp_path, "--suggest", "--gpu", "24,80", "--estimate_json", str(out))]
    estimate_memory.main(argv)
    text = capsys.readouterr().out
    assert "= traced peak" in text and "TOTAL  GPU" in text and "suggestion:" in text and "calibration: default constants" in text
    doc = json.loads(out.read_text())
    assert set(doc) == TRAIN_KEYS and doc["schema"] == 1 and doc["mode"] == "train"
    assert set(doc["device"]["traced"]) == TRACED_KEYS and set(doc["device"]["formula"]) == FORMULA_KEYS
    assert set(doc["host"]) == HOST_KEYS and doc["verdicts"] == {"24": True, "80": True}
    assert doc["shapes"]["latent"] == [16, 5, 8, 8] and doc["shapes"]["batch"] == 1  # 17 frames 64x64 -> 5x8x8
    d = doc["device"]
    formula_sum = d["formula"]["context"] + d["formula"]["workspaces"] + d["formula"]["slack"]
    assert d["predicted_peak"] == d["traced"]["peak"] + formula_sum  # no swap / offload / bnb terms here
    t = d["traced"]
    assert t["params"] > 0 and t["activations"] > 0
    # the AdamW step was traced: weights, LoRA, its gradients and two moment buffers live at once
    assert t["phase_peaks"]["optimizer"] >= t["params"] + 4 * t["trainable"]
    assert not out.with_suffix(".json.tmp").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]
    assert not torch.cuda.is_initialized()
    # the suggestion is deterministic
    estimate_memory.main(argv)
    assert json.loads(out.read_text())["suggestions"] == doc["suggestions"]
    # --estimate_memory on the train script itself; checkpointing + activation offload change the prediction
    from musubi_tuner.kandinsky5_train_network import main as train_main

    gc = tmp_path / "gc.json"
    flags = ("--estimate_memory", "--gradient_checkpointing", "--gradient_checkpointing_cpu_offload", "--estimate_json", str(gc))
    train_main(_train_argv(k5_bundle, cached, tmp_path, *flags))
    g = json.loads(gc.read_text())["device"]
    assert g["formula"]["offload_saved"] > 0 and g["traced"]["peak"] < d["traced"]["peak"]


def test_estimate_errors_are_the_real_runs(k5_bundle, cached, tmp_path, capsys):
    with pytest.raises(SystemExit):
        estimate_memory.main(["train", *_train_argv(k5_bundle, cached, tmp_path, "--dit", str(tmp_path / "missing.safetensors"))])
    assert "DiT checkpoint not found (--dit)" in capsys.readouterr().err
    from musubi_tuner.kandinsky5_train_network import main as train_main

    with pytest.raises(SystemExit):
        train_main(_train_argv(k5_bundle, cached, tmp_path, "--suggest"))  # an estimator option without the estimate
    assert "--estimate_memory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        estimate_memory.main(["train", "--dit", "x"])  # no --task: the architecture is unknown
    assert "--arch" in capsys.readouterr().err


def test_generate_estimate(k5_bundle, tmp_path, capsys, no_tensor_data):
    out = tmp_path / "g.json"
    estimate_memory.main(["generate", "--task", k5_bundle.task, "--dit", str(k5_bundle.dit), "--vae", str(k5_bundle.vae),
                          "--text_encoder_qwen", str(k5_bundle.text_encoder_qwen), "--text_encoder_clip",
                          str(k5_bundle.text_encoder_clip), "--prompt", "a cat", "--width", "64", "--height", "64",
                          "--video_length", "9", "--save_path", str(tmp_path / "o"), "--device", "cpu",
                          "--estimate_json", str(out)])  # fmt: skip
    assert "TOTAL  GPU" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["mode"] == "generate" and doc["device"]["phases"]["denoising"] > doc["device"]["dit_weights"] > 0
    assert not (tmp_path / "o").exists()  # nothing generated, nothing written but the JSON


# -- the other architectures: one estimate per script on their tiny bundles (ARCHITECTURE_CHECKLIST line 14) ---------


def _check_train_doc(doc: dict, arch: str) -> None:
    assert doc["architecture"] == arch and doc["mode"] == "train"
    d = doc["device"]
    formula_sum = d["formula"]["context"] + d["formula"]["workspaces"] + d["formula"]["slack"]
    assert d["predicted_peak"] == d["traced"]["peak"] + formula_sum  # no swap / offload / bnb terms here
    t = d["traced"]
    assert t["params"] > 0 and t["trainable"] > 0 and t["activations"] > 0
    assert t["phase_peaks"]["optimizer"] >= t["params"] + 4 * t["trainable"]  # AdamW: LoRA, grads, two moments


def test_flux2_estimates(flux2_bundle, tmp_path_factory, tmp_path, capsys, no_tensor_data_after_caching):
    """FLUX.2 klein on the editing dataset (reference latents in the batch): the train script's --estimate_memory, and
    estimate_memory.py generate with a reference image."""
    from musubi_tuner.demo.flux2_data import write_flux2_dataset
    from musubi_tuner.flux_2_cache_latents import main as cache_latents
    from musubi_tuner.flux_2_cache_text_encoder_outputs import main as cache_text
    from musubi_tuner.flux_2_train_network import main as train_main

    b = flux2_bundle
    data = write_flux2_dataset(tmp_path_factory.mktemp("f2_estimate") / "data", n_images=2)
    cache_latents(["--dataset_config", str(data.edit_toml), "--vae", str(b.vae), "--device", "cpu"])
    cache_text(["--dataset_config", str(data.edit_toml), "--text_encoder", str(b.text_encoder_qwen3), "--model_version",
                "klein-4b", "--device", "cpu"])  # fmt: skip
    no_tensor_data_after_caching()
    out = tmp_path / "t.json"
    train_main(["--model_version", "klein-4b", "--dit", str(b.dit_klein), "--dataset_config", str(data.edit_toml),
                "--network_module", "networks.lora_flux_2", "--network_dim", "4", "--output_dir", str(tmp_path / "out"),
                "--output_name", "x", "--max_data_loader_n_workers", "0", "--gpu_memory", "24", "--estimate_memory",
                "--estimate_json", str(out)])  # fmt: skip
    assert "= traced peak" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    _check_train_doc(doc, "flux_2")
    # the largest step: 64x64 target (4x4 latent) with both references (4x4 and 2x2) in the batch
    assert doc["shapes"]["latent"] == [128, 4, 4] and doc["shapes"]["text_len"] == 512
    g = tmp_path / "g.json"
    ref = next(data.root.glob("controls/*_0.png"))
    estimate_memory.main(["generate", "--model_version", "klein-4b", "--dit", str(b.dit_klein), "--vae", str(b.vae),
                          "--text_encoder", str(b.text_encoder_qwen3), "--prompt", "a cat", "--image_size", "64", "64",
                          "--control_image_path", str(ref), "--save_path", str(tmp_path / "o"), "--device", "cpu",
                          "--estimate_json", str(g)])  # fmt: skip
    gen = json.loads(g.read_text())
    assert gen["architecture"] == "flux_2" and gen["device"]["phases"]["denoising"] > gen["device"]["dit_weights"] > 0
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()
    assert not torch.cuda.is_initialized()


def test_wan_estimates(wan_i2v_bundle, wan_a14b_bundle, tmp_path_factory, tmp_path, capsys, no_tensor_data_after_caching):
    """Wan 2.1 I2V (image condition + CLIP tokens in the batch) through the train script, 2.2 A14B --expert both through
    estimate_memory.py, and the I2V generation estimate (both experts resident for A14B)."""
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
    from musubi_tuner.wan_cache_latents import main as cache_latents
    from musubi_tuner.wan_cache_text_encoder_outputs import main as cache_text
    from musubi_tuner.wan_train_network import main as train_main

    b, a = wan_i2v_bundle, wan_a14b_bundle
    ds = write_synthetic_video_dataset(tmp_path_factory.mktemp("wan_estimate") / "data", n_videos=1, n_images=0, seed=1)
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(b.vae), "--device", "cpu", "--i2v", "--clip", str(b.clip)])
    cache_text(["--dataset_config", str(ds.video_toml), "--t5", str(b.t5), "--device", "cpu"])
    no_tensor_data_after_caching()

    def train_argv(task, dit, *extra):
        return ["--task", task, "--dit", str(dit), "--dataset_config", str(ds.video_toml), "--network_module",
                "networks.lora_wan", "--network_dim", "4", "--output_dir", str(tmp_path / "out"), "--output_name", "x",
                "--max_data_loader_n_workers", "0", "--gpu_memory", "24", "--estimate_memory", *extra]  # fmt: skip

    out = tmp_path / "t.json"
    train_main(train_argv("i2v-14B", b.dit, "--estimate_json", str(out)))
    doc = json.loads(out.read_text())
    _check_train_doc(doc, "wan")
    assert doc["shapes"]["latent"] == [16, 5, 8, 8]  # 17 frames 64x64
    both = tmp_path / "both.json"
    estimate_memory.main(["train", *train_argv("i2v-A14B", a.dit, "--dit_high_noise", str(a.dit_high_noise), "--expert",
                                               "both", "--estimate_json", str(both))])  # fmt: skip
    pair = json.loads(both.read_text())
    assert any("--expert both" in n for n in pair["notes"])
    capsys.readouterr()
    g = tmp_path / "g.json"
    gen_argv = ["--task", "i2v-A14B", "--dit", str(a.dit), "--dit_high_noise", str(a.dit_high_noise), "--vae", str(a.vae),
                "--t5", str(a.t5), "--image_path", str(ds.start_image), "--prompt", "a cat", "--video_size", "32", "32",
                "--video_length", "5", "--save_path", str(tmp_path / "o"), "--device", "cpu", "--estimate_json", str(g)]  # fmt: skip
    estimate_memory.main(["generate", *gen_argv])
    two = json.loads(g.read_text())["device"]
    estimate_memory.main(["generate", *gen_argv, "--offload_inactive_dit"])
    one = json.loads(g.read_text())["device"]
    # both experts resident: one expert's weights more than with the inactive one parked on the host
    assert two["dit_weights"] == 2 * one["dit_weights"] > 0
    assert two["phases"]["denoising"] - one["phases"]["denoising"] == one["dit_weights"]
    assert "not safetensors" in capsys.readouterr().out  # the .pth T5 / VAE are sized by file, and the report says so
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_qwen_image_estimates(qwen_bundle, tmp_path_factory, tmp_path, capsys, no_tensor_data_after_caching):
    """Qwen-Image Edit-2509 with two control latents per item and a batch of two captions of different lengths (masked
    varlen text) through the train script, and the Layered generation estimate through estimate_memory.py."""
    from safetensors import safe_open

    from musubi_tuner.demo.qwen_image_bundle import write_qwen_image_dataset
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text
    from musubi_tuner.qwen_image_train_network import main as train_main

    b = qwen_bundle
    ds = write_qwen_image_dataset(tmp_path_factory.mktemp("qi_estimate") / "data", n_images=2, controls=2, batch_size=2)
    common = ["--dataset_config", str(ds.toml), "--device", "cpu", "--model_version", "edit-2509", "--num_workers", "1"]
    cache_latents([*common, "--vae", str(b.vae_file), "--vae_dtype", "float32"])
    cache_text([*common, "--text_encoder", str(b.text_encoder)])
    lengths = []
    for path in sorted(ds.cache_dir.glob("*_te.safetensors")):
        with safe_open(str(path), "pt") as f:
            lengths += [f.get_slice(k).get_shape()[0] for k in f.keys()]
    no_tensor_data_after_caching()
    out = tmp_path / "t.json"
    train_main(["--model_version", "edit-2509", "--dit", str(b.dit), "--dataset_config", str(ds.toml), "--network_module",
                "networks.lora_qwen_image", "--network_dim", "4", "--output_dir", str(tmp_path / "out"), "--output_name", "x",
                "--max_data_loader_n_workers", "0", "--gpu_memory", "24", "--estimate_memory", "--estimate_json", str(out)])  # fmt: skip
    assert "= traced peak" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    _check_train_doc(doc, "qwen_image")
    assert len(set(lengths)) == 2  # the batch pads the shorter caption: the step is traced at the longer one
    assert doc["shapes"]["latent"] == [16, 1, 6, 8] and doc["shapes"]["text_len"] == max(lengths)
    assert doc["shapes"]["batch"] == 2 and any("text key mask" in n for n in doc["notes"])
    g = tmp_path / "g.json"
    control = next(ds.control_dir.glob("*.png"))
    gen_argv = ["--model_version", "layered", "--dit", str(b.dit_layered), "--vae", str(b.vae_layered), "--text_encoder",
                str(b.text_encoder), "--prompt", "a cat", "--image_size", "32", "32", "--control_image_path", str(control),
                "--output_layers", "2", "--save_path", str(tmp_path / "o"), "--device", "cpu", "--estimate_json", str(g)]  # fmt: skip
    estimate_memory.main(["generate", *gen_argv])
    three = json.loads(g.read_text())
    assert three["architecture"] == "qwen_image" and any("512-token cap" in n for n in three["notes"])
    estimate_memory.main(["generate", *gen_argv, "--output_layers", "6"])  # the last value wins
    seven = json.loads(g.read_text())["device"]
    # more layers: more target frames in the same DiT call, the same weights
    assert seven["dit_weights"] == three["device"]["dit_weights"] > 0
    assert seven["phases"]["denoising"] > three["device"]["phases"]["denoising"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8_text_encoder"])
def test_flux2_text_encoder_estimate_is_what_the_loader_holds(flux2_bundle, fp8):
    """The generation estimate sizes the text encoder by running its loader on fake tensors: the used layers only (no LM
    head, no layers after the last output layer), fp8 as quantised — equal to the real load's bytes."""
    from musubi_tuner.flux_2.configs import get_model_version
    from musubi_tuner.flux_2.memory import loaded_text_encoder_bytes
    from musubi_tuner.flux_2.text_encoders import Flux2TextEncoder
    from musubi_tuner.memory.generation import weights_bytes

    for version, path in (("klein-4b", flux2_bundle.text_encoder_qwen3), ("dev", flux2_bundle.text_encoder_mistral3)):
        v = get_model_version(version)
        model = Flux2TextEncoder(path, v, dtype=torch.bfloat16, fp8=fp8).model
        held = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
        assert loaded_text_encoder_bytes(str(path), v, fp8, None) == held, version
        assert held < weights_bytes(path)  # the file holds more than the encoder loads
