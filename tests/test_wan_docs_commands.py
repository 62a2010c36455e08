"""The tiny-bundle command lines of docs/wan.md run as written (prepare → cache → two-expert training → generation)."""

from __future__ import annotations

import pytest
from doc_blocks import REPO, doc_scripts, run_doc_commands

DOC = REPO / "docs" / "wan.md"
WORK = "wan_tiny"


def test_doc_has_the_expert_table_and_stages():
    text = DOC.read_text(encoding="utf-8")
    assert "Which LoRA do I get?" in text and "`<name>_high_noise.safetensors` and `<name>_low_noise.safetensors`" in text
    scripts = doc_scripts(DOC)
    assert scripts == [
        "musubi_tuner.demo",
        "wan_cache_latents.py",
        "wan_cache_text_encoder_outputs.py",
        "wan_train_network.py",
        "wan_generate_video.py",
    ]


@pytest.mark.slow
def test_doc_commands_run_as_written(tmp_path):
    work = tmp_path / WORK
    run_doc_commands(DOC, WORK, work)
    out = work / "output"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "my_wan_lora_high_noise.safetensors",
        "my_wan_lora_low_noise.safetensors",
    ]
    assert len(list((work / "videos").glob("*.mp4"))) == 1
