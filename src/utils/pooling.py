"""Pooling a sequence of hidden states into one vector."""

from __future__ import annotations

import torch


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` [B, L, D] over the positions where ``attention_mask`` [B, L] is 1 (all when None)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
