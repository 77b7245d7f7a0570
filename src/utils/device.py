"""The one place that decides which device "auto" means."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) is CUDA when a GPU is visible, else the CPU; anything else is taken as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def half_precision_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA, where it halves memory and time; float32 elsewhere (CPUs lack fast half kernels)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
