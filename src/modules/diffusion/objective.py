"""The denoising objective shared by training from scratch and fine-tuning.

The target follows the scheduler's ``prediction_type`` (noise for SD 1.x, velocity for SD 2.x 768). Min-SNR-gamma
weighting (Hang et al. 2023) is optional: with the plain noise-prediction loss the low-noise timesteps, where the
prompt barely matters, carry most of the gradient; clamping their weight at ``snr_gamma`` moves it to the noisier
timesteps, where the model must decide what to draw.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["denoising_target", "per_example_loss"]


def denoising_target(noise_scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r} in the scheduler config")


def per_example_loss(
    prediction: Tensor,
    target: Tensor,
    noise_scheduler: Any,
    timesteps: Tensor,
    snr_gamma: float | None = None,
) -> Tensor:
    """Mean squared error per example, Min-SNR-weighted when ``snr_gamma`` is set."""
    losses = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return losses
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return losses * weights / (snr + 1)
    return losses * weights / snr
