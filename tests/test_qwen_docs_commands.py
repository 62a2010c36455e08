"""The tiny-bundle command lines of docs/qwen_image.md run as written (demo prepare → cache → train → generate T2I and
Edit-2509 → merge)."""

from __future__ import annotations

import pytest
from doc_blocks import REPO, doc_scripts, run_doc_commands
from PIL import Image
from safetensors import safe_open

from blissful_tuner.metadata import read_metadata

DOC = REPO / "docs" / "qwen_image.md"
WORK = "qi_tiny"


def test_doc_block_has_every_stage():
    scripts = doc_scripts(DOC)
    assert scripts == [
        "musubi_tuner.demo",
        "qwen_image_cache_latents.py",
        "qwen_image_cache_text_encoder_outputs.py",
        "qwen_image_train_network.py",
        "qwen_image_generate_image.py",
        "qwen_image_generate_image.py",
        "merge_lora.py",
    ]


@pytest.mark.slow
def test_doc_commands_run_as_written(tmp_path):
    work = tmp_path / WORK
    run_doc_commands(DOC, WORK, work)
    with safe_open(str(work / "output" / "qwen_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora_qwen_image"
        assert any(k.startswith("lora_unet_transformer_blocks_0_attn_to_q") for k in f.keys())
    assert (work / "output" / "qwen_lora-000001.safetensors").is_file()
    (t2i,) = sorted((work / "images").glob("*.png"))
    assert Image.open(t2i).size == (64, 64) and read_metadata(t2i)["bt_lora_0"] == "qwen_lora.safetensors: 1"
    (edit,) = sorted((work / "edit").glob("*.png"))
    assert read_metadata(edit)["bt_model_version"] == "edit-2509"
    with safe_open(str(work / "merged_dit.safetensors"), "pt") as merged:
        assert "transformer_blocks.0.attn.to_q.weight" in merged.keys()
