"""Text-conditioned DCGAN generator and discriminator of thesis chapter III (GAN-INT-CLS, Reed et al. 2016).

Both networks take the precomputed multilingual-BERT sentence vector ([CLS] last hidden state) and first
project it to a small embedding (Linear + batch norm + LeakyReLU 0.2), as Reed et al.'s code does, so the
768-d vector does not dominate the 100-d noise. The batch norm matters: sentence vectors of different captions
are nearly parallel (cosine ~0.99: they share most words), and normalising across the batch turns their small
differences into inputs of unit scale; without it the demo generator ignored its text.

How the thesis' "6 blocks" are counted at 64×64 (Fig. 11 of the thesis):

- Generator: every block upsamples ×2, starting from the 1×1 map of ``[noise, text embedding]``:
  1→2→4→8→16→32→64, i.e. ``log2(image_size)`` = 6 blocks. Blocks 1-5 are (transposed conv, dropout, batch
  norm, ReLU) in the thesis' order; block 6's conv produces the 3 RGB channels and is followed by tanh, since
  normalising or dropping out the output pixels would only add noise to the image (Radford et al. 2016).
- Discriminator: blocks 1-4 are (conv stride 2, batch norm, LeakyReLU 0.2) taking 64→32→16→8→4; block 1 has no
  batch norm, as in DCGAN (Radford et al. 2016). The projected text vector is then replicated over the 4×4 map
  and concatenated ("joined near the end" in the thesis); block 5 fuses image and text with a 1×1 conv + batch
  norm + LeakyReLU (Reed et al. 2016); block 6 is the 4×4 conv to a single real/fake logit per sample. The
  thesis' sigmoid is applied by the loss (BCE with logits), which is the numerically stable equivalent.

Beyond the thesis, the discriminator can take its text by projection instead (Miyato & Koyama 2018): an
unconditional logit of the image plus the inner product of the projected text with the image's pooled
features, which Miyato & Koyama found holds a generator to its condition more closely than concatenation does (on
the demo it follows the caption's colour more, not yet its shape: docs/results.md).
"""

import math

import torch
from torch import Tensor, nn

__all__ = ["WebtoonDiscriminator", "WebtoonGenerator", "dcgan_init_"]

# Spatial size at which the text embedding is joined to the image features (Reed et al. 2016).
TEXT_JOIN_SIZE = 4


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016): weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _num_doublings(image_size: int) -> int:
    blocks = int(math.log2(image_size)) if image_size > 0 else 0
    if image_size < 2 * TEXT_JOIN_SIZE or 2**blocks != image_size:
        raise ValueError(f"image_size must be a power of 2 and >= {2 * TEXT_JOIN_SIZE}, got {image_size}")
    return blocks


def _transposed_doubling(in_channels: int, out_channels: int, bias: bool) -> nn.Module:
    # k=4, s=2, p=1 exactly doubles the resolution (also 1×1 → 2×2 for the first block).
    return nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=bias)


def _nearest_doubling(in_channels: int, out_channels: int, bias: bool) -> nn.Module:
    # Every output pixel sees the same number of input pixels: no checkerboard (Odena et al. 2016).
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=bias)
    )


UPSAMPLING = {"transposed": _transposed_doubling, "nearest": _nearest_doubling}


def _text_projection(text_dim: int, text_embed_dim: int) -> nn.Sequential:
    # Reed et al. 2016 compress the sentence vector before conditioning both networks on it.
    return nn.Sequential(
        nn.Linear(text_dim, text_embed_dim), nn.BatchNorm1d(text_embed_dim), nn.LeakyReLU(0.2, inplace=True)
    )


class WebtoonGenerator(nn.Module):
    """G(z, φ(t)): noise and projected sentence vector → 3×image_size×image_size image in [-1, 1]."""

    def __init__(
        self,
        text_dim: int,
        noise_dim: int = 100,
        text_embed_dim: int = 128,
        base_channels: int = 64,
        dropout: float = 0.2,
        image_size: int = 64,
        upsampling: str = "transposed",
    ) -> None:
        """``upsampling``: ``transposed`` (the thesis' and DCGAN's stride-2 transposed convolutions) or
        ``nearest`` (nearest-neighbour doubling then a 3x3 convolution, Odena et al. 2016: no checkerboard)."""
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {sorted(UPSAMPLING)}, got {upsampling!r}")
        num_blocks = _num_doublings(image_size)
        self.noise_dim = noise_dim
        self.image_size = image_size
        self.text_projection = _text_projection(text_dim, text_embed_dim)

        # Channels halve with every doubling of resolution, capped at 8× base (DCGAN's 4×4 map has 8×base).
        widths = [base_channels * min(8, 2 ** (num_blocks - 2 - i)) for i in range(num_blocks - 1)]
        blocks: list[nn.Module] = []
        in_channels = noise_dim + text_embed_dim
        for out_channels in widths:
            blocks.append(
                nn.Sequential(
                    UPSAMPLING[upsampling](in_channels, out_channels, bias=False),
                    # Thesis order: conv, dropout, batch norm, ReLU. Dropout is the thesis' regulariser and, as in
                    # pix2pix, an extra source of stochasticity; it is off in eval mode, so generation is a
                    # deterministic function of the noise.
                    nn.Dropout(dropout),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
            in_channels = out_channels
        blocks.append(nn.Sequential(UPSAMPLING[upsampling](in_channels, 3, bias=True), nn.Tanh()))
        self.blocks = nn.Sequential(*blocks)
        self.apply(dcgan_init_)

    def forward(self, noise: Tensor, text_features: Tensor) -> Tensor:
        """Images [B, 3, S, S] in [-1, 1] from noise [B, noise_dim] and sentence vectors [B, text_dim]."""
        text = self.text_projection(text_features)
        x = torch.cat([noise, text], dim=1)
        return self.blocks(x[:, :, None, None])


class WebtoonDiscriminator(nn.Module):
    """D(x, φ(t)): one real/fake logit per (image, sentence vector) pair, plus the image features used for feature matching."""

    def __init__(
        self,
        text_dim: int,
        text_embed_dim: int = 128,
        base_channels: int = 64,
        image_size: int = 64,
        conditioning: str = "concat",
    ) -> None:
        """``conditioning``: ``concat`` (the thesis and Reed et al.: text replicated over the 4×4 map, fused by a 1×1
        conv) or ``projection`` (Miyato & Koyama 2018: unconditional logit + <projected text, pooled features>; the text is
        projected to the features' width, so ``text_embed_dim`` applies to ``concat`` only)."""
        super().__init__()
        if conditioning not in ("concat", "projection"):
            raise ValueError(f"conditioning must be 'concat' or 'projection', got {conditioning!r}")
        self.conditioning = conditioning
        num_down = _num_doublings(image_size) - int(math.log2(TEXT_JOIN_SIZE))
        self.image_size = image_size

        blocks: list[nn.Module] = []
        in_channels = 3
        for i in range(num_down):
            out_channels = base_channels * min(8, 2**i)
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=i == 0),
                    # No batch norm on the input block (Radford et al. 2016): it destabilises training there.
                    nn.BatchNorm2d(out_channels) if i > 0 else nn.Identity(),
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
            in_channels = out_channels
        self.image_blocks = nn.Sequential(*blocks)
        self.feature_dim = in_channels * TEXT_JOIN_SIZE * TEXT_JOIN_SIZE

        if conditioning == "concat":
            self.text_projection = _text_projection(text_dim, text_embed_dim)
            self.joint_block = nn.Sequential(
                nn.Conv2d(in_channels + text_embed_dim, in_channels, 1, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.LeakyReLU(0.2, inplace=True),
            )
        else:
            # The text is projected straight to the feature width: its inner product with the pooled features is
            # the conditional half of the logit.
            self.text_projection = _text_projection(text_dim, in_channels)
        self.logit = nn.Conv2d(in_channels, 1, TEXT_JOIN_SIZE)
        self.apply(dcgan_init_)

    def forward(self, images: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B] and flattened 4×4 image features [B, feature_dim] (taken before the text is joined)."""
        image_features = self.image_blocks(images)
        return self.score(image_features, text_features), image_features.flatten(1)

    def score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Logits [B] of 4×4 image features (``image_blocks`` output) paired with sentence vectors. Apart, so
        that one pass over the real images serves both their right and their wrong captions."""
        text = self.text_projection(text_features)
        if self.conditioning == "projection":
            pooled = image_features.mean(dim=(2, 3))
            return self.logit(image_features).flatten() + (text * pooled).sum(dim=1)
        text_map = text[:, :, None, None].expand(-1, -1, TEXT_JOIN_SIZE, TEXT_JOIN_SIZE)
        joint = self.joint_block(torch.cat([image_features, text_map], dim=1))
        return self.logit(joint).flatten()
