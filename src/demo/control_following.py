"""Does a ControlNet make the model draw its control image? Judged on held-out generated scenes by pixels.

For scenes of the test split, the model draws each caption with the scene's control image (Canny edges of the
real drawing) and, from the same noise, without it: the same pipeline at conditioning scale 0, which adds
nothing to the UNet, i.e. the base model alone. Shape is judged by edge agreement: the F1 of the output's Canny
edges against the control's, a pixel matching when the other map has an edge within ``tolerance`` pixels
(precision: output edges near a control edge; recall: control edges near an output edge). Colour by the pixel
judge of the shapes dataset (``synthetic.dominant_colour``, chance 1/8). The real drawings passed through the
model's VAE are judged alike: what a perfect UNet could reach through that decoder.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from PIL import Image

from src.data.controls import Detector
from src.demo.edges import edge_scene, to_tensor
from src.demo.synthetic import COLOURS, dominant_colour
from src.pipelines.loading import diffusers_pipeline_for
from src.pipelines.text_to_image import cpu_generators
from src.utils.image_grid import captioned_grid, save_grid, to_pil
from src.utils.run import output_root

__all__ = ["ControlFollowing", "edge_f1"]


def edge_f1(predicted: np.ndarray, target: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two boolean edge maps [H, W]: a pixel of one matches when the other has an edge within
    ``tolerance`` pixels (chessboard distance). Two empty maps agree (1.0); one empty map gets 0."""
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    if not predicted.any() and not target.any():
        return 1.0
    if not predicted.any() or not target.any():
        return 0.0
    precision = (predicted & dilated(target, tolerance)).sum() / predicted.sum()
    recall = (target & dilated(predicted, tolerance)).sum() / target.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def dilated(edges: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within ``radius`` (chessboard distance) of an edge pixel."""
    height, width = edges.shape
    padded = np.pad(edges, radius)
    out = np.zeros_like(edges)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


class ControlFollowing(L.Callback):
    """At test end: ``test/edge_f1`` and ``test/colour_match`` with the ControlNet, ``test/edge_f1_without`` and
    ``test/colour_match_without`` without it, and ``{filename}`` in the run directory (control | with | without
    for the first ``grid_rows`` scenes, captions beside)."""

    def __init__(
        self,
        detector: Detector,
        num_scenes: int = 48,
        image_size: int = 32,
        split: str = "test",
        dataset_seed: int = 0,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        tolerance: int = 1,
        batch_size: int = 64,
        grid_rows: int = 8,
        filename: str = "control_following.png",
    ) -> None:
        """``split`` / ``dataset_seed``: which scenes (the data's held-out split, drawn as the data draws them);
        ``seed``: the noise, the same with and without the ControlNet."""
        super().__init__()
        if num_scenes < 1:
            raise ValueError(f"callbacks.control_following.num_scenes must be positive, got {num_scenes}")
        self.detector = detector
        self.scenes = [
            edge_scene(split, index, image_size, detector, dataset_seed) for index in range(num_scenes)
        ]
        self.sampling = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        self.seed = seed
        self.tolerance = tolerance
        self.batch_size = batch_size
        self.grid_rows = grid_rows
        self.filename = filename
        self.through_vae: dict[str, float] = {}

    def measure(self, images: torch.Tensor) -> dict[str, float]:
        """Edge F1 against each scene's control and colour match of images [N, 3, H, W] in [0, 1]."""
        pictures = [to_pil(image) for image in images]
        f1 = [
            edge_f1(edges(self.detector(picture)), edges(drawn.control), self.tolerance)
            for picture, drawn in zip(pictures, self.scenes, strict=True)
        ]
        colours = [
            dominant_colour(p) == drawn.scene.colour for p, drawn in zip(pictures, self.scenes, strict=True)
        ]
        return {"edge_f1": float(np.mean(f1)), "colour_match": float(np.mean(colours))}

    @torch.no_grad()
    def draw(self, pl_module: L.LightningModule, conditioning_scale: float) -> torch.Tensor:
        """Each scene's caption drawn with its control image at ``conditioning_scale``: [N, 3, H, W] in [0, 1]."""
        from diffusers import StableDiffusionControlNetPipeline

        diffusers_pipeline = diffusers_pipeline_for(pl_module, StableDiffusionControlNetPipeline)
        images = []
        for start in range(0, len(self.scenes), self.batch_size):
            scenes = self.scenes[start : start + self.batch_size]
            images.append(
                diffusers_pipeline(
                    [drawn.caption for drawn in scenes],
                    image=[drawn.control for drawn in scenes],
                    generator=[cpu_generators(self.seed, 1)[0] for _ in scenes],
                    controlnet_conditioning_scale=conditioning_scale,
                    output_type="pt",
                    **self.sampling,
                )
                .images.float()
                .cpu()
                .clamp(0, 1)
            )
        return torch.cat(images)

    @torch.no_grad()
    def reconstruct(self, pl_module: L.LightningModule) -> torch.Tensor:
        """The real drawings encoded and decoded by the model's VAE."""
        vae = pl_module.vae
        pixels = torch.stack([to_tensor(drawn.image) for drawn in self.scenes]) * 2 - 1
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        return ((vae.decode(latents).sample.float().cpu() + 1) / 2).clamp(0, 1)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with_control, without = self.draw(pl_module, 1.0), self.draw(pl_module, 0.0)
        measured = {
            **self.measure(with_control),
            **{f"{k}_without": v for k, v in self.measure(without).items()},
        }
        for name, value in measured.items():
            pl_module.log(f"test/{name}", value)
        self.through_vae = {
            f"test/{name}": value for name, value in self.measure(self.reconstruct(pl_module)).items()
        }
        if trainer.is_global_zero:
            rows = [
                [drawn.control, image, base]
                for drawn, image, base in zip(
                    self.scenes[: self.grid_rows], with_control, without, strict=False
                )
            ]
            grid = captioned_grid(
                rows,
                [drawn.caption for drawn in self.scenes[: len(rows)]],
                column_titles=["control (Canny)", "with the ControlNet", "without (the base)"],
                cell_size=96,
            )
            save_grid(grid, output_root(trainer) / self.filename)

    def references(self, stage: str = "test") -> dict[str, dict[str, float]]:
        if stage != "test" or not self.through_vae:
            return {}
        return {
            "chance": {"test/colour_match": 1 / len(COLOURS)},
            "real drawings through the VAE": dict(self.through_vae),
        }

    def report_notes(self) -> list[str]:
        return [
            f"{len(self.scenes)} held-out scenes, one image each, the same noise with and without the ControlNet "
            f"('_without': conditioning scale 0, the base model alone). Edge F1: the output's Canny edges against "
            f"the control's, matched within {self.tolerance} px; colour by pixels."
        ]


def edges(control: Image.Image) -> np.ndarray:
    """A control image (edges white on black) as a boolean map [H, W]."""
    return np.asarray(control.convert("L")) > 127
