"""The CLIP demo's trained text tower as the DCGAN demo's caption encoder, trained on demand when missing.

A randomly initialised BERT gives every caption nearly the same vector, so a GAN conditioned on it cannot follow
colours; the CLIP demo's text tower has learned which words matter, and maps an English caption and its Korean
translation to nearly the same vector, as multilingual BERT does for the thesis.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_clip_text_encoder(
    out_dir: str | os.PathLike,
    train_script: str | os.PathLike,
    data_dir: str | os.PathLike,
    log_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
) -> Path:
    """``out_dir`` holding the exported text tower of ``experiment=clip_demo``; trains that experiment first if absent."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        sys.executable,
        str(train_script),
        "experiment=clip_demo",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={log_dir}",
        f"text_encoder_export_dir={partial}",
        *overrides,
    ]
    log.warning("No CLIP text encoder at %s: training experiment=clip_demo first (a few minutes)", out_dir)
    result = subprocess.run(command)
    if result.returncode != 0 or not (partial / "config.json").is_file():
        raise RuntimeError(
            f"Training the CLIP demo for its text encoder failed (exit {result.returncode}): "
            f"{' '.join(command)}. Its log is under {log_dir}/train/runs/."
        )
    # Renamed only once complete, so an interrupted training is redone rather than half used.
    os.replace(partial, out_dir)
    return out_dir
