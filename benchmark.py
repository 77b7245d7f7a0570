"""Benchmarks: paper 000's fine-tuning grid, and the thesis' chapter V panels and story strips.

python benchmark.py benchmark=finetune_demo                                  # offline, own base model
python benchmark.py benchmark=finetune_hanok data.image_dir=/data/hanok      # SD 1.5, the paper's setting
python benchmark.py benchmark=finetune_hanok data.image_dir=/data/hanok launcher=submitit_slurm
python benchmark.py benchmark=panels_demo                                    # treatments -> panels, offline
python benchmark.py benchmark=stories_demo                                   # consistency options, offline

Fine-tuning cells train through Hydra multiruns of train.py (``launcher`` picks a Hydra launcher plugin for
clusters); a stopped benchmark rerun with the same command does only the cells not yet done. Writes ``out_dir``:
results.csv, tables.md, training_time.png, grid_<prompt>.png, and runs/<method>/images_<n>/ per cell. Panels and
strips write panels.md / strips.md, their JSON and the pictures (src/benchmark/panels.py).
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
    """Make what the benchmark needs (``builders``), then measure what its ``kind`` says; returns ``out_dir``."""
    from hydra.utils import instantiate

    runners = {"finetune": finetune_benchmark, "panels": panel_benchmark, "stories": story_benchmark}
    if cfg.get("name") is None or cfg.get("kind") not in runners:
        choices = sorted(p.stem for p in (Path(__file__).parent / "configs" / "benchmark").glob("*.yaml"))
        raise ValueError(
            f"Choose a benchmark: benchmark={'|'.join(c for c in choices if not c.endswith('_base'))}."
        )
    for name, builder in (cfg.get("builders") or {}).items():
        if builder is not None:  # a builder set to null: the input is given
            log.info("Preparing %s", name)
            instantiate(builder)()
    out_dir = runners[cfg.kind](cfg)
    print(f"Benchmark written to {out_dir}")
    return out_dir


def finetune_benchmark(cfg: DictConfig) -> Path:
    """Train and judge the cells not yet done, write the report."""
    from hydra.utils import to_absolute_path

    from src.benchmark.finetune import BASE, FineTuneBenchmark, write_report
    from src.utils.device import resolve_device

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
        concept_classifier=evaluation.get("concept_classifier"),
        concept_label=evaluation.get("concept_label"),
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
    return bench.out_dir


def panel_maker(cfg: DictConfig, weights: str | None = None):
    from hydra.utils import to_absolute_path

    from src.pipelines.loading import load_panel_maker

    return load_panel_maker(
        clip=to_absolute_path(cfg.clip),
        index=to_absolute_path(cfg.index),
        depth_model=local(cfg.depth_model),
        weights=local(weights) if weights else None,
        device=cfg.device,
        **OmegaConf.to_container(cfg.panel, resolve=True),
    )


def local(path: str) -> str:
    """A local path made absolute; a hub id as it is."""
    from hydra.utils import to_absolute_path

    return to_absolute_path(path) if Path(to_absolute_path(path)).exists() else str(path)


def panel_benchmark(cfg: DictConfig) -> Path:
    """Treatments of held-out scenes, in English and Korean, drawn with and without depth and judged."""
    from hydra.utils import instantiate, to_absolute_path

    from src.benchmark.panels import TreatmentCase, measure_panels

    out_dir = Path(to_absolute_path(cfg.out_dir))
    cases = [TreatmentCase(**case) for case in instantiate(cfg.cases)]
    measure_panels(panel_maker(cfg), cases, instantiate(cfg.judge), out_dir, cfg.seed)
    return out_dir


def story_benchmark(cfg: DictConfig) -> Path:
    """The same stories drawn by every consistency option and judged (consistency, faithfulness, IS, time)."""
    from hydra.utils import instantiate, to_absolute_path

    from src.benchmark.panels import measure_strips
    from src.data.stories import read_stories
    from src.metrics.clip_score import load_clip_judge
    from src.pipelines.loading import load_story_maker

    stories = [list(s.sentences) for s in read_stories(to_absolute_path(cfg.stories), language=cfg.language)]
    stories = stories[: cfg.num_stories]
    if not stories:
        raise ValueError(f"stories={cfg.stories} holds no {cfg.language} story.")
    panel_makers, story_makers = {}, {}
    for option, settings in cfg.options.items():
        weights = settings.get("weights")
        if weights not in panel_makers:  # options without weights share one panel model
            panel_makers[weights] = panel_maker(cfg, weights)
        story_makers[option] = load_story_maker(
            panel_makers[weights],
            settings.consistency,
            ip_adapter=OmegaConf.to_container(settings.ip_adapter) if settings.get("ip_adapter") else None,
            device=cfg.device,
            **OmegaConf.to_container(cfg.strip, resolve=True),
            **{key: settings[key] for key in ("shared_blocks", "adain") if key in settings},
        )
    out_dir = Path(to_absolute_path(cfg.out_dir))
    judge = load_clip_judge(local(cfg.judge), setting="judge")
    summary = measure_strips(
        story_makers, stories, judge, instantiate(cfg.feature_extractor), out_dir, cfg.seed
    )
    if cfg.get("paper"):  # only a benchmark on the paper's data and models tables its numbers
        lines = [
            "",
            f"The thesis (ch. V): {dict(cfg.paper)}; ours: "
            + ", ".join(f"{option} IS {scores['inception_score']:.2f}" for option, scores in summary.items()),
        ]
        with (out_dir / "strips.md").open("a") as handle:
            handle.write("\n".join(lines) + "\n")
    return out_dir


@hydra.main(version_base="1.3", config_path="configs", config_name="benchmark")
@one_line_errors
def main(cfg: DictConfig) -> None:
    benchmark(cfg)


if __name__ == "__main__":
    main()
