"""Validation prompts rendered while Stable Diffusion fine-tunes, as the diffusers training examples do with
``validation_prompt`` and ``validation_steps``, optionally judged by CLIP score.

Works with any Stable Diffusion LightningModule (one exposing ``diffusion_parts()``); images are drawn through the
project's loader (``src/pipelines/loading.py``: ``text_to_image_for``), on the module's current weights.
Every render uses the same seeded noise, so the grids of successive steps differ only by what training changed,
and column ``j`` of every row starts from the same latents.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from src.pipelines.loading import text_to_image_for
from src.utils.image_grid import captioned_grid, save_grid
from src.utils.run import output_root

__all__ = ["ValidationPromptGrid"]

JUDGE_SETTING = "callbacks.validation_prompts.judge"


class ValidationPromptGrid(Callback):
    """Every ``every_n_steps`` optimizer steps and at train end (rank 0), render ``prompts`` into
    ``{run dir}/{dirname}/step_{step:06d}.png`` (rows = prompts), log it to W&B, and with a ``judge`` (a CLIP
    hub id or local directory, see :func:`src.metrics.clip_score.load_clip_judge`) log ``val/clip_score``."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int,
        num_images_per_prompt: int = 2,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        judge: str | None = None,
        dirname: str = "validation",
        at_train_end: bool = True,
        cell_size: int = 256,
        first_step: int = 1,
    ) -> None:
        """``first_step``: no grid before this step (a model trained from scratch draws only once its
        autoencoder stage is over)."""
        super().__init__()
        if not prompts:
            raise ValueError("ValidationPromptGrid needs at least one prompt.")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.prompts = [str(p) for p in prompts]
        self.every_n_steps = every_n_steps
        self.num_images_per_prompt = num_images_per_prompt
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.judge_name = judge
        self.dirname = dirname
        self.at_train_end = at_train_end
        self.cell_size = cell_size
        self.first_step = max(1, first_step)
        self.judge = None
        self.paths: dict[int, Path] = {}
        self.clip_scores: dict[int, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Load the judge before training starts, so a missing one fails now and not after the first N steps.
        if stage == "fit" and trainer.is_global_zero and self.judge_name and self.judge is None:
            from src.metrics.clip_score import load_clip_judge

            self.judge = load_clip_judge(self.judge_name, setting=JUDGE_SETTING)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.validate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_train_end:
            self.validate(trainer, pl_module)

    def validate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Render, save, log and judge once per optimizer step (gradient accumulation repeats a step)."""
        step = trainer.global_step
        if not trainer.is_global_zero or step < self.first_step or step in self.paths:
            return
        images = self.render(pl_module)
        path = output_root(trainer) / self.dirname / f"step_{step:06d}.png"
        grid = captioned_grid([list(row) for row in images], self.prompts, cell_size=self.cell_size)
        self.paths[step] = save_grid(grid, path)
        metrics = {}
        if self.judge is not None:
            prompts = [p for p in self.prompts for _ in range(self.num_images_per_prompt)]
            scores = self.judge(images.flatten(0, 1).to(pl_module.device), prompts)  # on the module's device
            self.clip_scores[step] = float(scores.mean)
            self.judge.to("cpu")  # its GPU memory belongs to training until the next validation
            metrics["val/clip_score"] = self.clip_scores[step]
        # Straight to the loggers: Lightning forbids self.log in on_train_end, and from on_train_batch_end it
        # would drop values at steps that are not multiples of the trainer's log_every_n_steps.
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{self.dirname}/samples", images=[str(path)], step=step)

    def render(self, pl_module: LightningModule) -> torch.Tensor:
        """[prompts, num_images_per_prompt, 3, H, W] images in [0, 1] from the module's current weights, in eval
        mode without gradients; every submodule's train/eval mode is restored afterwards."""
        modes = {module: module.training for module in pl_module.modules()}
        try:
            pl_module.eval()
            # with the module's prompt aliases (e.g. textual inversion's `*` for its new token)
            text_to_image = text_to_image_for(
                pl_module, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale
            )
            images = text_to_image(self.prompts, self.num_images_per_prompt, self.seed)
        finally:
            for module, training in modes.items():
                module.train(training)
        return images
