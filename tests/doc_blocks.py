"""Run a user guide's tiny-bundle command block as written (shared by the tests/test_*_docs_commands.py files).

The block sits between ``<!-- tiny-bundle:begin -->`` and ``<!-- tiny-bundle:end -->`` in a ```` ```bash ```` fence;
its work directory (``work_name`` in the doc) is redirected to a temporary directory.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def doc_commands(doc: Path) -> list[list[str]]:
    """The shell commands of the doc's tiny-bundle block, continuation lines joined, each split like a shell would."""
    text = doc.read_text(encoding="utf-8")
    block = re.search(r"<!-- tiny-bundle:begin -->\s*```bash\n(.*?)```\s*<!-- tiny-bundle:end -->", text, re.S)
    assert block, f"{doc}: tiny-bundle block not found"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def doc_scripts(doc: Path) -> list[str]:
    """The script (or ``-m`` module) each command of the block runs, in order."""
    return [next(a for a in c if a.endswith(".py") or a.startswith("musubi_tuner.")) for c in doc_commands(doc)]


def as_subprocess(argv: list[str], work_name: str, work: Path) -> list[str]:
    """Run ``python``/``accelerate`` with this interpreter and point the doc's work directory at ``work``."""
    argv = [
        a.replace(f"{work_name}/", f"{work}/") if a.startswith(f"{work_name}/") else (str(work) if a == work_name else a)
        for a in argv
    ]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    raise AssertionError(f"unexpected command in the doc: {argv[0]}")


def run_doc_commands(doc: Path, work_name: str, work: Path) -> None:
    """Run every command of the block from the repository root; a failing command fails with its output."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for argv in doc_commands(doc):
        cmd = as_subprocess(argv, work_name, work)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(argv[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
