"""Evaluate a checkpoint on the test split, as a reviewer reruns a paper's numbers.

python evaluate.py experiment=clip_demo ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
python evaluate.py experiment=clip_webtoon ckpt_path=CKPT export_dir=exported/clip   # + transformers export
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.utils.cli import one_line_errors

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Run the test loop on ``cfg.ckpt_path``; write metrics.json, metrics.md, analyses and exports."""
    import lightning as L
    from hydra.utils import instantiate

    from src.utils.run import (
        final_metrics,
        finish_run,
        instantiate_callbacks,
        instantiate_loggers,
        start_run,
    )

    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path} is not a file: point it at a checkpoint written by train.py."
        )
    output_dir = start_run(cfg)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [
        cb for cb in instantiate_callbacks(cfg) if not isinstance(cb, L.pytorch.callbacks.Checkpoint)
    ]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_loggers(cfg) or False
    )

    trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = final_metrics(trainer.callback_metrics, prefixes=("test/",))
    metrics = finish_run(cfg, output_dir, trainer, model, datamodule, callbacks, metrics)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate.yaml")
@one_line_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
