"""Fine-tuning callbacks in a real Trainer: validation prompt grids judged by CLIP score, wall time and memory."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from test_clip_score import write_tiny_clip
from tiny_sd import build_tiny_stable_diffusion
from torch.utils.data import DataLoader

from src.callbacks.resource_monitor import ResourceMonitor
from src.callbacks.validation_prompts import ValidationPromptGrid
from src.metrics.clip_score import load_clip_judge
from src.utils.image_grid import captioned_grid

PROMPTS = ["a photo of the red house", "blue fire"]
CELL = 32


class TinyFineTune(L.LightningModule):
    """Trains one UNet bias (so images change with training) and keeps the frozen VAE in eval mode, as a
    fine-tuning module does; it exposes its current parts as ``diffusion_parts()``."""

    def __init__(self, sd_dir: Path) -> None:
        super().__init__()
        from diffusers import StableDiffusionPipeline

        loaded = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
        self.unet, self.vae, self.text_encoder = loaded.unet, loaded.vae, loaded.text_encoder
        self.tokenizer, self.scheduler = loaded.tokenizer, loaded.scheduler
        self.requires_grad_(False)
        self.unet.conv_out.bias.requires_grad_(True)
        self.train()  # from_pretrained loads in eval mode
        self.vae.eval()
        self.modes: list[tuple[bool, bool]] = []

    def training_step(self, batch, batch_idx):
        self.modes.append((self.unet.training, self.vae.training))
        return (self.unet.conv_out.bias - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.unet.conv_out.bias], lr=0.3)

    def train_dataloader(self):
        return DataLoader(torch.zeros(16, 1), batch_size=1)

    def diffusion_parts(self):
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "scheduler": self.scheduler,
        }


def csv_metrics(trainer: L.Trainer, name: str) -> dict[int, float]:
    """{step: value} of one metric in the CSV logger's metrics.csv."""
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(f) if row.get(name)}


def fit(module: L.LightningModule, callbacks: list, root: Path, max_steps: int = 5) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        log_every_n_steps=2,
        default_root_dir=root,
        logger=CSVLogger(root),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return trainer


def test_validation_grids_every_n_steps_and_at_end_with_clip_score(tmp_path):
    module = TinyFineTune(build_tiny_stable_diffusion(tmp_path / "sd"))
    judge_dir = write_tiny_clip(tmp_path / "clip")
    grid = ValidationPromptGrid(
        PROMPTS, every_n_steps=2, num_inference_steps=1, judge=str(judge_dir), cell_size=CELL
    )
    trainer = fit(module, [grid], tmp_path / "run")

    assert sorted(grid.paths) == [2, 4, 5]
    for step, path in grid.paths.items():
        assert path == Path(trainer.log_dir) / "validation" / f"step_{step:06d}.png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (260 + 2 * (CELL + 4) + 4, 2 * (CELL + 4) + 4)  # 2 prompts x 2 samples
    # rendering leaves every module in the mode training had set: the frozen VAE stays in eval
    assert module.modes == [(True, False)] * 5
    assert module.training and module.unet.training and not module.vae.training

    # the same seed and unchanged weights give the same images: the final grid shows exactly a new render
    images = grid.render(module)
    assert images.shape == (2, 2, 3, 32, 32)
    expected = captioned_grid([list(row) for row in images], PROMPTS, cell_size=CELL)
    assert np.array_equal(np.asarray(Image.open(grid.paths[5])), np.asarray(expected))
    # training changed the UNet between validations, so its grids differ
    assert not np.array_equal(np.asarray(Image.open(grid.paths[2])), np.asarray(Image.open(grid.paths[4])))

    repeated = [p for p in PROMPTS for _ in range(2)]
    judged = load_clip_judge(str(judge_dir))(images.flatten(0, 1), repeated)
    assert grid.clip_scores[5] == pytest.approx(float(judged.mean), abs=1e-5)
    logged = csv_metrics(trainer, "val/clip_score")
    assert logged == pytest.approx(grid.clip_scores)
    assert all(0 <= score <= 100 for score in logged.values())


class ClockedSteps(L.LightningModule):
    """Step ``n`` takes ``n`` seconds on a fake clock, so timings are known exactly."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock[0] += self.global_step + 1
        return (self.weight - batch).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.ones(16, 1), batch_size=1)


def test_missing_judge_fails_before_training(tmp_path):
    grid = ValidationPromptGrid(PROMPTS, every_n_steps=2, judge=str(tmp_path / "no-clip"))
    clock = [0.0]
    with pytest.raises(RuntimeError, match="callbacks.validation_prompts.judge"):
        fit(ClockedSteps(clock), [grid], tmp_path / "run")
    assert clock == [0.0]  # not a single training step


def test_resource_monitor_logs_time_and_peak_memory(tmp_path, monkeypatch):
    import resource

    clock = [100.0]
    monkeypatch.setattr("src.callbacks.resource_monitor.perf_counter", lambda: clock[0])
    monitor = ResourceMonitor()
    trainer = fit(ClockedSteps(clock), [monitor], tmp_path)

    # steps 1+2, 3+4 (every log_every_n_steps=2) and the last step alone, averaged per window
    assert csv_metrics(trainer, "train/step_time_s") == {2: 1.5, 4: 3.5, 5: 5.0}
    assert csv_metrics(trainer, "train/time_s") == {5: 15.0}
    assert monitor.time_s == 15.0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert 0 < monitor.peak_memory_mb <= peak_kib / 1024
    assert csv_metrics(trainer, "train/peak_memory_mb")[5] == pytest.approx(monitor.peak_memory_mb)


def test_finetune_callbacks_compose_and_instantiate(tmp_path):
    from hydra_runs import compose_config
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from src.callbacks.step_checkpoint import StepCheckpoint
    from src.utils.run import instantiate_callbacks
    from src.utils.seeding import StepSeeds

    cfg = compose_config("train.yaml", ["callbacks=finetune"], tmp_path)
    callbacks = {type(c): c for c in instantiate_callbacks(cfg)}

    assert set(callbacks) == {
        ModelCheckpoint,
        StepCheckpoint,
        LearningRateMonitor,
        ValidationPromptGrid,
        ResourceMonitor,
        StepSeeds,  # every preset: a step's draws follow from the run's seed and the step
    }
    assert callbacks[StepSeeds].seed == cfg.seed
    assert callbacks[StepCheckpoint].every_n_train_steps == 0  # off unless asked for
    checkpoint = callbacks[ModelCheckpoint]
    assert checkpoint.monitor is None and checkpoint.save_last and checkpoint._every_n_train_steps == 500
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert callbacks[ValidationPromptGrid].prompts == ["a photo of *"]
    assert callbacks[ValidationPromptGrid].judge_name is None
