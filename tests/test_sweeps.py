"""Clusters and sweeps through Hydra's own plugins: the SLURM preset (submitit) as it resolves, a 2-job multirun
through submitit's local executor, a 2-trial Optuna study, and the message a sweep gets for a metric never logged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra_runs import CONFIGS, ROOT, tiny_clip_demo_overrides
from omegaconf import OmegaConf, open_dict


def tiny_clip(synthetic_dir: Path, sweep_dir: Path) -> list[str]:
    """The CLIP demo in a few steps (the DCGAN demo's on-demand CLIP settings), validated so a metric exists."""
    run_dir_setting = f"hydra.run.dir={sweep_dir}"
    steps = [o for o in tiny_clip_demo_overrides(synthetic_dir, sweep_dir) if o != run_dir_setting]
    return [
        "experiment=clip_demo",
        *steps,
        "data.batch_size=16",
        "trainer.check_val_every_n_epoch=1",
        "test=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def train_multirun(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", "-m", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def hydra_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train.yaml", overrides=overrides, return_hydra_config=True)


def test_the_slurm_preset_ties_tasks_and_gpus_to_the_trainer_and_leaves_requeue_to_submitit(monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    cfg = hydra_config(
        [
            "experiment=clip_webtoon",
            "hydra/launcher=slurm",
            "trainer=ddp_slurm",
            "trainer.devices=8",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
        ]
    )
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert launcher["partition"] == "gpu" and launcher["max_num_timeout"] > 0
    (plugin,) = cfg.trainer.plugins
    assert plugin._target_.endswith("SLURMEnvironment") and plugin.auto_requeue is False


@pytest.mark.slow
def test_two_optuna_trials_run_as_two_submitit_jobs_and_write_the_best_parameters(synthetic_dir, tmp_path):
    """hparams_search=clip_optuna with hydra/launcher=submitit_local: the sweeper asks for 2 trials at once, the
    launcher runs them as 2 submitit jobs (the SLURM preset's executor, locally), the study keeps the best."""
    result = train_multirun(
        *tiny_clip(synthetic_dir, tmp_path),
        "hparams_search=clip_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "hydra/launcher=submitit_local",
        "ckpt_path=last",  # as a requeued job runs: nothing to resume on a first start
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert yaml.safe_load((tmp_path / job / "metrics.json").read_text())["val/mrr@10"] > 0
    assert (
        len(list((tmp_path / ".submitit").iterdir())) >= 2
    )  # submitit's job folders: the jobs went through it
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
        "model.warmup_steps",
    }
    assert 0 < results["best_value"] <= 1
    assert (tmp_path / "optuna.db").is_file()  # the study, resumable with the same storage and name


def test_an_optuna_sweep_stops_at_a_metric_never_logged_and_other_runs_only_warn(caplog):
    from train import optimized_value

    metrics = {"val/loss": 1.0, "val/mrr@10": 0.5}
    cfg = OmegaConf.create({"optimized_metric": "val/mrr@5"})
    with caplog.at_level("WARNING"):
        assert optimized_value(cfg, metrics) is None
    assert "optimized_metric=val/mrr@5 was not logged" in caplog.text

    def sweep(*overrides: str) -> None:
        hydra = hydra_config(["experiment=clip_demo", *overrides])
        with open_dict(hydra):
            hydra.hydra.mode = "MULTIRUN"
        HydraConfig.instance().set_config(hydra)

    try:
        sweep("hparams_search=clip_optuna")
        with pytest.raises(KeyError, match=r"optimized_metric=val/mrr@5 .* logged: val/loss, val/mrr@10"):
            optimized_value(cfg, metrics)
        assert optimized_value(OmegaConf.create({"optimized_metric": "val/mrr@10"}), metrics) == 0.5
        sweep()  # Hydra's grid reads no value (benchmark.py launches its cells so): a warning only
        assert optimized_value(cfg, metrics) is None
    finally:
        HydraConfig.instance().cfg = None
