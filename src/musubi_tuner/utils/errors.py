"""User-facing errors and the CLI wrapper that turns them into one clear message and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user caused and can fix (bad config key, missing file, malformed prompt line...).

    The message must name the file, key or line. CLIs print it without a traceback and exit with status 2.
    """


def cli_entry(func: F) -> F:
    """Decorate a script's ``main`` so a ``UserError`` prints ``error: <message>`` and exits non-zero.

    Set ``BLISSFUL_TRACEBACK=1`` to re-raise (debugging).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import os

        try:
            return func(*args, **kwargs)
        except UserError as e:
            if os.environ.get("BLISSFUL_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
