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


@pytest.fixture
def no_tensor_data(monkeypatch):
    """Any read of tensor data (weights or caches) fails the test."""
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
