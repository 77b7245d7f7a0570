"""Train a model: seed -> datamodule -> module -> callbacks -> loggers -> trainer -> fit -> test.

python train.py experiment=clip_demo
python train.py experiment=clip_webtoon data.root=/data/coco_webtoon/hayao
python train.py experiment=clip_demo ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume
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


def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Fit and test as the config says; return the final metrics and the built objects."""
    # Heavy imports live here so `--help` and config errors answer at once.
    import lightning as L
    from hydra.utils import instantiate

    from src.utils.run import (
        evaluate_untrained,
        final_metrics,
        finish_run,
        instantiate_callbacks,
        instantiate_loggers,
        log_hyperparameters,
        start_run,
    )

    output_dir = start_run(cfg)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg)
    loggers = instantiate_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(cfg, loggers, model)

    references: dict[str, dict[str, float]] = {}
    if cfg.report.get("untrained"):
        # The demo's own baseline: the same test on the initial weights, before any training.
        references["untrained"] = evaluate_untrained(cfg, model, datamodule)

    metrics: dict[str, float] = {}
    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update(final_metrics(trainer.callback_metrics))

    if cfg.get("test"):
        callback = trainer.checkpoint_callback
        # With no monitored metric the "best" checkpoint is only the latest periodic one, which can be steps
        # behind the end of training: then the weights in memory (the last ones) are tested.
        best = callback.best_model_path if callback is not None and callback.monitor else ""
        ckpt = best or (cfg.get("ckpt_path") if not cfg.get("train") else None)
        log.info("Testing %s", ckpt or "the weights in memory")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None)
        metrics.update(final_metrics(trainer.callback_metrics, prefixes=("test/",)))

    metrics = finish_run(cfg, output_dir, trainer, model, datamodule, callbacks, metrics, references)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return optimized_value(cfg, metrics)


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimizes. Under a sweeper that reads it (Optuna; not Hydra's basic grid, which
    benchmark.py also uses to launch its cells) a missing metric stops the trial with a message: given None,
    Optuna aborts the study with an error that names no metric."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    message = (
        f"optimized_metric={name} was not logged by this run; logged: {', '.join(sorted(metrics)) or 'nothing'}. "
        "Set optimized_metric (the hparams_search config does) to one of them, or enable what logs it."
    )
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is not None and hydra.mode == RunMode.MULTIRUN and "BasicSweeper" not in hydra.sweeper._target_:
        raise KeyError(message)
    log.warning(message)
    return None


if __name__ == "__main__":
    main()
