"""The tiny-bundle command lines of docs/kandinsky5.md run as written (cache → train → generate → merge)."""

from __future__ import annotations

import av
import pytest
from doc_blocks import REPO, doc_scripts, run_doc_commands
from safetensors import safe_open

DOC = REPO / "docs" / "kandinsky5.md"
WORK = "k5_tiny"


def test_doc_block_has_the_four_stages():
    scripts = doc_scripts(DOC)
    assert scripts == [
        "musubi_tuner.demo",
        "kandinsky5_cache_latents.py",
        "kandinsky5_cache_text_encoder_outputs.py",
        "kandinsky5_train_network.py",
        "kandinsky5_generate_video.py",
        "merge_lora.py",
    ]


@pytest.mark.slow
def test_doc_commands_run_as_written(tmp_path):
    work = tmp_path / WORK
    run_doc_commands(DOC, WORK, work)

    lora = work / "output" / "k5_lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora_kandinsky"
    assert any(k.startswith("lora_unet_visual_transformer_blocks_0_self_attention_to_query") for k in keys)
    assert (work / "output" / "k5_lora-000001.safetensors").is_file()  # --save_every_n_epochs 1

    with av.open(str(work / "video.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)

    with (
        safe_open(str(work / "merged_dit.safetensors"), "pt") as merged,
        safe_open(str(work / "bundle" / "dit" / "k5_tiny.safetensors"), "pt") as base,
    ):
        assert set(merged.keys()) == set(base.keys())
        key = "visual_transformer_blocks.0.self_attention.to_query.weight"
        assert not (merged.get_tensor(key) == base.get_tensor(key)).all()  # the LoRA was merged into it
