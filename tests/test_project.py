"""Project-level checks: the README's test command matches CI, user errors exit cleanly, writes are atomic."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from musubi_tuner.utils.atomic import atomic_path, atomic_write_text
from musubi_tuner.utils.errors import UserError, cli_entry

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README needs the two set-up commands"
    test_cmd = blocks[1].split("&&")[-1].strip()
    assert test_cmd.startswith("python -m pytest")
    assert test_cmd in ci


def test_cli_entry_turns_user_error_into_one_line_and_exit_2(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "from musubi_tuner.utils.errors import UserError, cli_entry\n"
        "@cli_entry\n"
        "def main():\n"
        "    raise UserError('config.toml: datasets[0]: unknown key \"resolutoin\"')\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'error: config.toml: datasets[0]: unknown key "resolutoin"'
    assert "Traceback" not in proc.stderr


def test_cli_entry_passes_return_value():
    assert cli_entry(lambda: 7)() == 7
    with pytest.raises(SystemExit) as exc:
        cli_entry(lambda: (_ for _ in ()).throw(UserError("x")))()
    assert exc.value.code == 2


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"], "temporary file left behind"
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_console_scripts_point_at_main_functions():
    import importlib

    import toml

    scripts = toml.load(ROOT / "pyproject.toml")["project"]["scripts"]
    assert "blissful-tuner-demo" in scripts and "kandinsky5-train-network" in scripts
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """Outputs (videos, LoRAs, caches) must be readable like any file the user writes, not 0o600 temp files."""
    import os

    from musubi_tuner.utils.atomic import make_temp_dir, save_safetensors_atomic

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        import torch

        save_safetensors_atomic({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
        d = make_temp_dir(tmp_path, ".d.")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert d.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name, "a.txt", "w.safetensors"]  # no temp files left


@pytest.mark.slow
def test_scripts_run_from_their_source_path():
    """DESIGN: ``python src/musubi_tuner/<script>.py`` works too (its folder is then first on sys.path)."""
    scripts = ["kandinsky5_cache_latents", "kandinsky5_cache_text_encoder_outputs", "kandinsky5_train_network"]
    scripts += ["kandinsky5_generate_video", "merge_lora", "convert_lora", "estimate_memory"]
    scripts += ["wan_cache_latents", "wan_cache_text_encoder_outputs", "wan_train_network", "wan_generate_video"]
    for name in scripts:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "src" / "musubi_tuner" / f"{name}.py"), "--help"], capture_output=True, text=True
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout, f"{name}: {proc.stderr[-2000:]}"
