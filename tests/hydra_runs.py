"""Composing the real configs for tests, with the heavy parts swapped for tiny local copies."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# benchmark.py's grids of fine-tuning runs (tests/test_benchmark.py)
# benchmark=NAME choices; *_base files hold what a family of benchmarks shares and run nothing themselves
BENCHMARKS = tuple(
    sorted(p.stem for p in (CONFIGS / "benchmark").glob("*.yaml") if not p.stem.endswith("_base"))
)
# Stable Diffusion fine-tuning runs on images folders and a base model (tests/test_finetune_experiments.py)
FINETUNE_EXPERIMENTS = tuple(e for e in ALL_EXPERIMENTS if e.startswith("finetune_") or e == "style_lora")
# text-to-image models trained from scratch (tests/test_sd_base.py)
DIFFUSION_EXPERIMENTS = ("sd_demo_base",)
# depth-to-image grown from a text-to-image base (tests/test_sd_depth.py)
DEPTH_EXPERIMENTS = ("sd_demo_depth",)
# ControlNets trained on a frozen base (tests/test_controlnet_training.py)
CONTROLNET_EXPERIMENTS = ("controlnet_canny", "controlnet_demo")
# Korean text encoders distilled into a base's text space (tests/test_korean_text_encoder.py)
KOREAN_EXPERIMENTS = ("korean_text_encoder", "korean_text_encoder_demo")
# CLIP and DCGAN runs on the bilingual shards (tests/test_experiments.py)
EXPERIMENTS = tuple(
    e
    for e in ALL_EXPERIMENTS
    if e
    not in (
        *FINETUNE_EXPERIMENTS,
        *DIFFUSION_EXPERIMENTS,
        *DEPTH_EXPERIMENTS,
        *CONTROLNET_EXPERIMENTS,
        *KOREAN_EXPERIMENTS,
    )
)
THESIS_EXPERIMENTS = ("clip_webtoon", "dcgan_webtoon")


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    """The config an entry point would get, with its run directory (and logs) in ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.extras.print_config = False
        if "PYTEST_XDIST_WORKER" in os.environ:
            # the demos' two torch threads beside another worker's oversubscribe the 2 cores (see conftest.py)
            cfg.extras.torch_threads = None
    return cfg


def compose_plain(config_name: str, overrides: list[str]):
    """The config of an entry point without run directories (generate.py, prepare_data.py)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def experiment_overrides(
    experiment: str, synthetic_dir: Path, data_dir: Path, towers: dict[str, Path], *extra: str
) -> list[str]:
    """A few steps of ``experiment`` on the generated dataset, hub towers replaced by local tiny copies.

    These are the swaps a user with local copies makes: towers and encoders by path, the data by ``data.root``,
    a CPU trainer instead of GPUs, the small extractor where the Inception weights are not at hand.
    """
    overrides = [
        f"experiment={experiment}",
        f"paths.data_dir={data_dir}",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "callbacks.model_summary=null",
    ]
    if experiment == "clip_demo_concept":
        # its own dataset (shapes and hanoks), generated small into data_dir by the experiment's builder
        overrides.append("data.builders.dataset.num_samples=60")
    else:
        overrides.append(f"data.root={synthetic_dir}")
    if experiment not in (*THESIS_EXPERIMENTS, "clip_demo_concept"):
        # the demo's dataset builder finds the tests' dataset complete
        overrides.append(f"data.builders.dataset.num_samples={synthetic_samples(synthetic_dir)}")
    if experiment == "clip_webtoon":
        overrides += [
            "trainer=cpu",
            "trainer.devices=1",
            f"model.text_encoder.name_or_path={towers['bert']}",
            f"model.image_encoder.name_or_path={towers['vit']}",
            "data.batch_size=16",
        ]
    if experiment == "dcgan_webtoon":
        overrides += [
            "trainer=cpu",
            f"data.precompute_features.encoder.name_or_path={towers['bert']}",
            "data.precompute_features.encoder.device=cpu",
            "model.generator.text_dim=32",
            "callbacks.image_quality.feature_extractor={_target_: src.demo.feature_extractor.SmallFeatureExtractor}",
            "data.batch_size=16",
        ]
    if experiment.startswith("dcgan"):
        overrides += ["callbacks.sample_grid.num_per_caption=2"]
    if experiment.startswith("dcgan_demo"):
        overrides += [
            "callbacks.caption_following.num_per_caption=2",
            "callbacks.caption_following.num_shape_scenes=3",
            f"data.builders.shape_judge.out_dir={towers['shape_judge']}",
        ]
    return [*overrides, *extra]


def synthetic_samples(synthetic_dir: Path) -> int:
    import json

    return json.loads((synthetic_dir / "dataset.json").read_text())["num_samples"]


def tiny_clip_demo_overrides(synthetic_dir: Path, run_dir: Path) -> list[str]:
    """What the DCGAN demo passes to its on-demand CLIP training in tests: the same experiment, a few steps."""
    return [
        f"data.root={synthetic_dir}",
        f"data.builders.dataset.num_samples={synthetic_samples(synthetic_dir)}",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "report.untrained=false",
        "analyses=false",
        "callbacks.model_summary=null",
        "extras.print_config=false",
        f"hydra.run.dir={run_dir}",
    ]


def execute_notebook(name: str, run_dir: Path) -> None:
    """Run ``notebooks/<name>.ipynb`` as CI does, through nbmake, its ``run_dir`` parameter set by
    ``WEBTOON_LAB_RUN_DIR``; every cell must run."""
    import os
    import subprocess
    import sys

    notebook = ROOT / "notebooks" / f"{name}.ipynb"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbmake", "-p", "no:cacheprovider", "-q", str(notebook)],
        cwd=ROOT,
        env={**os.environ, "WEBTOON_LAB_RUN_DIR": str(run_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:]
