"""A run killed with SIGKILL mid-epoch leaves no loader worker behind and, resumed from its last checkpoint, ends
exactly as the uninterrupted run: the same final weights and every test metric equal, for CLIP (webdataset shards,
two loader workers, a validation between epochs) and for Textual Inversion (an image folder with random flips, two
loader workers). Evaluating one checkpoint twice gives identical metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra_runs import ROOT, compose_config, synthetic_samples
from safetensors.torch import load_file
from test_finetune_experiments import finetune_overrides
from tiny_sd import build_tiny_stable_diffusion, write_image_folder

KILL_AT_STEP = "+callbacks.kill._target_=probes.KillAtStep"


def start_train(overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # the probes' module
    return subprocess.Popen(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(run: subprocess.Popen, expect_killed: bool = False) -> None:
    _, stderr = run.communicate(timeout=600)
    if expect_killed:
        assert run.returncode == -9, (
            f"expected the probe's SIGKILL, got exit {run.returncode}: {stderr[-2000:]}"
        )
    else:
        assert run.returncode == 0, stderr[-3000:]


def watch_children(run: subprocess.Popen) -> list:
    """Every child process ``run`` had (its loader workers) until it ended."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    while run.poll() is None:
        try:
            seen.update({child.pid: child for child in psutil.Process(run.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return list(seen.values())


def assert_all_died(processes: list) -> None:
    """A killed run leaves nothing behind: its loader workers die with it (PR_SET_PDEATHSIG). Without it torch's
    watchdog notices a dead parent only every 5 s, and never in a worker blocked on a full pipe (one stayed 10+
    minutes holding 720 MB)."""
    import psutil

    def alive(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, waiting for init to reap it
        except psutil.NoSuchProcess:
            return False

    stop = time.monotonic() + 1.5  # the kernel signals at once; the watchdog polls every 5 s
    while any(alive(p) for p in processes) and time.monotonic() < stop:
        time.sleep(0.1)
    survivors = [p.pid for p in processes if alive(p)]
    for pid in survivors:
        psutil.Process(pid).kill()
    assert not survivors, f"loader workers outlived their killed parent: {survivors}"


def kill_resume_and_compare(overrides, tmp_path: Path, kill_at: int, checkpoint_step: int) -> dict:
    """The uninterrupted run beside one killed as step ``kill_at`` begins; then the killed one resumed in its own
    directory with ``ckpt_path=last`` (what a requeued job does). Their last checkpoints hold the same weights;
    returns both runs' directories."""
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    runs = [
        start_train([*overrides, f"hydra.run.dir={uninterrupted}"]),
        start_train([*overrides, f"hydra.run.dir={killed}", KILL_AT_STEP, f"+callbacks.kill.step={kill_at}"]),
    ]
    workers = watch_children(runs[1])
    finish(runs[0])
    finish(runs[1], expect_killed=True)
    assert workers, "the killed run started no loader worker"
    assert_all_died(workers)
    last = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == checkpoint_step  # mid-epoch: the step checkpoint, not an epoch end
    assert not list((killed / "checkpoints").glob("*.partial"))

    finish(start_train([*overrides, f"hydra.run.dir={killed}", "ckpt_path=last"]))
    final = {
        name: torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for name, run in (("uninterrupted", uninterrupted), ("resumed", killed))
    }
    assert final["resumed"]["global_step"] == final["uninterrupted"]["global_step"]
    weights = final["uninterrupted"]["state_dict"]
    assert final["resumed"]["state_dict"].keys() == weights.keys()
    for name, value in final["resumed"]["state_dict"].items():
        assert torch.equal(value, weights[name]), f"{name} differs after the resume"
    return {"uninterrupted": uninterrupted, "resumed": killed}


def clip_overrides(synthetic_dir: Path) -> list[str]:
    return [
        "experiment=clip_demo",
        f"data.root={synthetic_dir}",
        f"data.builders.dataset.num_samples={synthetic_samples(synthetic_dir)}",
        "data.num_workers=2",
        "data.batch_size=32",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "model.warmup_steps=5",
        "callbacks.step_checkpoint.every_n_train_steps=4",
        "callbacks.model_summary=null",
        "report.untrained=false",
        "analyses=false",
        "extras.print_config=false",
    ]


def test_a_clip_run_killed_mid_epoch_resumes_exactly_and_evaluates_the_same_twice(synthetic_dir, tmp_path):
    from evaluate import evaluate

    overrides = clip_overrides(synthetic_dir)
    # 5 steps an epoch: killed as step 9 begins, after the step checkpoint at 8 (3 batches into epoch 2)
    kill_resume_and_compare(overrides, tmp_path, kill_at=9, checkpoint_step=8)
    metrics = [
        json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("uninterrupted", "killed")
    ]
    tested = {name for name in metrics[0] if name.startswith("test/")}
    assert tested and all(metrics[1][name] == metrics[0][name] for name in tested)

    checkpoint = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    evaluations = [
        evaluate(
            compose_config(
                "evaluate.yaml",
                [
                    *overrides[:3],
                    "data.num_workers=2",
                    f"ckpt_path={checkpoint}",
                    "callbacks.model_summary=null",
                    "analyses=false",
                ],
                tmp_path / f"evaluation_{n}",
            )
        )[0]
        for n in range(2)
    ]
    assert "test/accuracy" in evaluations[0] and evaluations[0] == evaluations[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


def test_a_textual_inversion_run_killed_mid_epoch_resumes_exactly(tiny_sd, tmp_path):
    images = write_image_folder(tmp_path / "images", num_images=6)
    overrides = finetune_overrides(
        "finetune_textual_inversion",
        tiny_sd,
        images,
        tmp_path / "data",
        "data.num_workers=2",  # flips drawn in loader workers
        "trainer.max_steps=10",  # 4 images a batch of 1 each: epochs of 4 steps
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.validation_prompts.every_n_steps=100",
        "~callbacks.snapshot",
        "extras.print_config=false",
    )
    # killed as step 7 begins, after the checkpoint at step 6 (2 batches into epoch 2)
    runs = kill_resume_and_compare(overrides, tmp_path, kill_at=7, checkpoint_step=6)
    # the final weights (step 10, past the last checkpoint at 9) as exported: the learned embedding
    uninterrupted, resumed = (
        load_file(runs[name] / "export" / "learned_embeds.safetensors") for name in runs
    )
    assert resumed.keys() == uninterrupted.keys() == {"<hanok>"}
    assert torch.equal(resumed["<hanok>"], uninterrupted["<hanok>"])
