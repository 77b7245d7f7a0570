"""What train.py and evaluate.py share: instantiating callbacks and loggers, and writing run results."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import string
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def apply_extras(cfg: DictConfig) -> None:
    """Thread count, silenced library warnings, the resolved config tree (``extras`` group)."""
    extras = cfg.get("extras") or {}
    if extras.get("torch_threads"):
        import torch

        torch.set_num_threads(int(extras.torch_threads))
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # the training pipeline sets its length on purpose: each worker yields an exact share of the epoch
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
        warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)`.*")
        # the DataModules restore their loaders' position themselves (src/data/position.py)
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.data")
        # FLOP/s need a per-model FLOP count; batches/s and samples/s are what the monitor is used for here
        warnings.filterwarnings("ignore", message=".*define a `flops_per_batch` attribute.*")
    if extras.get("print_config"):
        import rich
        from rich.syntax import Syntax

        rich.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))


def start_run(cfg: DictConfig) -> Path:
    """What every entry point does first: extras, type checks, the resolved config in the run directory, seeds;
    returns that directory."""
    import lightning as L

    from src.utils.config import check_config_types

    apply_extras(cfg)
    check_config_types(cfg)
    output_dir = Path(cfg.paths.output_dir)
    save_config(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    return output_dir


def save_config(cfg: DictConfig, output_dir: str | os.PathLike) -> None:
    """The resolved config beside the run's results (Hydra's .hydra/ keeps the unresolved one)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(output_dir) / "config.yaml", resolve=True)


def instantiate_callbacks(cfg: DictConfig) -> list:
    """The configured callbacks, and the one that seeds every step from ``cfg.seed`` (exact resume, repeatable
    evaluation), which no callback preset leaves out."""
    from hydra.utils import instantiate

    from src.utils.seeding import StepSeeds

    configured = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values() if cb and "_target_" in cb]
    return [*configured, StepSeeds(cfg.seed)]


def instantiate_loggers(cfg: DictConfig) -> list:
    """Instantiate the configured loggers; W&B goes offline with a one-line notice when it cannot reach its server,
    and a resumed run logs into the W&B run it resumes (:func:`wandb_run_id`)."""
    from hydra.utils import instantiate

    loggers = []
    for name, spec in (cfg.get("logger") or {}).items():
        if not spec or "_target_" not in spec:
            continue
        if "WandbLogger" in spec._target_:
            reason = wandb_offline_reason()
            if reason and not spec.get("offline"):
                log.warning(
                    "W&B logs offline (%s); upload later with `wandb sync %s`.", reason, spec.save_dir
                )
                spec = OmegaConf.merge(spec, {"offline": True})
            if spec.get("id") is None:
                spec = OmegaConf.merge(spec, {"id": wandb_run_id(cfg)})
        loggers.append(instantiate(spec))
        log.info("Logger %s ready", name)
    return loggers


WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def wandb_run_id(cfg: DictConfig) -> str:
    """The W&B run id of this run: the one of the run it resumes (``ckpt_path`` inside that run's directory, or
    ``last`` in a requeued run's own directory), else a new one; kept in the run directory for the next resume."""
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = cfg.get("ckpt_path")
    resumed_dir = None
    if ckpt_path == "last":
        resumed_dir = output_dir
    elif ckpt_path and Path(ckpt_path).is_file():
        resumed_dir = Path(ckpt_path).resolve().parent.parent  # <run>/checkpoints/<name>.ckpt
    saved = resumed_dir / WANDB_RUN_ID_FILE if resumed_dir else None
    run_id = saved.read_text().strip() if saved and saved.is_file() else new_run_id()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / WANDB_RUN_ID_FILE).write_text(run_id + "\n")
    return run_id


def new_run_id() -> str:
    """8 characters of [a-z0-9], W&B's own id format (its generator is private and moved between versions)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_offline_reason(host: str = "api.wandb.ai", timeout: float = 2.0) -> str | None:
    """Why W&B cannot log online here (no API key, no network), or None when it can."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        netrc = Path.home() / ".netrc"
        has_key = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not has_key:
        return "no API key: set WANDB_API_KEY or run `wandb login`"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return f"{host} unreachable"
    return None


def log_hyperparameters(cfg: DictConfig, loggers: list, model: Any) -> None:
    """Send the resolved config and parameter counts to every logger."""
    if not loggers:
        return
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["model/params_total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in loggers:
        logger.log_hyperparams(hparams)


def final_metrics(
    callback_metrics: dict, prefixes: tuple[str, ...] = ("train/", "val/", "test/")
) -> dict[str, float]:
    """The trainer's last logged values as a flat ``{name: float}`` (``perf/`` and step-only values left out)."""
    out = {}
    for name, value in callback_metrics.items():
        if name.startswith(prefixes):
            number = float(value)
            out[name] = number if math.isfinite(number) else None
    return dict(sorted(out.items()))


def report_references(callbacks: list, stage: str = "test") -> tuple[dict[str, dict[str, float]], list[str]]:
    """Reference columns (chance levels, real-data values) and notes that the callbacks offer for a report."""
    columns: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for callback in callbacks:
        if hasattr(callback, "references"):
            for column, values in callback.references(stage).items():
                columns.setdefault(column, {}).update(values)
        if hasattr(callback, "report_notes"):
            notes += callback.report_notes()
    return columns, notes


def write_metrics(
    output_dir: str | os.PathLike,
    metrics: dict[str, float],
    references: dict[str, dict[str, float]] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """``metrics.json`` (flat dict) and ``metrics.md``: this run beside reference columns, and notes under it.

    A paper's numbers are a reference column only for experiments on the paper's data and metric; demos compare
    with their own references (untrained model, chance).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    references = {name: values for name, values in (references or {}).items() if values}
    header = ["metric", "this run", *references]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(metrics):
        cells = [name, _format(metrics[name]), *(_format(values.get(name)) for values in references.values())]
        rows.append("| " + " | ".join(cells) + " |")
    text = "\n".join(rows) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (output_dir / "metrics.md").write_text(text)
    return path


def _format(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def evaluate_untrained(cfg: DictConfig, model: Any, datamodule: Any) -> dict[str, float]:
    """The test metrics of ``model`` as it is now (before training), from a throwaway trainer without logging."""
    import lightning as L
    from hydra.utils import instantiate

    callbacks = [
        cb for cb in instantiate_callbacks(cfg) if not isinstance(cb, L.pytorch.callbacks.Checkpoint)
    ]
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    return final_metrics(trainer.callback_metrics, prefixes=("test/",))


def finish_run(
    cfg: DictConfig,
    output_dir: Path,
    trainer: Any,
    model: Any,
    datamodule: Any,
    callbacks: list,
    metrics: dict[str, float],
    references: dict[str, dict[str, float]] | None = None,
) -> dict[str, float]:
    """What train.py and evaluate.py do after testing: skip counts, the metrics report, analyses and exports."""
    metrics = dict(metrics)
    skipped = getattr(datamodule, "skipped", None)
    if skipped:
        log.warning("Skipped corrupt samples: %s", dict(skipped))
        metrics.update({f"data/skipped_{k}": float(v) for k, v in skipped.items()})
    if not trainer.is_global_zero:
        return metrics
    columns, notes = report_references(callbacks)
    paper = dict(cfg.get("paper_metrics") or {})
    path = write_metrics(output_dir, metrics, {**(references or {}), **columns, "paper": paper}, notes)
    log.info("Metrics written to %s", path)
    if cfg.get("analyses") and hasattr(model, "write_analyses"):
        model.write_analyses(datamodule.test_dataloader(), output_dir / "analyses")
    for setting, method in (("export_dir", "export"), ("text_encoder_export_dir", "export_text_encoder")):
        if cfg.get(setting):
            if not hasattr(model, method):
                raise ValueError(f"{type(model).__name__} has no {method}; leave {setting} unset.")
            getattr(model, method)(cfg[setting])
            log.info("%s: exported to %s", setting, cfg[setting])
    return metrics


def output_root(trainer: Any) -> Path:
    """``trainer.log_dir``; with W&B first, ``save_dir/project/run_id`` like Lightning's checkpoints, so runs don't clash."""
    from lightning.pytorch.loggers import WandbLogger

    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, WandbLogger) and logger.save_dir:
        return Path(logger.save_dir) / str(logger.name) / str(logger.version)
    return Path(trainer.log_dir or trainer.default_root_dir)
