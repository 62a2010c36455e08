"""The tiny-bundle command lines of docs/kandinsky5.md run as written (cache → train → generate → merge)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import av
import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "kandinsky5.md"
WORK = "k5_tiny"


def doc_commands() -> list[list[str]]:
    """The shell commands of the doc's tiny-bundle block, continuation lines joined, each split like a shell would."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- tiny-bundle:begin -->\s*```bash\n(.*?)```\s*<!-- tiny-bundle:end -->", text, re.S)
    assert block, f"{DOC}: tiny-bundle block not found"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def as_subprocess(argv: list[str], work: Path) -> list[str]:
    """Run ``python``/``accelerate`` with this interpreter and point the doc's work directory at ``work``."""
    argv = [a.replace(f"{WORK}/", f"{work}/") if a.startswith(f"{WORK}/") else (str(work) if a == WORK else a) for a in argv]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    raise AssertionError(f"unexpected command in the doc: {argv[0]}")


def test_doc_block_has_the_four_stages():
    scripts = [next(a for a in c if a.endswith(".py") or a.startswith("musubi_tuner.")) for c in doc_commands()]
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
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for argv in doc_commands():
        cmd = as_subprocess(argv, work)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(argv[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

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
