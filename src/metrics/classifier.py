"""Judging generated images with an image classifier: which of its labels each image shows.

CLIP judges by similarity to text, and on small or unusual pictures that can rank colours rather than objects.
A classifier trained on real pictures of the labels (any ``AutoModelForImageClassification`` directory with its
image processor, e.g. the shape judge of the offline demo, ``src/demo/shape_judge.py``) gives the rate at which
images show a label, beside the same rate on real pictures as its ceiling. Images go through the processor's
resize and normalisation as tensors, so a batch of generated images is judged without a round trip through PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from src.utils.hub import from_pretrained

__all__ = ["ImageClassifierJudge", "load_classifier_judge"]


class ImageClassifierJudge:
    """Labels and label probabilities of images [N, 3, H, W] in [0, 1], at any resolution."""

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "",
    ) -> None:
        self.model = model.eval()
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.input_size = tuple(input_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.name = name

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resized (bilinear, antialiased, as PIL resizes) and normalised as the processor does."""
        images = images.float()
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", antialias=True)
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return torch.cat(
                [
                    self.model(pixel_values=self.preprocess(chunk.to(device))).logits.float().cpu()
                    for chunk in images.split(batch_size)
                ]
            )

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[N, num_labels] softmax over every label the classifier knows."""
        return self.logits(images).softmax(dim=-1)

    def predict(self, images: torch.Tensor, among: Sequence[str] | None = None) -> list[str]:
        """Each image's most likely label, among ``among`` only when given (e.g. the labels a prompt could
        name, so that chance is 1 / len(among))."""
        logits = self.logits(images)
        candidates = list(among) if among is not None else self.labels
        unknown = [label for label in candidates if label not in self.labels]
        if unknown:
            raise ValueError(
                f"{self.name or 'the classifier'} knows no label {unknown}; it knows {self.labels}"
            )
        columns = torch.tensor([self.labels.index(label) for label in candidates])
        return [candidates[i] for i in logits[:, columns].argmax(dim=1).tolist()]

    def rate(self, images: torch.Tensor, label: str) -> float:
        """The share of images whose most likely label (among all) is ``label``."""
        return sum(found == label for found in self.predict(images)) / len(images)

    def to(self, device: torch.device | str) -> ImageClassifierJudge:
        self.model.to(device)
        return self


def load_classifier_judge(name_or_path: str, setting: str = "judge") -> ImageClassifierJudge:
    """A judge from a hub id or local directory holding an image classifier and its image processor;
    ``setting`` is the config key named in the error when it cannot be loaded."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    name_or_path = str(name_or_path)
    model = from_pretrained(AutoModelForImageClassification.from_pretrained, name_or_path, setting)
    processor = from_pretrained(AutoImageProcessor.from_pretrained, name_or_path, setting)
    size = processor.size
    input_size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    return ImageClassifierJudge(
        model, input_size, processor.image_mean, processor.image_std, name=name_or_path
    )
