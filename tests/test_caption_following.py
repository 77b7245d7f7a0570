"""The DCGAN demo's caption-following probe of its discriminator: which attributes does D check?"""

from __future__ import annotations

import dataclasses

import torch

from src.demo import caption_following
from src.demo.caption_following import LANGUAGES, SWAPPED_ATTRIBUTES, CaptionFollowing
from src.demo.synthetic import BACKGROUNDS, COLOURS, KINDS, caption_scene


def test_swapped_captions_change_only_the_named_attribute_in_both_languages():
    following = CaptionFollowing(num_per_caption=2, image_size=32, num_shape_scenes=12)
    values_of = {"kind": KINDS, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
    assert set(SWAPPED_ATTRIBUTES) == set(values_of)
    for attribute, values in values_of.items():
        for language in LANGUAGES:
            swapped = following.swapped_captions(attribute, language)
            assert swapped == following.swapped_captions(attribute, language)  # the same for the same seed
            for (scene, style, _), template, caption in zip(
                following.shape_scenes, following.shape_templates, swapped, strict=True
            ):
                worded = {
                    caption_scene(dataclasses.replace(scene, **{attribute: other}), language, template, style)
                    for other in values
                    if other != getattr(scene, attribute)
                }
                assert caption in worded


class KindCheckingDiscriminator:
    """A stand-in GAN whose discriminator checks only the kind: it scores a drawing 1 lower with a kind-swapped
    caption (its sentence vector is [1] for those, [0] otherwise) and is blind to every other attribute."""

    def __init__(self, following: CaptionFollowing) -> None:
        from src.data.preprocess import Preprocess

        self.preprocess = Preprocess.of({"image_size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
        self.device = torch.device("cpu")
        self.kind_swapped = {c for lang in LANGUAGES for c in following.swapped_captions("kind", lang)}
        self.pairs: list[int] = []

    def encode(self, captions):
        return torch.tensor([[float(caption in self.kind_swapped)] for caption in captions])

    def match_logits(self, images, text_features):
        assert images.min() >= -1 and images.max() <= 1 and len(images) == len(text_features)
        self.pairs.append(len(images))
        return -text_features[:, 0]


def test_discriminator_ranking_is_the_share_of_drawings_scored_higher_with_their_own_caption(monkeypatch):
    following = CaptionFollowing(num_per_caption=2, image_size=32, num_shape_scenes=5)
    module = KindCheckingDiscriminator(following)
    monkeypatch.setattr(caption_following, "text_to_image_for", lambda pl_module: pl_module)

    ranks = following.discriminator_ranking(module)

    # Every kind swap is caught; a blind attribute ties, and a tie is not a win.
    assert ranks == {"d_ranks_kind": 1.0, "d_ranks_colour": 0.0, "d_ranks_background": 0.0}
    # Per language: the right captions and three swaps, each paired with all 5 x 2 drawings.
    assert module.pairs == [10] * len(LANGUAGES) * (1 + len(SWAPPED_ATTRIBUTES))
