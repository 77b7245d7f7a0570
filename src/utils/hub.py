"""Loading hub weights with one clear message when they are not there."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class MissingWeightsError(RuntimeError):
    """Raised when a hub name or local path cannot be loaded (offline, typo, or not downloaded)."""


def from_pretrained(loader: Callable[..., T], name_or_path: str, setting: str, **kwargs) -> T:
    """Call ``loader(name_or_path, **kwargs)``; on failure say what to download and which setting to point elsewhere."""
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        is_local = os.path.sep in name_or_path or os.path.exists(name_or_path)
        where = (
            f"the local path '{name_or_path}' does not hold a saved model (save_pretrained output)"
            if is_local
            else (
                f"'{name_or_path}' is not in the Hugging Face cache and the hub cannot be reached. "
                f"Download it once with `hf download {name_or_path}` on a machine with network"
            )
        )
        raise MissingWeightsError(
            f"Cannot load weights for `{setting}`: {where}, or set `{setting}=/path/to/local/copy`. "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
