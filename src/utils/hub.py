"""Loading hub weights with one clear message when they are not there, and building random ones from a config."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class MissingWeightsError(RuntimeError):
    """Raised when a hub name or local path cannot be loaded (offline, typo, or not downloaded)."""


def from_pretrained(loader: Callable[..., T], name_or_path: str, setting: str, **kwargs) -> T:
    """Call ``loader(name_or_path, **kwargs)``; on failure say what to download and which setting to point elsewhere."""
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise missing_weights(name_or_path, setting, error) from error


def missing_weights(name_or_path: str, setting: str, error: Exception | None = None) -> MissingWeightsError:
    """The one message for a model that is neither on disk nor reachable: what to download, which setting."""
    name = str(name_or_path)
    # A hub id is `name` or `owner/name`; anything else with a separator is meant as a path.
    is_local = os.path.exists(name) or name.startswith((os.sep, ".", "~")) or name.count("/") > 1
    where = (
        f"the local path '{name_or_path}' does not hold a saved model (save_pretrained output)"
        if is_local
        else (
            f"'{name_or_path}' is not in the Hugging Face cache and the hub cannot be reached. "
            f"Download it once with `hf download {name_or_path}` on a machine with network"
        )
    )
    cause = ""
    if error is not None:
        cause = f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return MissingWeightsError(
        f"Cannot load weights for `{setting}`: {where}, or set `{setting}=/path/to/local/copy`.{cause}"
    )


def load_or_init_model(
    name_or_path: str | None,
    config: Mapping[str, Any] | None,
    setting: str,
    seed: int | None = None,
    **config_overrides: Any,
):
    """A transformers model from ``name_or_path`` (hub or local), or, when that is null, randomly initialised
    from ``config`` (``{"model_type": "bert", ...}``); ``seed`` makes the random weights reproducible."""
    import torch
    from transformers import AutoConfig, AutoModel

    if name_or_path:
        return from_pretrained(AutoModel.from_pretrained, str(name_or_path), setting)
    if not config:
        raise ValueError(
            f"Set `{setting}` (hub name or local path) or give a config for random initialisation."
        )
    options = {**config, **config_overrides}
    model_type = options.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"The config for a random `{setting}` needs a `model_type` (e.g. bert).")
    model_config = AutoConfig.for_model(model_type, **options)
    if seed is None:
        return AutoModel.from_config(model_config)
    # A private RNG stream: the same seed gives the same weights whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModel.from_config(model_config)
