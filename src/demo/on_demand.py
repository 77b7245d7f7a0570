"""Models that one demo needs from another, trained on demand by running the other's experiment once.

The DCGAN demo needs the CLIP demo's text tower; the diffusion demos need the concept-aware CLIP judge and the
demo base model. Each is a directory that a finished run exports; when it is missing, the experiment that makes
it runs in a subprocess (``python train.py experiment=...``), exporting into ``<out_dir>.partial``, which is
renamed only once complete, so an interrupted training is redone rather than half used.
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


def ensure_experiment_export(
    out_dir: str | os.PathLike,
    experiment: str,
    train_script: str | os.PathLike,
    data_dir: str | os.PathLike,
    log_dir: str | os.PathLike,
    export_setting: str = "export_dir",
    marker: str = "config.json",
    overrides: Sequence[str] = (),
) -> Path:
    """``out_dir`` holding ``marker`` from ``experiment``'s export (its ``export_setting``); trains it if absent."""
    out_dir = Path(out_dir)
    if (out_dir / marker).is_file():
        return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        sys.executable,
        str(train_script),
        f"experiment={experiment}",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={log_dir}",
        f"{export_setting}={partial}",
        *overrides,
    ]
    log.warning("Nothing at %s: training experiment=%s first to make it", out_dir, experiment)
    result = subprocess.run(command)
    if result.returncode != 0 or not (partial / marker).is_file():
        raise RuntimeError(
            f"Training experiment={experiment} for {out_dir} failed (exit {result.returncode}): "
            f"{' '.join(command)}. Its log is under {log_dir}/train/runs/."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out_dir)
    return out_dir
