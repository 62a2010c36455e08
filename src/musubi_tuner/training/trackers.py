"""A dependency-free metrics tracker: ``--log_with jsonl`` appends one JSON object per logged step.

TensorBoard and wandb need extra packages; ``metrics.jsonl`` in the run directory (``--logging_dir``/``<run>``) can be
read by anything (the demo prints its loss trend from it). Each line is ``{"step": N, "<key>": value, ...}``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


class JsonlTracker(GeneralTracker):
    """Appends ``{"step": step, **values}`` lines to ``<logging_dir>/metrics.jsonl`` (main process only)."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike, **_: Any):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / METRICS_FILE
        self._file = None

    @property
    def tracker(self):
        return self._file

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run, closed in finish()

    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": {k: _plain(v) for k, v in values.items()}})

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._write({"step": step, **{k: _plain(v) for k, v in values.items()}})

    def _write(self, record: dict) -> None:
        if self._file is None:
            self.start()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The step records of a ``metrics.jsonl`` file (config lines skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec:
                records.append(rec)
    return records
