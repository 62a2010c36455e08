"""``--tf32_mode`` / ``--fp16_fast`` switch torch's backend flags; ``--compile*`` map to ``torch.compile`` arguments."""

from __future__ import annotations

import argparse

import pytest
import torch

from blissful_tuner.blissful_core import add_blissful_generation_args, parse_blissful_args
from blissful_tuner.utils import apply_precision_flags, compile_kwargs


@pytest.fixture
def restore_backend_flags():
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32, getattr(matmul, "allow_fp16_accumulation", None))
    yield
    matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
    if saved[2] is not None:
        matmul.allow_fp16_accumulation = saved[2]


def _args(*argv: str) -> argparse.Namespace:
    return parse_blissful_args(add_blissful_generation_args(argparse.ArgumentParser()).parse_args(list(argv)))


def test_tf32_and_fp16_fast_set_the_backend_flags(restore_backend_flags):
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    apply_precision_flags(_args())
    assert not matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32  # off unless asked for
    apply_precision_flags(_args("--tf32_mode"))
    assert matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    if hasattr(matmul, "allow_fp16_accumulation"):
        matmul.allow_fp16_accumulation = False
        apply_precision_flags(_args("--fp16_fast"))
        assert matmul.allow_fp16_accumulation


def test_compile_options_map_to_torch_compile_arguments():
    assert compile_kwargs(_args()) is None
    assert compile_kwargs(_args("--compile")) == {"backend": "inductor", "mode": None, "dynamic": None, "fullgraph": False}
    kw = compile_kwargs(
        _args(
            "--compile",
            "--compile_backend",
            "eager",
            "--compile_mode",
            "max-autotune-no-cudagraphs",
            "--compile_dynamic",
            "true",
            "--compile_fullgraph",
        )  # fmt: skip
    )
    assert kw == {"backend": "eager", "mode": "max-autotune-no-cudagraphs", "dynamic": True, "fullgraph": True}
    assert compile_kwargs(_args("--compile", "--compile_dynamic", "false"))["dynamic"] is False
