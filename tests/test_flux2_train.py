"""FLUX.2 caching + training on the tiny bundle: caches (names, keys, encoder metadata), reference batches with
batch size 2 and per-item ids, the training DiT input vs the sampling pipeline, LoRA targets, metadata, bad inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.demo.flux2_data import write_flux2_dataset
from musubi_tuner.flux_2_cache_latents import main as cache_latents_main
from musubi_tuner.flux_2_cache_text_encoder_outputs import main as cache_te_main
from musubi_tuner.flux_2_train_network import Flux2NetworkTrainer, read_config_from_file, setup_parser


def cache(bundle, toml: Path, encoder: Path, version: str) -> None:
    cache_latents_main(["--dataset_config", str(toml), "--vae", str(bundle.vae), "--device", "cpu", "--num_workers", "1"])
    cache_te_main(
        ["--dataset_config", str(toml), "--text_encoder", str(encoder), "--model_version", version, "--device", "cpu",
         "--num_workers", "1"]
    )  # fmt: skip


@pytest.fixture(scope="module")
def f2_data(flux2_bundle, tmp_path_factory):
    """The editing dataset, cached twice: klein (Qwen3) for edit.toml, dev (Mistral 3) for t2i.toml."""
    data = write_flux2_dataset(tmp_path_factory.mktemp("f2data") / "data")
    cache(flux2_bundle, data.edit_toml, flux2_bundle.text_encoder_qwen3, "klein-4b")
    cache(flux2_bundle, data.t2i_toml, flux2_bundle.text_encoder_mistral3, "dev")
    return data


def argv_for(bundle, toml: Path, out: Path, version: str, *extra: str) -> list[str]:
    dit = bundle.dit_dev if version == "dev" else bundle.dit_klein
    return [
        "--model_version", version, "--dit", str(dit), "--dataset_config", str(toml),
        "--network_module", "networks.lora_flux_2", "--network_dim", "4", "--network_alpha", "4",
        "--output_dir", str(out), "--output_name", "f2", "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0",
        "--seed", "1", "--dit_dtype", "float32", "--max_train_steps", "2", "--timestep_sampling", "flux2_shift", *extra,
    ]  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    parser = setup_parser()
    return read_config_from_file(parser.parse_args(argv), parser, argv)


class Recorder(Flux2NetworkTrainer):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.shapes: list[tuple] = []

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy, timesteps, dtype):
        refs = sorted(k for k in batch if k.startswith("latents_control_"))
        self.shapes.append((tuple(latents.shape), tuple(tuple(batch[k].shape) for k in refs)))
        return super().call_dit(args, accelerator, transformer, latents, batch, noise, noisy, timesteps, dtype)

    def process_batch(self, *args, **kwargs):
        loss, metrics = super().process_batch(*args, **kwargs)
        if torch.is_grad_enabled():
            self.losses.append(float(loss.detach()))
        return loss, metrics


def test_caches_record_encoder_and_references(f2_data):
    for stem, n in f2_data.reference_counts.items():
        lat = f2_data.edit_cache_dir / f"{stem}_0064x0064_f2.safetensors"
        with safe_open(str(lat), "pt") as f:
            keys = set(f.keys())
        assert "latents_4x4_float32" in keys
        assert {k for k in keys if "control" in k} == (
            {"latents_control_0_4x4_float32", "latents_control_1_2x2_float32"} if n == 2 else {"latents_control_0_4x4_float32"}
        )
        with safe_open(str(f2_data.edit_cache_dir / f"{stem}_f2_te.safetensors"), "pt") as f:
            assert list(f.keys()) == ["ctx_vec_bfloat16"] and f.get_slice("ctx_vec_bfloat16").get_shape() == [512, 48]
            assert f.metadata()["flux2_text_encoder"] == "qwen3-16"
    with safe_open(str(next(f2_data.t2i_cache_dir.glob("*_f2_te.safetensors"))), "pt") as f:
        assert f.metadata()["flux2_text_encoder"] == "mistral3-16"


def test_klein_edit_training_batch2_with_references(flux2_bundle, f2_data, tmp_path):
    rec = Recorder()
    rec.train(parse(argv_for(flux2_bundle, f2_data.edit_toml, tmp_path, "klein-4b")))
    assert len(rec.losses) == 2 and all(torch.isfinite(torch.tensor(rec.losses)))
    # batch size 2 with references: buckets split by reference count and shapes
    assert sorted(rec.shapes) == [
        ((2, 128, 4, 4), ((2, 128, 4, 4),)),
        ((2, 128, 4, 4), ((2, 128, 4, 4), (2, 128, 2, 2))),
    ]
    sd = load_file(str(tmp_path / "f2.safetensors"))
    modules = {k.split(".")[0] for k in sd}
    want = {f"lora_unet_double_blocks_0_{s}_{m}" for s in ("img", "txt") for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")}
    want |= {f"lora_unet_single_blocks_{i}_{m}" for i in range(2) for m in ("linear1", "linear2")}
    assert modules == want
    with safe_open(str(tmp_path / "f2.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "flux_2" and md["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert md["modelspec.resolution"] == "1024x1024" and md["ss_flux2_model_version"] == "klein-4b"


def test_dev_training_embeds_guidance(flux2_bundle, f2_data, tmp_path):
    seen = []

    class G(Flux2NetworkTrainer):
        def load_transformer(self, *a, **k):
            dit = super().load_transformer(*a, **k)
            orig = dit.forward

            def fwd(img, img_ids, txt, txt_ids, t, guidance=None):
                seen.append(guidance)
                return orig(img, img_ids, txt, txt_ids, t, guidance)

            dit.forward = fwd
            return dit

    G().train(parse(argv_for(flux2_bundle, f2_data.t2i_toml, tmp_path, "dev", "--guidance_scale", "2.5", "--max_train_steps", "1")))
    assert seen and all(g is not None and torch.all(g == 2.5) for g in seen)
    with safe_open(str(tmp_path / "f2.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "Flux.2-dev/lora" and md["ss_guidance_scale"] == "2.5"


def test_training_input_ids_are_per_item():
    from musubi_tuner.flux_2_train_network import build_training_inputs

    noisy = torch.zeros(2, 128, 2, 3)
    refs = [torch.zeros(2, 128, 1, 2)]
    tokens, img_ids, txt_ids = build_training_inputs(noisy, refs, torch.zeros(2, 5, 8), torch.device("cpu"))
    assert tokens.shape == (2, 6 + 2, 128) and img_ids.shape == (2, 8, 4) and txt_ids.shape == (2, 5, 4)
    assert img_ids[1, 6:].tolist() == [[10, 0, 0, 0], [10, 0, 1, 0]]


def test_te_cache_of_other_encoder_is_refused(flux2_bundle, f2_data, tmp_path, capsys):
    from musubi_tuner.flux_2_train_network import main

    with pytest.raises(SystemExit) as e:  # t2i caches were made with Mistral 3 (dev)
        main(argv_for(flux2_bundle, f2_data.t2i_toml, tmp_path, "klein-4b"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "_f2_te.safetensors: text-encoder cache made with mistral3-16" in err and "klein-4b needs Qwen3" in err
    assert not list(tmp_path.glob("*.safetensors"))
