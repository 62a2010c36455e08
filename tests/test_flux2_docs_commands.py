"""The tiny-bundle command lines of docs/flux_2.md run as written (cache → train → generate → merge)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "flux_2.md"
WORK = "f2_tiny"


def doc_commands() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- tiny-bundle:begin -->\s*```bash\n(.*?)```\s*<!-- tiny-bundle:end -->", text, re.S)
    assert block, f"{DOC}: tiny-bundle block not found"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def as_subprocess(argv: list[str], work: Path) -> list[str]:
    argv = [a.replace(f"{WORK}/", f"{work}/") if a.startswith(f"{WORK}/") else (str(work) if a == WORK else a) for a in argv]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    raise AssertionError(f"unexpected command in the doc: {argv[0]}")


def test_doc_block_has_every_stage():
    scripts = [next(a for a in c if a.endswith(".py") or a.startswith("musubi_tuner.")) for c in doc_commands()]
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
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for argv in doc_commands():
        proc = subprocess.run(as_subprocess(argv, work), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(argv[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with safe_open(str(work / "output" / "f2_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora_flux_2"
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in set(f.keys())
    (png,) = (work / "images").glob("*.png")
    assert Image.open(png).size == (64, 64)
    with safe_open(str(work / "merged_dit.safetensors"), "pt") as merged:
        assert merged.metadata()["flux2_model_version"] == "klein-4b"
        assert "single_blocks.1.linear2.weight" in set(merged.keys())
