"""Fixtures of the dataset-layer tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def warnings_log(caplog):
    """Records of the project loggers (they do not propagate to the root logger)."""
    logger = logging.getLogger("musubi_tuner")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="musubi_tuner")
    yield caplog
    logger.removeHandler(caplog.handler)
