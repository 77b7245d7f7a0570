"""Control images from photos: the detectors users of ControlNet know (``controlnet_aux``, an optional extra).

- ``canny``: edges (OpenCV's Canny at the photo's own resolution, as controlnet_aux's ``CannyDetector`` runs it
  but without its resizing to multiples of 64, which small images do not survive; no weights);
- ``openpose``: body, hand and face keypoints (``OpenposeDetector``: ``body_pose_model.pth``,
  ``hand_pose_model.pth``, ``facenet.pth``);
- ``mlsd``: straight lines (``MLSDdetector``: ``mlsd_large_512_fp32.pth``);
- ``midas``: depth (``MidasDetector``: ``dpt_hybrid-midas-501f0c75.pt``);
- ``depth``: depth from a transformers depth estimator (``AutoModelForDepthEstimation``, e.g.
  ``Intel/dpt-hybrid-midas`` or the ``depth_estimator/`` of a depth-to-image directory).

Weights load by hub id (``lllyasviel/Annotators``) or from a local directory holding the same files; a missing
one fails with one message naming the file and the setting that points elsewhere. Every detector returns an RGB
control image of the photo's size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from src.data.controls import CannyDetector, Detector
from src.utils.hub import MissingWeightsError, missing_weights

__all__ = ["DETECTORS", "WEIGHT_FILES", "load_detector"]

DETECTORS = ("canny", "openpose", "mlsd", "midas", "depth")
ANNOTATORS = "lllyasviel/Annotators"
WEIGHT_FILES = {
    "openpose": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
    "mlsd": ("mlsd_large_512_fp32.pth",),
    "midas": ("dpt_hybrid-midas-501f0c75.pt",),
}


def load_detector(
    name: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    setting: str = "detector_weights",
    **options: Any,
) -> Detector:
    """``detector(photo) -> control image`` (RGB, the photo's size). ``options`` go to the detector's call
    (e.g. ``low_threshold`` / ``high_threshold`` for Canny, ``thr_v`` / ``thr_d`` for MLSD)."""
    if name not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {name!r}")
    if name == "depth":
        return _depth_estimator(weights or "Intel/dpt-hybrid-midas", device, setting)
    if name == "canny":
        return CannyDetector(**options)  # the detector ControlNet training's data stage runs
    try:
        model = _annotator(name, str(weights or ANNOTATORS), setting).to(device)
    except ImportError as error:
        raise ImportError(
            f"detector={name} needs controlnet_aux: pip install -e '.[controlnet]' ({error})"
        ) from error

    def detect(photo: Image.Image) -> Image.Image:
        # controlnet_aux works on sides that are multiples of 64; the control comes back at the photo's size
        side = max(64, round(min(photo.size) / 64) * 64)
        control = model(photo, detect_resolution=side, image_resolution=side, output_type="pil", **options)
        return control.convert("RGB").resize(photo.size, Image.Resampling.BILINEAR)

    return detect


def _annotator(name: str, weights: str, setting: str) -> Any:
    """An annotator of controlnet_aux from the hub or a local directory; a missing file is named."""
    if name == "openpose":
        from controlnet_aux.open_pose import OpenposeDetector as annotator
    elif name == "mlsd":
        from controlnet_aux.mlsd import MLSDdetector as annotator
    else:
        from controlnet_aux.midas import MidasDetector as annotator
    if Path(weights).is_dir():
        missing = [file for file in WEIGHT_FILES[name] if not (Path(weights) / file).is_file()]
        if missing:
            raise MissingWeightsError(
                f"Cannot load the {name} detector: {Path(weights) / missing[0]} is missing (the files of "
                f"{ANNOTATORS}: {', '.join(WEIGHT_FILES[name])}); download them or set `{setting}` to a "
                "directory that holds them."
            )
    try:
        return annotator.from_pretrained(weights)
    except (OSError, ValueError) as error:
        raise missing_weights(weights, setting, error) from error


def _depth_estimator(name_or_path: str | os.PathLike, device: str | torch.device, setting: str) -> Detector:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from src.utils.hub import from_pretrained

    model_source = processor_source = str(name_or_path)
    if (Path(name_or_path) / "model_index.json").is_file():  # a depth-to-image directory: its own estimator
        model_source = str(Path(name_or_path) / "depth_estimator")
        processor_source = str(Path(name_or_path) / "feature_extractor")
    processor = from_pretrained(AutoImageProcessor.from_pretrained, processor_source, setting)
    model = from_pretrained(AutoModelForDepthEstimation.from_pretrained, model_source, setting)
    model = model.to(device).eval()

    @torch.no_grad()
    def detect(photo: Image.Image) -> Image.Image:
        inputs = processor(images=photo, return_tensors="pt").to(model.device)
        depth = model(**inputs).predicted_depth[:, None].float()
        depth = torch.nn.functional.interpolate(depth, size=photo.size[::-1], mode="bicubic")[0, 0]
        depth = (depth - depth.min()) / (depth.max() - depth.min()).clamp(min=1e-6)
        gray = (depth.cpu().numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")

    return detect
