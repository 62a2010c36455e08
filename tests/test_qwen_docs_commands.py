"""The tiny-bundle command lines of docs/qwen_image.md run as written (demo prepare → cache → train → generate T2I and
Edit-2509 → merge)."""

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

from blissful_tuner.metadata import read_metadata

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "qwen_image.md"
WORK = "qi_tiny"


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
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for argv in doc_commands():
        proc = subprocess.run(as_subprocess(argv, work), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(argv[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
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
