"""Entry points answer a user's mistake (a missing setting, a wrong type, a missing file or weight) with one line.

Hydra prints a traceback for any exception; for mistakes whose message already says what to change, that
traceback only hides the message. ``HYDRA_FULL_ERROR=1`` brings it back, as for Hydra's own errors.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf.errors import MissingMandatoryValue

from src.utils.config import ConfigTypeError
from src.utils.hub import MissingWeightsError

F = TypeVar("F", bound=Callable[..., Any])

# Raised with a message that names the setting or file to fix.
USER_ERRORS = (ConfigTypeError, MissingWeightsError, MissingMandatoryValue, FileNotFoundError, ValueError)


def one_line_errors(main: F) -> F:
    """Wrap a Hydra task function: a user's mistake exits with status 1 and its message on one line."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"Error: {describe(error)}", file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def describe(error: Exception) -> str:
    if isinstance(error, MissingMandatoryValue):
        # omegaconf's message spans lines (full_key, object_type); the key is what the user must set
        key = getattr(error, "full_key", None) or str(error).splitlines()[0]
        return f"{key} is required: set it on the command line ({key}=...)."
    return " ".join(str(error).split())
