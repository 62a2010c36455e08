"""The one logger factory of the project.

Library modules call ``get_logger(__name__)`` and never configure logging themselves; the first call installs a
single rich handler on the package root loggers (``musubi_tuner`` and ``blissful_tuner``).
"""

from __future__ import annotations

import logging
import os

_ROOTS = ("musubi_tuner", "blissful_tuner", "__main__")
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    level = os.environ.get("BLISSFUL_LOG_LEVEL", "INFO").upper()
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False, log_time_format="[%X]"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    except ImportError:  # rich is a dependency; this only guards broken installs
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in _ROOTS:
        root = logging.getLogger(name)
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False


def get_logger(name: str) -> logging.Logger:
    """Return a logger below the project's configured roots (``name`` is normally ``__name__``)."""
    _configure()
    if not name.startswith(_ROOTS):
        name = f"musubi_tuner.{name}"
    return logging.getLogger(name)
