"""Matching-aware GAN loss (GAN-CLS), GAN-INT text interpolation and feature matching.

GAN-CLS and GAN-INT are from Reed et al. 2016, "Generative Adversarial Text to Image Synthesis"; one-sided label
smoothing and feature matching from Salimans et al. 2016, "Improved Techniques for Training GANs". The thesis
(chapter III) uses both of the latter against overfitting. All terms take logits and use BCE with logits, the
numerically stable form of the thesis' sigmoid output followed by binary cross-entropy.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["discriminator_loss", "generator_loss", "interpolate_text", "mode_seeking_loss"]


def _bce_to(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_loss(
    real_right_logits: Tensor,
    real_wrong_logits: Tensor,
    fake_right_logits: Tensor,
    real_label: float = 1.0,
) -> dict[str, Tensor]:
    """GAN-CLS discriminator terms ``d_real``, ``d_wrong``, ``d_fake`` and ``d_loss = d_real + (d_wrong + d_fake) / 2``.

    ``real_label`` < 1 is one-sided label smoothing (Salimans et al. 2016): only the real target is softened.
    """
    terms = {
        # Real image with its own caption: the only "real" pair.
        "d_real": _bce_to(real_right_logits, real_label),
        # Real image with another sample's caption: teaches D to judge the text-image match, not only realism.
        "d_wrong": _bce_to(real_wrong_logits, 0.0),
        # Generated image with the caption it was generated from. The thesis words this pair "fake image - fake
        # text"; Reed et al.'s GAN-CLS, which it follows, scores the fake with the text it was generated from.
        "d_fake": _bce_to(fake_right_logits, 0.0),
    }
    # Reed et al. average the two "fake" terms so real and fake pairs weigh the same.
    terms["d_loss"] = terms["d_real"] + (terms["d_wrong"] + terms["d_fake"]) / 2
    return terms


def generator_loss(
    fake_right_logits: Tensor,
    real_features: Tensor | None = None,
    fake_features: Tensor | None = None,
    feature_matching_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Generator terms: ``g_adv``, ``g_feature_matching`` (only when its weight > 0) and their weighted sum ``g_loss``."""
    # Non-saturating loss (Goodfellow et al. 2014): maximise log D(G(z)) for strong gradients early on.
    terms = {"g_adv": _bce_to(fake_right_logits, 1.0)}
    terms["g_loss"] = terms["g_adv"]
    if feature_matching_weight > 0:
        if real_features is None or fake_features is None:
            raise ValueError("feature matching needs both real_features and fake_features")
        # Salimans et al. 2016: match the batch mean of an intermediate discriminator layer, so G stops chasing
        # whatever the current D happens to over-fit to.
        terms["g_feature_matching"] = F.mse_loss(fake_features.mean(dim=0), real_features.mean(dim=0))
        terms["g_loss"] = terms["g_loss"] + feature_matching_weight * terms["g_feature_matching"]
    return terms


def interpolate_text(text_features: Tensor, beta: float = 0.5) -> Tensor:
    """GAN-INT: ``beta * t_i + (1 - beta) * t_{i-1}``, mixing each sentence vector with the previous sample's.

    The mixtures have no real image, so they only feed the generator's adversarial term (Reed et al. 2016).
    """
    return beta * text_features + (1.0 - beta) * text_features.roll(1, dims=0)


def mode_seeking_loss(
    fake_a: Tensor, fake_b: Tensor, noise_a: Tensor, noise_b: Tensor, eps: float = 1e-5
) -> Tensor:
    """Mode seeking (Mao et al. 2019, MSGAN): ``1 / (mean|G(z_a,t) - G(z_b,t)| / mean|z_a - z_b|)``.

    Minimising it pushes two noise vectors of one caption to different images. GAN-CLS generators otherwise
    learn to ignore their noise and draw one picture per caption (mode collapse).
    """
    ratio = (fake_a - fake_b).abs().mean() / (noise_a - noise_b).abs().mean()
    return 1.0 / (ratio + eps)
