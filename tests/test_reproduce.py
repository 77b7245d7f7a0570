"""reproduce.py: one command per table of the three studies; runs what is missing, writes ours | paper | difference
(or, for the offline demo, ours beside its own references), with figures, the code version and the config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from hydra_runs import CONFIGS, ROOT, compose_plain, synthetic_samples
from omegaconf import OmegaConf
from PIL import Image

TABLES = sorted(p.stem for p in (CONFIGS / "table").glob("*.yaml"))
# what the paper variants need from a user, given here as placeholders so that their commands compose
PAPER_INPUTS = [
    "coco_root=/data/coco_webtoon/hayao",
    "hanok_dir=/data/hanok",
    "style_dir=/data/style",
    "+table.clip_checkpoint=/runs/clip/last.ckpt",
    "+table.index_dir=/data/index",
    "+table.stories=/data/stories.jsonl",
]


def reproduce(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "reproduce.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("variant", ["paper", "demo"])
@pytest.mark.parametrize("table", TABLES)
def test_every_run_of_every_table_composes_as_its_entry_point_reads_it(table, variant):
    inputs = [o.replace("+table.", "++table.") for o in PAPER_INPUTS] if variant == "paper" else []
    cfg = compose_plain("reproduce.yaml", [f"table={table}", f"variant={variant}", *inputs])
    spec = OmegaConf.to_container(cfg.table[variant], resolve=True)
    runs = spec["runs"]
    assert runs
    for command in runs.values():
        script, *overrides = command
        config = {"train.py": "train.yaml", "benchmark.py": "benchmark.yaml"}[script]
        composed = compose_plain(config, overrides)  # an unknown key, group or experiment fails here
        if script == "train.py":
            assert composed.data._target_ and composed.model._target_
        else:
            assert composed.kind in ("finetune", "panels", "stories")
    rows = spec.get("rows", [])
    assert all(row["run"] in runs for row in rows)
    assert all(
        ("paper" in row) == (variant == "paper") for row in rows
    )  # demo numbers never beside the paper's


def test_a_paper_variant_without_its_data_names_the_setting_to_give(tmp_path):
    result = reproduce("table=thesis_clip", f"out_dir={tmp_path}")
    assert result.returncode == 1 and "coco_root" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_the_clip_table_runs_once_and_tables_the_demo_beside_its_references_only(synthetic_dir, tmp_path):
    """The demo variant end to end (the run made tiny); a rerun runs nothing; the paper variant, its run done,
    tables ours | paper | difference."""
    tiny = [
        f"data.root={synthetic_dir}",
        f"data.builders.dataset.num_samples={synthetic_samples(synthetic_dir)}",
        "data.num_workers=0",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=1",
        "trainer.check_val_every_n_epoch=1",
        "model.warmup_steps=2",
        "callbacks.model_summary=null",
        "analyses=false",
        "extras.print_config=false",
    ]
    run_overrides = "run_overrides={clip: [" + ", ".join(f"'{override}'" for override in tiny) + "]}"
    demo_dir = tmp_path / "demo"
    result = reproduce("table=thesis_clip", "variant=demo", f"out_dir={demo_dir}", run_overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((demo_dir / "clip" / "metrics.json").read_text())
    table = (demo_dir / "table.md").read_text()
    assert "| | ours | untrained | chance |" in table and "paper |" not in table  # no column of the paper's
    assert f"| MRR@10 | {metrics['test/mrr@10']:.3f} |" in table
    assert "Code version: `" in table and "experiment=clip_demo" in table
    curves = Image.open(demo_dir / "accuracy_curves.png")
    assert curves.size[0] > 300

    finished = (demo_dir / "clip" / "metrics.json").stat().st_mtime_ns
    result = reproduce("table=thesis_clip", "variant=demo", f"out_dir={demo_dir}", run_overrides)
    assert result.returncode == 0 and (demo_dir / "clip" / "metrics.json").stat().st_mtime_ns == finished

    # the paper variant's run already done (here: the demo's, to exercise the table) -> nothing runs
    paper_dir = tmp_path / "paper"
    shutil.copytree(demo_dir / "clip", paper_dir / "clip")
    result = reproduce("table=thesis_clip", "coco_root=/not/needed", f"out_dir={paper_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((paper_dir / "table.json").read_text())["rows"]
    mrr1 = next(row for row in rows if row["label"] == "MRR@1")
    assert mrr1["paper"] == 0.23 and mrr1["difference"] == pytest.approx(metrics["test/mrr@1"] - 0.23)
    assert "| | ours | paper | difference |" in (paper_dir / "table.md").read_text()
