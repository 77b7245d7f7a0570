"""Feature extractors and FID / IS statistics for generated images (thesis: IS 4.992, FID 22.212 on the test split).

An extractor maps uint8 images in [0, 255] or float images in [0, 1], any size (it resizes itself), to
``(features [N, num_features], logits [N, num_classes])``. The library's one is torch-fidelity's
``FeatureExtractorInceptionV3`` (2048-d pool features for FID, 1008 ``logits_unbiased`` for IS, TensorFlow-
compatible resize), the network behind published FID / IS numbers; its weights file is never downloaded behind
your back: give ``weights_path`` or ``download=True``. Any module with that interface can stand in for it
(the offline demo passes a small one), but its numbers then compare only with themselves.

The statistics are torchmetrics' ``FrechetInceptionDistance`` and ``InceptionScore`` (state handling, float64
covariances, DDP sync); :class:`ImageQuality` runs the extractor once per image and feeds both.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities.data import dim_zero_cat

from src.utils.hub import MissingWeightsError

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureOutput",
    "ImageQuality",
    "InceptionFeatureExtractor",
    "MissingInceptionWeightsError",
    "SeededInceptionScore",
    "build_inception",
    "images_to_uint8",
]

# The file torch-fidelity (and torchmetrics' default FID) loads: TF FID Inception converted to PyTorch.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
)
_INCEPTION_HASH_PREFIX = "6726825d"


class MissingInceptionWeightsError(MissingWeightsError):
    """The FID/IS Inception weights file is neither given, cached, nor downloadable."""


def images_to_uint8(images: Tensor) -> Tensor:
    """uint8 images unchanged; float images in [0, 1] rounded to uint8 [0, 255] (values outside are clamped)."""
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


class InceptionFeatureExtractor(nn.Module):
    """torch-fidelity's FID Inception v3 from a local weights file: 2048-d features and 1008 unbiased logits."""

    num_features = 2048
    num_classes = 1008

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # A path is always passed, so torch-fidelity never reaches for the network.
        self.net = FeatureExtractorInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights_path),
        )

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Always in evaluation mode (batch-norm statistics are part of the reference network)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net(images_to_uint8(images))
        return features, logits


def _missing_inception_weights(reason: str, setting: str) -> MissingInceptionWeightsError:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return MissingInceptionWeightsError(
        f"FID/IS with the Inception extractor needs the weights file `{INCEPTION_WEIGHTS_FILE}` ({reason}). "
        f"Download it once from {INCEPTION_WEIGHTS_URL} and set "
        f"`{setting}.weights_path=/path/to/{INCEPTION_WEIGHTS_FILE}`, or put it at {cache}, "
        f"or set `{setting}.download=true` on a machine with network."
    )


def _resolve_inception_weights(weights_path: str | os.PathLike | None, download: bool, setting: str) -> Path:
    """A local weights file: the given one, torch.hub's cached copy, or a fresh download when allowed."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise _missing_inception_weights(f"'{path}' does not exist", setting)
        return path
    # Same place torch-fidelity's own download would put it, so an earlier download is reused.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if not download:
        raise _missing_inception_weights("no weights_path given, none cached, downloading is off", setting)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), hash_prefix=_INCEPTION_HASH_PREFIX)
    except Exception as error:  # URLError, timeouts, hash mismatch: all mean "no usable weights"
        raise _missing_inception_weights(
            f"download failed: {type(error).__name__}: {error}", setting
        ) from error
    return cached


def build_inception(
    weights_path: str | os.PathLike | None = None,
    download: bool = False,
    setting: str = "callbacks.image_quality",
) -> InceptionFeatureExtractor:
    """The FID Inception; a missing or wrong weights file raises one error naming ``{setting}.weights_path``."""
    path = _resolve_inception_weights(weights_path, download, setting)
    try:
        return InceptionFeatureExtractor(path)
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as error:
        raise _missing_inception_weights(
            f"'{path}' is not the torch-fidelity Inception state dict ({type(error).__name__})", setting
        ) from error


class FeatureOutput(nn.Module):
    """One output of an extractor (``"features"`` or ``"logits"``), to pass as torchmetrics' ``feature=`` module."""

    def __init__(self, extractor: nn.Module, output: Literal["features", "logits"] = "features") -> None:
        super().__init__()
        self.extractor = extractor
        self.index = {"features": 0, "logits": 1}[output]
        self.num_features = extractor.num_features if self.index == 0 else extractor.num_classes

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor(images)[self.index]


class _Precomputed(nn.Module):
    """Identity "feature network": the metric receives features that were already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class SeededInceptionScore(InceptionScore):
    """torchmetrics' IS with a seeded split permutation (same value on every rank and run) and clipped splits."""

    def __init__(self, feature: nn.Module, splits: int = 10, seed: int = 0, **kwargs) -> None:
        with warnings.catch_warnings():
            # The "features are kept in memory" warning is expected here; the callback caps the sample count.
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            super().__init__(feature=feature, splits=splits, **kwargs)
        self.seed = seed

    def compute(self) -> tuple[Tensor, Tensor]:
        """Mean and std of exp(E KL(p(y|x) || p(y))) over at most ``splits`` splits of >= 2 images each."""
        logits = dim_zero_cat(self.features)
        count = logits.shape[0]
        if count < 2:
            raise RuntimeError(f"Inception score needs at least 2 generated images, got {count}.")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed))
        logits = logits[order.to(logits.device)].double()
        splits = max(1, min(self.splits, count // 2))
        scores = []
        for part in torch.tensor_split(logits, splits):
            log_prob = part.log_softmax(dim=1)
            log_marginal = log_prob.exp().mean(dim=0, keepdim=True).log()
            scores.append((log_prob.exp() * (log_prob - log_marginal)).sum(dim=1).mean().exp())
        scores = torch.stack(scores)
        std = scores.std() if splits > 1 else torch.zeros_like(scores[0])
        return scores.mean().float(), std.float()


class ImageQuality(nn.Module):
    """FID (real vs fake) and IS (fake) with one extractor pass per image; move it with ``.to(device)``."""

    def __init__(
        self, extractor: nn.Module, splits: int = 10, seed: int = 0, cache_real: bool = False
    ) -> None:
        super().__init__()
        self.extractor = extractor
        # The metrics get already-extracted features, so a fake image is not run through Inception twice.
        self.fid = FrechetInceptionDistance(
            feature=_Precomputed(extractor.num_features), reset_real_features=not cache_real
        )
        self.inception_score = SeededInceptionScore(
            _Precomputed(extractor.num_classes), splits=splits, seed=seed
        )
        self.cache_real = cache_real

    @property
    def has_real(self) -> bool:
        """Whether real statistics are present (with ``cache_real`` they survive :meth:`reset`)."""
        return bool(self.fid.real_features_num_samples > 0)

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add uint8 [0, 255] or float [0, 1] images [B, 3, H, W] to the real or the fake side."""
        features, logits = self.extractor(images)
        self.fid.update(features, real=real)
        if not real:
            self.inception_score.update(logits)

    def compute(self) -> dict[str, Tensor]:
        """``{"fid", "is", "is_std"}``, synchronised across processes when running distributed."""
        inception_score, inception_score_std = self.inception_score.compute()
        return {"fid": self.fid.compute(), "is": inception_score, "is_std": inception_score_std}

    def reset(self) -> None:
        self.fid.reset()
        self.inception_score.reset()
