"""The tiny-bundle command lines of docs/flux_2.md run as written (cache → train → generate → merge)."""

from __future__ import annotations

import pytest
from doc_blocks import REPO, doc_scripts, run_doc_commands
from PIL import Image
from safetensors import safe_open

DOC = REPO / "docs" / "flux_2.md"
WORK = "f2_tiny"


def test_doc_block_has_every_stage():
    scripts = doc_scripts(DOC)
    assert scripts == [
        "musubi_tuner.demo",
        "flux_2_cache_latents.py",
        "flux_2_cache_text_encoder_outputs.py",
        "flux_2_train_network.py",
        "flux_2_generate_image.py",
        "merge_lora.py",
    ]


@pytest.mark.slow
def test_doc_commands_run_as_written(tmp_path):
    work = tmp_path / WORK
    run_doc_commands(DOC, WORK, work)
    with safe_open(str(work / "output" / "f2_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora_flux_2"
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in set(f.keys())
    (png,) = (work / "images").glob("*.png")
    assert Image.open(png).size == (64, 64)
    with safe_open(str(work / "merged_dit.safetensors"), "pt") as merged:
        assert merged.metadata()["flux2_model_version"] == "klein-4b"
        assert "single_blocks.1.linear2.weight" in set(merged.keys())
