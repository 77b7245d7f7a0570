"""CLIP score of generated images against their prompts, judged by any CLIP-like model we can load.

The score is torchmetrics' CLIP score: ``max(100 * cos(E_image, E_prompt), 0)`` per pair, averaged over the
pairs. torchmetrics computes the cosines (its ``_clip_score_update``); this module only loads the judge, which
torchmetrics cannot: its ``CLIPScore`` takes a few hub names or a callable, and with transformers 5 a CLIP
model's ``get_*_features`` return model outputs where torchmetrics expects tensors. Judges here are a hub id,
a local ``CLIPModel`` directory, or the project's bilingual CLIP export (a ``VisionTextDualEncoderModel``
directory, see ``src/modules/dual_encoder.py``), so Korean prompts can be judged too.

The floor acts on each pair, as torchmetrics' formula (and Hessel et al., 2021) defines it; torchmetrics
1.9's ``compute`` floors only the mean. The two agree unless some pair has a negative cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from src.utils.hub import from_pretrained

__all__ = ["CLIPJudge", "ClipScores", "load_clip_judge"]


class ClipScores(NamedTuple):
    """The mean CLIP score and the score of each (image, prompt) pair, both in [0, 100]."""

    mean: torch.Tensor
    per_pair: torch.Tensor


class CLIPJudge:
    """Scores images against one prompt each with a CLIP-like model and its processor."""

    def __init__(self, model: nn.Module, processor: Any, name: str = "") -> None:
        self.name = name
        self.model = _ProjectedFeatures(model.eval())
        self.processor = _TruncatingProcessor(processor, _max_text_length(model, processor))

    def __call__(
        self, images: torch.Tensor | Sequence[torch.Tensor | Image.Image], prompts: Sequence[str]
    ) -> ClipScores:
        """Images are uint8 tensors in [0, 255], float tensors in [0, 1] ([N, 3, H, W] or a list of
        [3, H, W]) or PIL images; ``prompts[i]`` describes image ``i``."""
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        with torch.no_grad():
            scores, _ = _clip_score_update(_as_uint8(images), list(prompts), self.model, self.processor)
        per_pair = scores.clamp(min=0)
        return ClipScores(per_pair.mean(), per_pair)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor | Sequence[torch.Tensor | Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (CLIP-I compares these between images)."""
        inputs = self.processor(images=_as_uint8(images), return_tensors="pt")
        device = next(self.model.parameters()).device
        features = self.model.get_image_features(inputs["pixel_values"].to(device))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]."""
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        features = self.model.get_text_features(
            inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
        )
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def classify(
        self,
        images: torch.Tensor | Sequence[torch.Tensor | Image.Image],
        labels: Sequence[str],
        template: str = "{}",
    ) -> torch.Tensor:
        """Zero-shot: the index into ``labels`` whose ``template``-filled prompt is nearest each image."""
        prompts = [template.format(label) for label in labels]
        return (self.image_embeddings(images) @ self.text_embeddings(prompts).T).argmax(dim=1).cpu()

    def to(self, device: torch.device | str) -> CLIPJudge:
        self.model.to(device)
        return self


def load_clip_judge(name_or_path: str, setting: str = "judge") -> CLIPJudge:
    """A judge from a hub id or local directory holding a ``CLIPModel`` or a ``VisionTextDualEncoderModel``
    with its processor; ``setting`` is the config key named in the error when the judge cannot be loaded."""
    from transformers import AutoConfig, AutoProcessor, CLIPModel, VisionTextDualEncoderModel

    loaders = {"clip": CLIPModel, "vision-text-dual-encoder": VisionTextDualEncoderModel}
    name_or_path = str(name_or_path)
    config = from_pretrained(AutoConfig.from_pretrained, name_or_path, setting)
    if config.model_type not in loaders:
        raise ValueError(
            f"`{setting}={name_or_path}` is a '{config.model_type}' model; a CLIP-score judge is a CLIPModel "
            f"or VisionTextDualEncoderModel directory (model_type {' or '.join(map(repr, loaders))})."
        )
    model = from_pretrained(loaders[config.model_type].from_pretrained, name_or_path, setting)
    processor = from_pretrained(AutoProcessor.from_pretrained, name_or_path, setting)
    return CLIPJudge(model, processor, name=name_or_path)


class _ProjectedFeatures(nn.Module):
    """The model as torchmetrics calls it: ``get_image_features``/``get_text_features`` returning the projected
    embeddings as tensors (transformers 5 returns them as ``pooler_output`` of a model output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _TruncatingProcessor:
    """The processor with prompts truncated by the tokenizer, which keeps the end-of-text token that CLIP
    pools (torchmetrics would otherwise cut the token ids itself and drop it)."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, *args, text=None, **kwargs):
        if text is not None:
            kwargs = {"truncation": True, "max_length": self.max_length, **kwargs}
        return self.processor(*args, text=text, **kwargs)


def _max_text_length(model: nn.Module, processor: Any) -> int:
    """The shorter of what the tokenizer and the text tower's position embeddings allow."""
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    tokenizer_limit = getattr(getattr(processor, "tokenizer", None), "model_max_length", None)
    return min(limit for limit in (positions, tokenizer_limit, 10**6) if limit)


def _as_uint8(images: torch.Tensor | Sequence[torch.Tensor | Image.Image]) -> list[torch.Tensor]:
    """[3, H, W] uint8 tensors: the processors rescale by 1/255, so float images in [0, 1] are quantised as
    they would be when saved to PNG."""
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = [images]
    converted = []
    for image in images:
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        elif image.dtype != torch.uint8:
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        converted.append(image)
    return converted
