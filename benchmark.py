"""Benchmark Stable Diffusion fine-tuning methods as paper 000 does: method x number of images x prompt.

python benchmark.py benchmark=finetune_demo                                  # offline, own base model
python benchmark.py benchmark=finetune_hanok data.image_dir=/data/hanok      # SD 1.5, the paper's setting
python benchmark.py benchmark=finetune_hanok data.image_dir=/data/hanok launcher=submitit_slurm

Cells train through Hydra multiruns of train.py (``launcher`` picks a Hydra launcher plugin for clusters); a
stopped benchmark rerun with the same command does only the cells not yet done. Writes ``out_dir``:
results.csv, tables.md, training_time.png, grid_<prompt>.png, and runs/<method>/images_<n>/ per cell.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from src.utils.cli import one_line_errors

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
log = logging.getLogger(__name__)


def benchmark(cfg: DictConfig) -> Path:
    """Make what the benchmark needs (``builders``), train and judge the cells not yet done, write the report."""
    from hydra.utils import instantiate, to_absolute_path

    from src.benchmark.finetune import BASE, FineTuneBenchmark, write_report
    from src.utils.device import resolve_device

    if cfg.get("name") is None:
        raise ValueError(
            "Choose a benchmark: benchmark=finetune_demo or benchmark=finetune_hanok (configs/benchmark/)."
        )
    for name, builder in (cfg.get("builders") or {}).items():
        log.info("Preparing %s", name)
        instantiate(builder)()
    evaluation = cfg.evaluation
    device = str(resolve_device(evaluation.device))
    base_model = str(cfg.model.pretrained_model_name_or_path)
    if Path(to_absolute_path(base_model)).exists():
        base_model = to_absolute_path(base_model)
    bench = FineTuneBenchmark(
        out_dir=Path(to_absolute_path(cfg.out_dir)),
        image_dir=Path(to_absolute_path(cfg.data.image_dir)),
        base_model=base_model,
        methods=OmegaConf.to_container(cfg.methods, resolve=True),
        num_images=list(cfg.num_images),
        prompts=OmegaConf.to_container(cfg.prompts),
        judge=str(cfg.evaluation.judge),
        subject_name=str(cfg.subject_name),
        placeholder=str(cfg.placeholder),
        num_images_per_prompt=evaluation.num_images_per_prompt,
        seed=evaluation.seed,
        num_inference_steps=evaluation.num_inference_steps,
        guidance_scale=evaluation.guidance_scale,
        # the cells write where the benchmark reads (class images, ...), then the experiment's and the user's
        train_overrides=[f"paths.data_dir={cfg.paths.data_dir}", *cfg.train_overrides, *cfg.cell_overrides],
        launcher=cfg.launcher,
        device=device,
        train_script=Path(cfg.paths.root_dir) / "train.py",
    )
    results = bench.run()
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") else None
    if paper:  # YAML keys are strings; the tables look sizes up as numbers
        paper = {
            label: {m: {int(n): v for n, v in by_n.items()} for m, by_n in t.items()}
            for label, t in paper.items()
        }
    write_report(
        bench.out_dir,
        results,
        bench.prompts,
        [m for m in bench.methods if m != BASE],
        bench.num_images,
        paper=paper,
        note=str(cfg.get("note") or ""),
    )
    print(f"Benchmark written to {bench.out_dir}")
    return bench.out_dir


@hydra.main(version_base="1.3", config_path="configs", config_name="benchmark")
@one_line_errors
def main(cfg: DictConfig) -> None:
    benchmark(cfg)


if __name__ == "__main__":
    main()
