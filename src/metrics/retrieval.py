"""Chunked bidirectional retrieval metrics for galleries where an image has several captions.

Written by hand because torchmetrics' retrieval metrics need the flattened query × gallery score matrix in
memory (125M entries for 25k captions × 5k images) and open_clip's evaluation assumes one caption per image.
Here queries are scored ``chunk_size`` at a time, so memory is O(chunk_size × gallery), and only one integer
rank per query is kept.

Conventions (shared by every function below):

- Scores are dot products of the given embeddings (pass L2-normalised embeddings for cosine similarity);
  they are computed in float32 whatever the input dtype, on the device of the inputs.
- Ranks are 1-based. A query's rank is the rank of its best-scoring relevant gallery item, and ties are
  broken optimistically: ``rank = 1 + number of irrelevant gallery items scoring strictly higher``. Other
  relevant items never push it down, so an image whose captions score 0.9 and 0.8 has rank 1 if no other
  caption scores above 0.9.
- Text→image: each caption's only relevant image is ``caption_to_image[caption]``.
  Image→text: an image's relevant captions are all captions mapped to it; images without any caption have
  no defined rank (:func:`image_to_text_ranks` reports 0) and are excluded from the image→text metrics.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "NO_RELEVANT_ITEM",
    "image_to_text_ranks",
    "rank_metrics",
    "retrieval_metrics",
    "random_ranking_metrics",
    "retrieval_ranks",
    "text_to_image_ranks",
]

# Rank reported for a query with no relevant gallery item; never a valid 1-based rank.
NO_RELEVANT_ITEM = 0


@torch.no_grad()
def retrieval_ranks(
    query_embeds: Tensor,
    gallery_embeds: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    chunk_size: int = 1024,
) -> Tensor:
    """1-based rank of each query's best-scoring relevant gallery item (relevant = same label), optimistic on ties.

    Returns a LongTensor[Q] on the queries' device; queries without a relevant item get ``NO_RELEVANT_ITEM``.
    """
    _check_embeds(query_embeds, gallery_embeds)
    if query_labels.shape != (query_embeds.shape[0],) or gallery_labels.shape != (gallery_embeds.shape[0],):
        raise ValueError(
            f"labels must be 1-D and match the embeddings: got query_labels {tuple(query_labels.shape)} for "
            f"{query_embeds.shape[0]} queries, gallery_labels {tuple(gallery_labels.shape)} for "
            f"{gallery_embeds.shape[0]} gallery items"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    device = query_embeds.device
    # The gallery is converted once; only query chunks are converted inside the loop.
    gallery = gallery_embeds.to(device=device, dtype=torch.float32)
    gallery_labels = gallery_labels.to(device)
    query_labels = query_labels.to(device)
    ranks = torch.empty(query_embeds.shape[0], dtype=torch.long, device=device)
    for start in range(0, query_embeds.shape[0], chunk_size):
        stop = start + chunk_size
        scores = query_embeds[start:stop].to(torch.float32) @ gallery.T
        relevant = query_labels[start:stop, None] == gallery_labels[None, :]
        best_relevant = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
        # No relevant item scores above the best one, so "strictly higher" counts irrelevant items only.
        chunk_ranks = 1 + (scores > best_relevant).sum(dim=1)
        ranks[start:stop] = chunk_ranks.masked_fill(~relevant.any(dim=1), NO_RELEVANT_ITEM)
    return ranks


def text_to_image_ranks(
    text_embeds: Tensor, image_embeds: Tensor, caption_to_image: Tensor, chunk_size: int = 1024
) -> Tensor:
    """Rank of each caption's own image among all images (LongTensor[T], 1-based, optimistic on ties)."""
    _check_caption_to_image(caption_to_image, text_embeds.shape[0], image_embeds.shape[0])
    image_ids = torch.arange(image_embeds.shape[0], device=caption_to_image.device)
    return retrieval_ranks(text_embeds, image_embeds, caption_to_image, image_ids, chunk_size)


def image_to_text_ranks(
    image_embeds: Tensor, text_embeds: Tensor, caption_to_image: Tensor, chunk_size: int = 1024
) -> Tensor:
    """Rank of each image's best-ranked own caption among ALL captions (LongTensor[N]; 0 if it has none)."""
    _check_caption_to_image(caption_to_image, text_embeds.shape[0], image_embeds.shape[0])
    image_ids = torch.arange(image_embeds.shape[0], device=caption_to_image.device)
    return retrieval_ranks(image_embeds, text_embeds, image_ids, caption_to_image, chunk_size)


def rank_metrics(ranks: Tensor, ks: Sequence[int] = (1, 5, 10), prefix: str = "") -> dict[str, float]:
    """Recall@k (fraction), MRR@k (1/rank if rank <= k else 0), mean and median rank of 1-based ranks.

    Keys are ``{prefix}r@{k}``, ``{prefix}mrr@{k}``, ``{prefix}mean_rank``, ``{prefix}median_rank``.
    """
    if ranks.numel() == 0:
        raise ValueError("no ranks to summarise (no query has a relevant item)")
    if bool((ranks < 1).any()):
        raise ValueError("ranks must be 1-based; drop queries without a relevant item first")
    ranks = ranks.to(torch.float64)
    metrics: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        metrics[f"{prefix}r@{k}"] = hit.to(torch.float64).mean().item()
        metrics[f"{prefix}mrr@{k}"] = torch.where(hit, 1.0 / ranks, 0.0).mean().item()
    metrics[f"{prefix}mean_rank"] = ranks.mean().item()
    # The midpoint median (numpy's), not torch.median's lower one, so an even count is not biased down.
    ordered = ranks.sort().values
    middle = (ordered.numel() - 1) // 2, ordered.numel() // 2
    metrics[f"{prefix}median_rank"] = ((ordered[middle[0]] + ordered[middle[1]]) / 2).item()
    return metrics


def retrieval_metrics(
    text_embeds: Tensor,
    image_embeds: Tensor,
    caption_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Text→image MRR@k and recall@k, image→text recall@k, and mean/median ranks both ways.

    Keys: ``mrr@{k}`` (text→image), ``t2i_r@{k}``, ``i2t_r@{k}`` (fractions in [0, 1]), ``t2i_mean_rank``,
    ``t2i_median_rank``, ``i2t_mean_rank``, ``i2t_median_rank``. See the module docstring for conventions.
    """
    t2i = rank_metrics(text_to_image_ranks(text_embeds, image_embeds, caption_to_image, chunk_size), ks)
    i2t_ranks = image_to_text_ranks(image_embeds, text_embeds, caption_to_image, chunk_size)
    i2t = rank_metrics(i2t_ranks[i2t_ranks != NO_RELEVANT_ITEM], ks)

    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"mrr@{k}"] = t2i[f"mrr@{k}"]
    for k in ks:
        metrics[f"t2i_r@{k}"] = t2i[f"r@{k}"]
    for k in ks:
        metrics[f"i2t_r@{k}"] = i2t[f"r@{k}"]
    for direction, values in (("t2i", t2i), ("i2t", i2t)):
        metrics[f"{direction}_mean_rank"] = values["mean_rank"]
        metrics[f"{direction}_median_rank"] = values["median_rank"]
    return metrics


def random_ranking_metrics(num_images: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected text→image values of :func:`retrieval_metrics` when images are ranked at random (the chance level).

    A caption's own image is then equally likely at every rank 1..N: MRR@k = H(min(k, N)) / N, R@k = min(k, N) / N.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"mrr@{k}"] = sum(1 / r for r in range(1, min(k, num_images) + 1)) / num_images
    for k in ks:
        metrics[f"t2i_r@{k}"] = min(k, num_images) / num_images
    metrics["t2i_mean_rank"] = metrics["t2i_median_rank"] = (num_images + 1) / 2
    return metrics


def _check_embeds(query_embeds: Tensor, gallery_embeds: Tensor) -> None:
    if query_embeds.ndim != 2 or gallery_embeds.ndim != 2 or query_embeds.shape[1] != gallery_embeds.shape[1]:
        raise ValueError(
            "embeddings must be 2-D with the same width, got "
            f"{tuple(query_embeds.shape)} and {tuple(gallery_embeds.shape)}"
        )
    if not (query_embeds.is_floating_point() and gallery_embeds.is_floating_point()):
        raise TypeError(
            f"embeddings must be floating point, got {query_embeds.dtype} and {gallery_embeds.dtype}"
        )


def _check_caption_to_image(caption_to_image: Tensor, num_captions: int, num_images: int) -> None:
    if caption_to_image.shape != (num_captions,):
        raise ValueError(
            f"caption_to_image must have shape ({num_captions},), got {tuple(caption_to_image.shape)}"
        )
    if caption_to_image.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"caption_to_image must be an integer tensor, got {caption_to_image.dtype}")
    if num_captions and (int(caption_to_image.min()) < 0 or int(caption_to_image.max()) >= num_images):
        raise ValueError(f"caption_to_image must index into the {num_images} images")
