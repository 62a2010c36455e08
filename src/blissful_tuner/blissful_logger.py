"""Logger access for blissful_tuner modules; the factory itself lives in ``musubi_tuner.utils.log``."""

from musubi_tuner.utils.log import get_logger

__all__ = ["get_logger"]
