"""Qwen-Image caching scripts and LoRA training on the tiny bundle: cache keys and shapes for T2I, Edit-2509 with two
controls and Layered; the padded, masked text batch equals per-item results; one training run per variant family;
LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.demo.qwen_image_bundle import write_qwen_image_dataset
from musubi_tuner.qwen_image.configs import get_model_version
from musubi_tuner.qwen_image.models.loading import load_dit
from musubi_tuner.qwen_image.training import build_training_inputs
from musubi_tuner.qwen_image_cache_latents import main as cache_latents
from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text
from musubi_tuner.qwen_image_train_network import main as train_main

VARIANTS = {
    # name: (model_version, dataset kwargs, DiT attr, VAE attr)
    "t2i": ("original", {"n_images": 3, "batch_size": 2}, "dit", "vae"),
    "edit": ("edit-2509", {"n_images": 2, "controls": 2}, "dit", "vae_file"),
    "layered": ("layered", {"n_images": 2, "layers": 2, "size": (32, 32)}, "dit_layered", "vae_layered"),
}


def _cache(bundle, ds, version: str, vae: Path) -> None:
    common = ["--dataset_config", str(ds.toml), "--device", "cpu", "--model_version", version, "--num_workers", "1"]
    cache_latents([*common, "--vae", str(vae), "--vae_dtype", "float32"])
    cache_text([*common, "--text_encoder", str(bundle.text_encoder)])


@pytest.fixture(scope="module")
def cached(tmp_path_factory, qwen_bundle):
    out = {}
    for name, (version, kw, _, vae) in VARIANTS.items():
        ds = write_qwen_image_dataset(tmp_path_factory.mktemp(f"qi_{name}"), **kw)
        _cache(qwen_bundle, ds, version, getattr(qwen_bundle, vae))
        out[name] = ds
    return out


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def test_cache_files_keys_and_shapes(cached):
    t2i, _ = _header(next(cached["t2i"].cache_dir.glob("img_00_*_qi.safetensors")))
    assert t2i == {"latents_1x6x8_float32": (16, 1, 6, 8)}
    edit, _ = _header(next(cached["edit"].cache_dir.glob("img_00_*_qie.safetensors")))
    assert set(edit) == {"latents_1x6x8_float32", "latents_control_0_1x6x8_float32", "latents_control_1_1x6x8_float32"}
    lay, _ = _header(next(cached["layered"].cache_dir.glob("img_00_*_qil.safetensors")))
    assert lay["latents_3x4x4_float32"] == (16, 3, 4, 4)  # composite + 2 layers, RGBA VAE
    assert lay["latents_control_0_1x4x4_float32"] == (16, 1, 4, 4)
    te_plain, md_plain = _header(cached["t2i"].cache_dir / "img_00_qi_te.safetensors")
    te_edit, md_edit = _header(cached["edit"].cache_dir / "img_00_qie_te.safetensors")
    (k_plain,), (k_edit,) = te_plain, te_edit
    assert k_plain.startswith("varlen_vl_embed_") and k_edit.startswith("varlen_vl_embed_")
    assert md_plain["qwen_image_template"] == "t2i" and md_edit["qwen_image_template"] == "edit_plus"
    # the edit caption was encoded together with its two control images: many more tokens than the caption alone
    assert te_edit[k_edit][0] > te_plain[k_plain][0] + 8


def test_padded_masked_batch_equals_items_alone(cached, qwen_bundle):
    """Batch of two captions of different lengths: each item's prediction equals the item run alone (mask applied)."""
    from musubi_tuner.dataset.config import load_dataset_group

    version = get_model_version("original")
    dit = load_dit(version, qwen_bundle.dit, dtype=torch.float32)
    group = load_dataset_group(cached["t2i"].toml, architecture="qi", training=False)
    group.set_current_epoch(0)
    batch = group[0]
    lens = [e.shape[0] for e in batch["vl_embed"]]
    assert len(lens) == 2 and lens[0] != lens[1]
    x = batch["latents"].float()
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        both = build_training_inputs(version, x, batch, t, device=torch.device("cpu"), dtype=torch.float32).call(dit)
        for i in range(2):
            one = {"vl_embed": [batch["vl_embed"][i]]}
            alone = build_training_inputs(version, x[i : i + 1], one, t[i : i + 1], device=torch.device("cpu"), dtype=torch.float32)
            assert (both[i] - alone.call(dit)[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_run_writes_a_lora(name, cached, qwen_bundle, tmp_path):
    version, _, dit_attr, _ = VARIANTS[name]
    extra = ["--remove_first_image_from_target"] if name == "layered" else []
    extra += ["--timestep_sampling", "qinglong_qwen" if name == "edit" else "qwen_shift"]
    if name == "edit":  # sampling during training: prompt encoded with its control images, controls VAE-encoded
        control = next(cached[name].control_dir.glob("*.png"))
        prompts = tmp_path / "samples.txt"
        prompts.write_text(f"recolor it --ci {control} --w 32 --h 32 --s 2 --d 1\n", encoding="utf-8")
        extra += ["--sample_prompts", str(prompts), "--sample_at_first", "--text_encoder", str(qwen_bundle.text_encoder),
                  "--vae", str(qwen_bundle.vae_file)]  # fmt: skip
    train_main([
        "--dit", str(getattr(qwen_bundle, dit_attr)), "--dataset_config", str(cached[name].toml), "--model_version", version,
        "--network_module", "networks.lora_qwen_image", "--network_dim", "4", "--output_dir", str(tmp_path),
        "--output_name", "lora", "--max_train_steps", "2", "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0",
        "--dit_dtype", "float32", "--seed", "0", *extra,
    ])  # fmt: skip
    sd = load_file(str(tmp_path / "lora.safetensors"))
    modules = {k.split(".")[0] for k in sd}
    assert len(modules) == 2 * 12  # 12 Linears per block (modulation excluded), 2 blocks
    assert not any("_mod_" in m for m in modules)
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_qwen_image_model_version"] == version
    if name == "edit":
        from PIL import Image

        (sample,) = sorted((tmp_path / "sample").glob("*.png"))
        assert Image.open(sample).size == (32, 32)


def test_lora_targets_with_exclude_mod_false(qwen_bundle):
    from musubi_tuner.networks.lora_qwen_image import create_arch_network

    dit = load_dit(get_model_version("original"), qwen_bundle.dit, dtype=torch.float32)
    assert len(create_arch_network(1.0, 4, 4, None, None, dit).unet_loras) == 24
    assert len(create_arch_network(1.0, 4, 4, None, None, dit, exclude_mod="False").unet_loras) == 28
