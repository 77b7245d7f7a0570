"""The CLIP demo's trained text tower as the DCGAN demo's caption encoder, trained on demand when missing.

A randomly initialised BERT gives every caption nearly the same vector, so a GAN conditioned on it cannot follow
colours; the CLIP demo's text tower has learned which words matter, and maps an English caption and its Korean
translation to nearly the same vector, as multilingual BERT does for the thesis.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from src.demo.on_demand import ensure_experiment_export


def ensure_clip_text_encoder(
    out_dir: str | os.PathLike,
    train_script: str | os.PathLike,
    data_dir: str | os.PathLike,
    log_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
) -> Path:
    """``out_dir`` holding the exported text tower of ``experiment=clip_demo``; trains that experiment first if absent."""
    return ensure_experiment_export(
        out_dir,
        "clip_demo",
        train_script,
        data_dir,
        log_dir,
        export_setting="text_encoder_export_dir",
        overrides=overrides,
    )
