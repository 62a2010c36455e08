"""The tiny-bundle command lines of docs/wan.md run as written (prepare → cache → two-expert training → generation)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "wan.md"
WORK = "wan_tiny"


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


def test_doc_has_the_expert_table_and_stages():
    text = DOC.read_text(encoding="utf-8")
    assert "Which LoRA do I get?" in text and "`<name>_high_noise.safetensors` and `<name>_low_noise.safetensors`" in text
    scripts = [next(a for a in c if a.endswith(".py") or a.startswith("musubi_tuner.")) for c in doc_commands()]
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
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    for argv in doc_commands():
        proc = subprocess.run(as_subprocess(argv, work), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(argv[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = work / "output"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "my_wan_lora_high_noise.safetensors",
        "my_wan_lora_low_noise.safetensors",
    ]
    assert len(list((work / "videos").glob("*.mp4"))) == 1
