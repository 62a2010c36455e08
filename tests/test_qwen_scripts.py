"""The Qwen-Image scripts run as root wrappers, from their source path and as modules (DESIGN.md "Layout")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "qwen_image_cache_latents",
    "qwen_image_cache_text_encoder_outputs",
    "qwen_image_train_network",
    "qwen_image_generate_image",
)


@pytest.mark.slow
def test_every_way_to_start_the_scripts():
    runs = [[str(ROOT / "src" / "musubi_tuner" / f"{name}.py")] for name in SCRIPTS]
    runs += [[str(ROOT / "qwen_image_generate_image.py")], ["-m", "musubi_tuner.qwen_image_train_network"]]
    for argv in runs:
        proc = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0 and "usage:" in proc.stdout, f"{argv}: {proc.stderr[-2000:]}"
        assert "--model_version" in proc.stdout
