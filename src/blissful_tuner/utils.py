"""Small runtime helpers for the generate scripts: precision switches, torch.compile settings, the bell."""

from __future__ import annotations

import sys
from typing import Any

import torch

from blissful_tuner.blissful_logger import get_logger

logger = get_logger(__name__)


def apply_precision_flags(args: Any) -> None:
    """``--tf32_mode``: TF32 matmuls and cuDNN convolutions; ``--fp16_fast``: fp16 accumulation in matmuls
    (needs a torch build that has ``allow_fp16_accumulation``; otherwise a warning and nothing changes)."""
    if getattr(args, "tf32_mode", False):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        logger.info("TF32 matmuls and convolutions enabled")
    if getattr(args, "fp16_fast", False):
        if hasattr(torch.backends.cuda.matmul, "allow_fp16_accumulation"):
            torch.backends.cuda.matmul.allow_fp16_accumulation = True
            logger.info("fp16 accumulation enabled")
        else:
            logger.warning("--fp16_fast: this torch build has no fp16 accumulation switch; ignored")


def compile_kwargs(args: Any) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments of ``--compile*`` (``None`` without ``--compile``).

    ``--compile_dynamic auto`` (stored as ``None`` by ``parse_blissful_args``) lets torch decide.
    """
    if not getattr(args, "compile", False):
        return None
    dynamic = getattr(args, "compile_dynamic", None)
    if isinstance(dynamic, str):
        dynamic = {"auto": None, "true": True, "false": False}[dynamic]
    return {
        "backend": getattr(args, "compile_backend", "inductor"),
        "mode": None if getattr(args, "compile_mode", "default") == "default" else args.compile_mode,
        "dynamic": dynamic,
        "fullgraph": bool(getattr(args, "compile_fullgraph", False)),
    }


def ring_bell() -> None:
    """Ring the terminal bell (``--bell``)."""
    sys.stderr.write("\a")
    sys.stderr.flush()
