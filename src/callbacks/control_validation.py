"""Validation images of a training ControlNet, each beside its control image, as diffusers' train_controlnet.py
renders ``validation_image`` + ``validation_prompt`` every ``validation_steps``.

The pairs are the user's files (control images, or photos turned into control images by a detector) or, when
none are given, the first pairs of the validation split. Every render uses the same seeded noise, so the grids
of successive steps differ only by what training changed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from src.data.controls import Detector
from src.pipelines.loading import diffusers_pipeline_for
from src.pipelines.text_to_image import cpu_generators
from src.utils.image_grid import captioned_grid, save_grid, to_pil
from src.utils.run import output_root

__all__ = ["ControlValidationGrid"]


class ControlValidationGrid(Callback):
    """Every ``every_n_steps`` optimizer steps and at train end (rank 0), draw each (control image, prompt) pair
    with the ControlNet into ``{run dir}/{dirname}/step_{step:06d}.png``: a row per pair, the control image
    first, then ``num_images_per_prompt`` images (image ``j`` from CPU noise ``seed + j``); logged to W&B."""

    def __init__(
        self,
        every_n_steps: int,
        control_images: Sequence[str | os.PathLike] | None = None,
        prompts: Sequence[str] | None = None,
        num_pairs: int = 4,
        detector: Detector | None = None,
        num_images_per_prompt: int = 4,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        conditioning_scale: float = 1.0,
        seed: int = 0,
        dirname: str = "validation",
        at_train_end: bool = True,
        cell_size: int = 256,
    ) -> None:
        """``control_images`` and ``prompts``: files and their prompts, one each per row (``detector`` turns the
        files into control images first; without it they are control images already). Unset: the first
        ``num_pairs`` control images and captions of the validation split."""
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(
                f"callbacks.control_validation.every_n_steps must be at least 1, got {every_n_steps}"
            )
        if (control_images is None) != (prompts is None) or len(control_images or ()) != len(prompts or ()):
            raise ValueError(
                "callbacks.control_validation: give control_images and prompts together, one prompt per image "
                f"(got {len(control_images or ())} images, {len(prompts or ())} prompts), or neither to take "
                "the validation split's."
            )
        missing = [str(path) for path in control_images or () if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"callbacks.control_validation.control_images: no such file {missing[0]}")
        self.every_n_steps = every_n_steps
        self.files = [Path(path) for path in control_images or ()]
        self.prompts = [str(prompt) for prompt in prompts or ()]
        self.num_pairs = num_pairs
        self.detector = detector
        self.num_images_per_prompt = num_images_per_prompt
        self.sampling = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "controlnet_conditioning_scale": conditioning_scale,
        }
        self.seed = seed
        self.dirname = dirname
        self.at_train_end = at_train_end
        self.cell_size = cell_size
        self.controls: list[Image.Image] = []
        self.paths: dict[int, Path] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.validate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_train_end:
            self.validate(trainer, pl_module)

    def validate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Render and save once per optimizer step (gradient accumulation repeats a step)."""
        step = trainer.global_step
        if not trainer.is_global_zero or step < 1 or step in self.paths:
            return
        if not self.controls:
            self.controls, self.prompts = self.pairs(trainer)
        images = self.render(pl_module)
        rows = [[control, *row] for control, row in zip(self.controls, images, strict=True)]
        titles = ["control", *(["with the ControlNet"] * self.num_images_per_prompt)]
        grid = captioned_grid(rows, self.prompts, column_titles=titles, cell_size=self.cell_size)
        path = save_grid(grid, output_root(trainer) / self.dirname / f"step_{step:06d}.png")
        self.paths[step] = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{self.dirname}/samples", images=[str(path)], step=step)

    def pairs(self, trainer: Trainer) -> tuple[list[Image.Image], list[str]]:
        """The control images and prompts of the rows: the files, or the validation split's first pairs."""
        if self.files:
            images = [Image.open(path).convert("RGB") for path in self.files]
            return [self.detector(image) if self.detector else image for image in images], list(self.prompts)
        controls, prompts = [], []
        for batch in trainer.datamodule.val_dataloader():
            controls += [to_pil(control) for control in batch["control"]]
            prompts += list(batch["captions"])
            if len(controls) >= self.num_pairs:
                break
        if not controls:
            raise ValueError(
                "callbacks.control_validation: the validation split is empty; give control_images and prompts."
            )
        return controls[: self.num_pairs], prompts[: self.num_pairs]

    @torch.no_grad()
    def render(self, pl_module: LightningModule) -> torch.Tensor:
        """[pairs, num_images_per_prompt, 3, H, W] in [0, 1] from the module's current weights, in eval mode;
        every submodule's train/eval mode is restored afterwards."""
        from diffusers import StableDiffusionControlNetPipeline

        modes = {module: module.training for module in pl_module.modules()}
        count = self.num_images_per_prompt
        try:
            pl_module.eval()
            diffusers_pipeline = diffusers_pipeline_for(pl_module, StableDiffusionControlNetPipeline)
            images = diffusers_pipeline(
                [prompt for prompt in self.prompts for _ in range(count)],
                image=[control for control in self.controls for _ in range(count)],
                generator=[g for _ in self.prompts for g in cpu_generators(self.seed, count)],
                output_type="pt",
                **self.sampling,
            ).images
        finally:
            for module, training in modes.items():
                module.train(training)
        return images.float().cpu().clamp(0, 1).unflatten(0, (len(self.prompts), count))
