"""Pins the chunked retrieval metrics to torchmetrics, a plain loop, and hand-computed values."""

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalRecall

from src.metrics.retrieval import (
    NO_RELEVANT_ITEM,
    image_to_text_ranks,
    retrieval_metrics,
    retrieval_ranks,
    text_to_image_ranks,
)

KS = (1, 5, 10)


def _uneven_captions(num_images: int, generator: torch.Generator) -> torch.Tensor:
    """caption_to_image with 3-5 captions per image, in shuffled caption order."""
    counts = torch.randint(3, 6, (num_images,), generator=generator)
    caption_to_image = torch.arange(num_images).repeat_interleave(counts)
    return caption_to_image[torch.randperm(len(caption_to_image), generator=generator)]


def _tied_scores(num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [T, N] with many ties among negatives but a positive never tied with a negative.

    Negatives sit on the 0.1 grid and positives half-way between grid points, so torchmetrics' unspecified
    order inside a tie can never move a positive; positives are drawn high so ranks spread over 1..>10.
    """
    generator = torch.Generator().manual_seed(seed)
    caption_to_image = _uneven_captions(num_images, generator)
    scores = torch.round(torch.rand(len(caption_to_image), num_images, generator=generator) * 10) / 10
    positive_steps = torch.randint(6, 10, (len(caption_to_image),), generator=generator)
    scores[torch.arange(len(caption_to_image)), caption_to_image] = (positive_steps + 0.5) / 10
    return scores, caption_to_image


def _as_embeddings(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and image embeddings whose dot products are exactly ``scores``: one-hot images."""
    return scores.clone(), torch.eye(scores.shape[1])


def _loop_image_to_text_ranks(scores: torch.Tensor, caption_to_image: torch.Tensor) -> list[int]:
    ranks = []
    for image in range(scores.shape[1]):
        column = scores[:, image].tolist()
        own = [c for c in range(len(column)) if caption_to_image[c] == image]
        if not own:
            continue
        best = max(column[c] for c in own)
        ranks.append(1 + sum(1 for c, s in enumerate(column) if c not in own and s > best))
    return ranks


def _random_normalised(
    num_images: int, dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    caption_to_image = _uneven_captions(num_images, generator)
    image_embeds = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=1)
    noise = torch.randn(len(caption_to_image), dim, generator=generator)
    text_embeds = torch.nn.functional.normalize(
        image_embeds[caption_to_image] + 1.5 * noise / dim**0.5, dim=1
    )
    return text_embeds, image_embeds, caption_to_image


@pytest.mark.parametrize("seed", [0, 1])
def test_text_to_image_matches_torchmetrics_with_tied_negatives(seed: int) -> None:
    scores, caption_to_image = _tied_scores(num_images=60, seed=seed)
    text_embeds, image_embeds = _as_embeddings(scores)
    num_captions, num_images = scores.shape
    ranks = text_to_image_ranks(text_embeds, image_embeds, caption_to_image)
    assert ranks.min() == 1 and ranks.max() > 10, "the data should exercise truncation at every k"

    metrics = retrieval_metrics(text_embeds, image_embeds, caption_to_image, ks=KS, chunk_size=16)

    preds = scores.flatten()
    target = (caption_to_image[:, None] == torch.arange(num_images)[None, :]).flatten()
    indexes = torch.arange(num_captions).repeat_interleave(num_images)
    for k in KS:
        expected_mrr = RetrievalMRR(top_k=k)(preds, target, indexes=indexes).item()
        expected_recall = RetrievalRecall(top_k=k)(preds, target, indexes=indexes).item()
        assert metrics[f"mrr@{k}"] == pytest.approx(expected_mrr, abs=1e-6)
        assert metrics[f"t2i_r@{k}"] == pytest.approx(expected_recall, abs=1e-6)
    assert metrics["t2i_mean_rank"] == pytest.approx(ranks.double().mean().item())
    assert metrics["t2i_median_rank"] == pytest.approx(float(np.median(ranks.numpy())))


@pytest.mark.parametrize("seed", [0, 1])
def test_image_to_text_matches_loop_and_torchmetrics_hit_rate(seed: int) -> None:
    scores, caption_to_image = _tied_scores(num_images=60, seed=seed)
    text_embeds, image_embeds = _as_embeddings(scores)
    num_captions, num_images = scores.shape
    expected_ranks = _loop_image_to_text_ranks(scores, caption_to_image)

    ranks = image_to_text_ranks(image_embeds, text_embeds, caption_to_image, chunk_size=7)
    assert ranks.tolist() == expected_ranks

    metrics = retrieval_metrics(text_embeds, image_embeds, caption_to_image, ks=KS, chunk_size=7)
    assert metrics["i2t_mean_rank"] == pytest.approx(float(np.mean(expected_ranks)))
    assert metrics["i2t_median_rank"] == pytest.approx(float(np.median(expected_ranks)))
    # With several relevant captions, "an image is hit at k" is torchmetrics' hit rate, not its recall.
    preds = scores.T.flatten()
    target = (torch.arange(num_images)[:, None] == caption_to_image[None, :]).flatten()
    indexes = torch.arange(num_images).repeat_interleave(num_captions)
    for k in KS:
        expected = RetrievalHitRate(top_k=k)(preds, target, indexes=indexes).item()
        assert metrics[f"i2t_r@{k}"] == pytest.approx(expected, abs=1e-6)
        assert metrics[f"i2t_r@{k}"] == pytest.approx(np.mean([r <= k for r in expected_ranks]))


def test_hand_built_example() -> None:
    caption_to_image = torch.tensor([0, 0, 1, 2, 2])
    # Rows are captions, columns images; image 3 has no caption.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # own image 0 first: rank 1
            [0.4, 0.8, 0.1, 0.6],  # image 0 below 0.8 and 0.6: rank 3
            [0.7, 0.6, 0.1, 0.2],  # image 1 below 0.7: rank 2
            [0.3, 0.5, 0.2, 0.9],  # image 2 last: rank 4
            [0.1, 0.2, 0.8, 0.3],  # rank 1
        ]
    )
    text_embeds, image_embeds = _as_embeddings(scores)

    assert text_to_image_ranks(text_embeds, image_embeds, caption_to_image).tolist() == [1, 3, 2, 4, 1]
    # Image 0's best caption (0.9) is first; image 1's caption (0.6) is below caption 1 (0.8);
    # image 2's best caption (0.8) is first; image 3 has no caption.
    i2t_ranks = image_to_text_ranks(image_embeds, text_embeds, caption_to_image)
    assert i2t_ranks.tolist() == [1, 2, 1, NO_RELEVANT_ITEM]

    metrics = retrieval_metrics(text_embeds, image_embeds, caption_to_image, ks=(1, 2, 5))
    expected = {
        "mrr@1": 2 / 5,
        "mrr@2": (1 + 1 / 2 + 1) / 5,
        "mrr@5": (1 + 1 / 3 + 1 / 2 + 1 / 4 + 1) / 5,
        "t2i_r@1": 2 / 5,
        "t2i_r@2": 3 / 5,
        "t2i_r@5": 1.0,
        "i2t_r@1": 2 / 3,
        "i2t_r@2": 1.0,
        "i2t_r@5": 1.0,
        "t2i_mean_rank": 11 / 5,
        "t2i_median_rank": 2.0,
        "i2t_mean_rank": 4 / 3,
        "i2t_median_rank": 1.0,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_ties_are_broken_optimistically() -> None:
    caption_to_image = torch.tensor([0, 1, 2, 2])
    scores = torch.tensor(
        [
            [0.5, 0.5, 0.1],  # tied with one negative, none above: rank 1
            [0.9, 0.5, 0.5],  # one negative above, one tied: rank 2
            [0.7, 0.7, 0.7],  # tied with every negative: rank 1
            [0.2, 0.3, 0.1],  # another caption of image 2, ranked last: rank 3
        ]
    )
    text_embeds, image_embeds = _as_embeddings(scores)
    assert text_to_image_ranks(text_embeds, image_embeds, caption_to_image).tolist() == [1, 2, 1, 3]
    # Image 1's caption (0.5) ties caption 0 and is below caption 2 (0.7): rank 2, not 3.
    # Image 2's captions (0.7, 0.1) are both relevant, so caption 3 never pushes caption 2 down.
    assert image_to_text_ranks(image_embeds, text_embeds, caption_to_image).tolist() == [3, 2, 1]


def test_median_is_the_midpoint_for_an_even_count() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1]])  # caption 1's image is second: ranks 1 and 2
    text_embeds, image_embeds = _as_embeddings(scores)
    metrics = retrieval_metrics(text_embeds, image_embeds, torch.tensor([0, 1]), ks=(1,))
    assert metrics["t2i_median_rank"] == 1.5


def test_chunk_size_does_not_change_results() -> None:
    text_embeds, image_embeds, caption_to_image = _random_normalised(num_images=50, dim=32, seed=3)
    results = [
        retrieval_metrics(text_embeds, image_embeds, caption_to_image, chunk_size=chunk_size)
        for chunk_size in (1, 7, 10_000)
    ]
    assert results[0] == results[1] == results[2]
    assert 0.0 < results[0]["t2i_r@1"] < 1.0, "the data should be neither trivial nor hopeless"


def test_ranks_match_a_full_matrix_reference_on_normalised_embeddings() -> None:
    text_embeds, image_embeds, caption_to_image = _random_normalised(num_images=40, dim=16, seed=4)
    scores = text_embeds @ image_embeds.T
    positive = scores[torch.arange(len(caption_to_image)), caption_to_image]
    expected = 1 + (scores > positive[:, None]).sum(dim=1)
    assert torch.equal(
        text_to_image_ranks(text_embeds, image_embeds, caption_to_image, chunk_size=9), expected
    )
    assert image_to_text_ranks(image_embeds, text_embeds, caption_to_image).tolist() == (
        _loop_image_to_text_ranks(scores, caption_to_image)
    )


def test_images_without_captions_are_excluded_from_image_to_text() -> None:
    text_embeds, image_embeds, caption_to_image = _random_normalised(num_images=30, dim=16, seed=5)
    # An extra image no caption points to, placed where it outscores every caption's own image.
    lonely = torch.nn.functional.normalize(text_embeds.mean(dim=0, keepdim=True), dim=1)
    with_lonely = torch.cat([image_embeds, lonely])

    ranks = image_to_text_ranks(with_lonely, text_embeds, caption_to_image)
    assert ranks[-1] == NO_RELEVANT_ITEM and bool((ranks[:-1] >= 1).all())
    base = retrieval_metrics(text_embeds, image_embeds, caption_to_image)
    extended = retrieval_metrics(text_embeds, with_lonely, caption_to_image)
    assert {k: v for k, v in extended.items() if k.startswith("i2t")} == {
        k: v for k, v in base.items() if k.startswith("i2t")
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_is_scored_in_float32(dtype: torch.dtype) -> None:
    text_embeds, image_embeds, caption_to_image = _random_normalised(num_images=20, dim=16, seed=6)
    text_embeds, image_embeds = text_embeds.to(dtype), image_embeds.to(dtype)
    expected = retrieval_metrics(text_embeds.float(), image_embeds.float(), caption_to_image)
    assert retrieval_metrics(text_embeds, image_embeds, caption_to_image) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu() -> None:
    text_embeds, image_embeds, caption_to_image = _random_normalised(num_images=50, dim=32, seed=7)
    expected = retrieval_metrics(text_embeds, image_embeds, caption_to_image)
    ranks = text_to_image_ranks(text_embeds.cuda(), image_embeds.cuda(), caption_to_image.cuda())
    assert ranks.device.type == "cuda"
    assert retrieval_metrics(text_embeds.cuda(), image_embeds.cuda(), caption_to_image.cuda()) == expected


def test_generic_ranks_with_several_relevant_items_per_query() -> None:
    scores = torch.tensor([[0.2, 0.9, 0.4, 0.6], [0.5, 0.1, 0.3, 0.7]])
    query_labels = torch.tensor([7, 5])
    gallery_labels = torch.tensor([7, 8, 7, 9])
    # Query 0: relevant items score 0.2 and 0.4; best 0.4 is below 0.9 and 0.6. Query 1: none relevant.
    ranks = retrieval_ranks(scores, torch.eye(4), query_labels, gallery_labels)
    assert ranks.tolist() == [3, NO_RELEVANT_ITEM]


def test_invalid_inputs_are_rejected() -> None:
    text_embeds, image_embeds, caption_to_image = _random_normalised(num_images=5, dim=8, seed=8)
    with pytest.raises(ValueError, match="index into"):
        retrieval_metrics(text_embeds, image_embeds[:2], caption_to_image)
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(text_embeds, image_embeds, caption_to_image[:-1])
    with pytest.raises(ValueError, match="same width"):
        retrieval_metrics(text_embeds, image_embeds[:, :4], caption_to_image)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(text_embeds, image_embeds, caption_to_image, chunk_size=0)
