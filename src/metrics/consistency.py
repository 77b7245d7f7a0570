"""How alike the panels of a story are: the mean cosine similarity over every pair of panel embeddings.

With CLIP image embeddings this is the literature's CLIP-I between panels (StoryDiffusion, ConsiStory), with
DINO embeddings its DINO score; higher means more consistent panels. Identical panels score 1.0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mean_pairwise_cosine"]


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """The mean of ``cos(e_i, e_j)`` over all pairs ``i < j`` of the rows of ``embeddings`` [N >= 2, D]."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(
            f"mean_pairwise_cosine needs a [N, D] matrix with N >= 2 panel embeddings, got shape "
            f"{tuple(embeddings.shape)}"
        )
    unit = F.normalize(embeddings.detach().double(), dim=-1)
    first, second = torch.triu_indices(len(unit), len(unit), offset=1, device=unit.device)
    return (unit[first] * unit[second]).sum(dim=-1).mean().item()
