"""What train.py and evaluate.py share: instantiating callbacks and loggers, and writing run results."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def apply_extras(cfg: DictConfig) -> None:
    """Silence noisy library warnings and print the resolved config tree (``extras`` group)."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # the training pipeline sets its length on purpose: each worker yields an exact share of the epoch
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
        warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)`.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.data")
    if extras.get("print_config"):
        import rich
        from rich.syntax import Syntax

        rich.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))


def start_run(cfg: DictConfig) -> Path:
    """What every entry point does first: extras, the resolved config in the run directory, seeds; returns that directory."""
    import lightning as L

    apply_extras(cfg)
    output_dir = Path(cfg.paths.output_dir)
    save_config(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    return output_dir


def save_config(cfg: DictConfig, output_dir: str | os.PathLike) -> None:
    """The resolved config beside the run's results (Hydra's .hydra/ keeps the unresolved one)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(output_dir) / "config.yaml", resolve=True)


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list:
    from hydra.utils import instantiate

    return [instantiate(cb) for cb in (callbacks_cfg or {}).values() if cb and "_target_" in cb]


def instantiate_loggers(logger_cfg: DictConfig | None) -> list:
    """Instantiate the configured loggers; W&B goes offline with a one-line notice when it cannot reach its server."""
    from hydra.utils import instantiate

    loggers = []
    for name, spec in (logger_cfg or {}).items():
        if not spec or "_target_" not in spec:
            continue
        if "WandbLogger" in spec._target_:
            reason = wandb_offline_reason()
            if reason and not spec.get("offline"):
                log.warning(
                    "W&B logs offline (%s); upload later with `wandb sync %s`.", reason, spec.save_dir
                )
                spec = OmegaConf.merge(spec, {"offline": True})
        loggers.append(instantiate(spec))
        log.info("Logger %s ready", name)
    return loggers


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


def write_metrics(
    output_dir: str | os.PathLike, metrics: dict[str, float], paper: dict[str, float] | None = None
) -> Path:
    """``metrics.json`` (flat dict) and ``metrics.md`` (a table beside the paper's numbers) in the run directory."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    paper = dict(paper or {})
    rows = ["| metric | this run | paper |", "|---|---|---|"]
    for name in sorted(set(metrics) | set(paper)):
        ours = metrics.get(name)
        rows.append(f"| {name} | {'' if ours is None else f'{ours:.4f}'} | {paper.get(name, '')} |")
    (output_dir / "metrics.md").write_text("\n".join(rows) + "\n")
    return path
