"""Text-to-webtoon DCGAN of thesis chapter III, trained with the GAN-INT-CLS matching-aware loss (Reed et al. 2016).

Per batch: one discriminator step on (real, right text), (real, wrong text) and (fake, right text), then one
generator step on the adversarial term plus feature matching (Salimans et al. 2016) and, optionally, GAN-INT on
interpolated sentence vectors and mode seeking (Mao et al. 2019) against a generator that ignores its noise.
Networks are ``src/modules/networks/dcgan.py``; the sentence vectors are precomputed by the data layer, and the
encoder that computed them is recorded in the checkpoint so that generation encodes new captions alike.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor

from src.data.preprocess import Preprocess
from src.modules.gan_losses import discriminator_loss, generator_loss, interpolate_text, mode_seeking_loss
from src.modules.networks.dcgan import WebtoonDiscriminator, WebtoonGenerator
from src.utils.checkpoint import record_module_class

__all__ = ["TextToWebtoonGAN"]

# Reed et al. 2016 interpolate halfway between two sentence vectors.
INTERPOLATION_BETA = 0.5
# Thesis chapter III: Adam, lr 0.0002 for both networks; betas from DCGAN (Radford et al. 2016). Used when no
# optimizer is given, e.g. when loading a checkpoint only to generate.
THESIS_ADAM = functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))


class TextToWebtoonGAN(LightningModule):
    """GAN-INT-CLS training of a text-conditioned DCGAN with manual optimisation (one D step, then one G step)."""

    def __init__(
        self,
        generator: dict[str, Any],
        discriminator: dict[str, Any],
        preprocess: dict[str, Any] | None = None,
        optimizer_g: functools.partial | None = None,
        optimizer_d: functools.partial | None = None,
        label_smoothing: float = 0.1,
        feature_matching_weight: float = 1.0,
        interpolation_weight: float = 0.0,
        mode_seeking_weight: float = 0.0,
        fixed_noise_seed: int = 0,
        text_features_dir: str | None = None,
        caption_encoder: dict[str, Any] | None = None,
    ) -> None:
        """``generator`` / ``discriminator``: keyword arguments of the networks (kept in checkpoints to rebuild them).

        ``text_features_dir``: the precomputed features the GAN trains on; their encoder record
        (``text_features.json``) is copied into ``caption_encoder`` when fitting starts, so a checkpoint alone
        says how to encode new captions.
        """
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        # Optimizer partials stay out of the hparams: checkpoints then load with weights_only=True.
        self.save_hyperparameters(ignore=["optimizer_g", "optimizer_d"], logger=False)
        self.generator = WebtoonGenerator(**generator)
        self.discriminator = WebtoonDiscriminator(**discriminator)
        self.preprocess = Preprocess.of(preprocess or {"image_size": self.generator.image_size})
        if self.preprocess.image_size != self.generator.image_size:
            raise ValueError(
                f"model.preprocess.image_size={self.preprocess.image_size} but the generator draws "
                f"{self.generator.image_size}px images"
            )
        self.optimizer_g = optimizer_g or THESIS_ADAM
        self.optimizer_d = optimizer_d or THESIS_ADAM
        # Two optimizers stepped in a fixed order per batch: Lightning's automatic loop cannot express that.
        self.automatic_optimization = False

    @property
    def real_label(self) -> float:
        """D's target for (real image, right text); < 1 is one-sided label smoothing (Salimans et al. 2016)."""
        return 1.0 - self.hparams.label_smoothing

    @property
    def noise_dim(self) -> int:
        return self.generator.noise_dim

    def setup(self, stage: str) -> None:
        from src.data.text_features import METADATA_FILE, read_encoder_metadata

        features_dir = self.hparams.text_features_dir
        if (
            self.hparams.caption_encoder is None
            and features_dir
            and (Path(features_dir) / METADATA_FILE).is_file()
        ):
            # The DataModule has computed the features by now (prepare_data runs before setup).
            self.hparams.caption_encoder = read_encoder_metadata(features_dir)

    def sample_noise(self, n: int, seed: int | None = None) -> Tensor:
        """``n`` noise vectors on this module's device, a deterministic function of ``seed`` (default ``fixed_noise_seed``)."""
        # Drawn on the CPU so the same seed gives the same noise on every device.
        rng = torch.Generator().manual_seed(self.hparams.fixed_noise_seed if seed is None else seed)
        return torch.randn(n, self.noise_dim, generator=rng).to(self.device)

    @torch.no_grad()
    def generate(self, text_features: Tensor, noise: Tensor) -> Tensor:
        """Images [B, 3, S, S] in [-1, 1] for sentence vectors [B, D], with G in eval mode (dropout off, running BN stats)."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(noise.to(text_features), text_features)
        finally:
            self.generator.train(was_training)

    @torch.no_grad()
    def match_logits(self, images: Tensor, text_features: Tensor) -> Tensor:
        """D's logits [B] for images [B, 3, S, S] in [-1, 1] paired with sentence vectors [B, D], with D in eval
        mode: how well D tells a caption from a wrong one is what tells the generator to follow it."""
        was_training = self.discriminator.training
        self.discriminator.eval()
        try:
            return self.discriminator(images, text_features.to(images))[0]
        finally:
            self.discriminator.train(was_training)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_module_class(self, checkpoint)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        real, right, wrong = batch["image"], batch["text_features"], batch["wrong_text_features"]
        batch_size = real.shape[0]
        opt_g, opt_d = self.optimizers()

        noise = torch.randn(batch_size, self.noise_dim, device=real.device, dtype=real.dtype)
        # One forward through G, reused by both steps: detached for D, with its graph for G (DCGAN recipe).
        fake = self.generator(noise, right)

        with self.toggled_optimizer(opt_d):
            # The real images' features do not depend on the caption: computed once for the right and wrong one
            # (the same batch, so the same batch-norm statistics as two passes).
            real_features = self.discriminator.image_blocks(real)
            real_right_logits = self.discriminator.score(real_features, right)
            real_wrong_logits = self.discriminator.score(real_features, wrong)
            fake_right_logits, _ = self.discriminator(fake.detach(), right)
            d_terms = discriminator_loss(
                real_right_logits, real_wrong_logits, fake_right_logits, real_label=self.real_label
            )
            opt_d.zero_grad()
            self.manual_backward(d_terms["d_loss"])
            opt_d.step()

        with self.toggled_optimizer(opt_g):
            g_logits, fake_features = self.discriminator(fake, right)
            with torch.no_grad():
                # Target statistics from the just-updated D; no gradient is needed through the real branch.
                _, real_features = self.discriminator(real, right)
            g_terms = generator_loss(
                g_logits,
                real_features=real_features,
                fake_features=fake_features,
                feature_matching_weight=self.hparams.feature_matching_weight,
            )
            g_loss = g_terms["g_loss"]
            if self.hparams.interpolation_weight > 0:
                # GAN-INT (Reed et al. 2016): also fool D on sentence vectors between captions, which fills the
                # text manifold; these have no real image, so only the adversarial term applies.
                mixed = interpolate_text(right, INTERPOLATION_BETA)
                mixed_logits, _ = self.discriminator(self.generator(torch.randn_like(noise), mixed), mixed)
                g_terms["g_interpolated"] = generator_loss(mixed_logits)["g_adv"]
                g_loss = g_loss + self.hparams.interpolation_weight * g_terms["g_interpolated"]
            if self.hparams.mode_seeking_weight > 0:
                # A second drawing of half the captions with other noise must differ from the first.
                half = max(1, batch_size // 2)
                other_noise = torch.randn_like(noise[:half])
                other = self.generator(other_noise, right[:half])
                g_terms["g_mode_seeking"] = mode_seeking_loss(fake[:half], other, noise[:half], other_noise)
                g_loss = g_loss + self.hparams.mode_seeking_weight * g_terms["g_mode_seeking"]
            g_terms["g_loss"] = g_loss
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()

        self._log_terms("train", d_terms, g_terms, real_right_logits, real_wrong_logits, fake_right_logits)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluation_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluation_step("test", batch, batch_idx)

    def _evaluation_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """One generated image per real sample, with noise seeded by batch index so every evaluation is repeatable."""
        real, right, wrong = batch["image"], batch["text_features"], batch["wrong_text_features"]
        noise = self.sample_noise(real.shape[0], seed=self.hparams.fixed_noise_seed + batch_idx)
        fake = self.generate(right, noise=noise)
        real_right_logits, _ = self.discriminator(real, right)
        real_wrong_logits, _ = self.discriminator(real, wrong)
        fake_right_logits, _ = self.discriminator(fake, right)
        # No label smoothing here: it is a training regulariser, and unsmoothed targets keep the metric comparable
        # across runs with different smoothing.
        d_terms = discriminator_loss(real_right_logits, real_wrong_logits, fake_right_logits)
        g_terms = generator_loss(fake_right_logits)
        self._log_terms(stage, d_terms, g_terms, real_right_logits, real_wrong_logits, fake_right_logits)
        # Consumed by the IS/FID callback in on_validation_batch_end / on_test_batch_end.
        return {"real": real, "fake": fake}

    def _log_terms(
        self,
        stage: str,
        d_terms: dict[str, Tensor],
        g_terms: dict[str, Tensor],
        real_right_logits: Tensor,
        real_wrong_logits: Tensor,
        fake_right_logits: Tensor,
    ) -> None:
        metrics = {f"{stage}/{name}": value.detach() for name, value in {**d_terms, **g_terms}.items()}
        # Mean D(x) per pair type: the usual way to see which network is winning.
        metrics[f"{stage}/d_real_prob"] = torch.sigmoid(real_right_logits.detach()).mean()
        metrics[f"{stage}/d_wrong_prob"] = torch.sigmoid(real_wrong_logits.detach()).mean()
        metrics[f"{stage}/d_fake_prob"] = torch.sigmoid(fake_right_logits.detach()).mean()
        # Training curves per step, evaluation metrics per epoch; one name per metric either way (no _step/_epoch).
        on_step = stage == "train"
        options = dict(
            on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, batch_size=len(real_right_logits)
        )
        for name in ("d_loss", "g_loss"):
            self.log(f"{stage}/{name}", metrics.pop(f"{stage}/{name}"), prog_bar=True, **options)
        self.log_dict(metrics, **options)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[opt_g, opt_d]`` from the partial optimizers, completed with each network's parameters."""
        opt_g = self.optimizer_g(params=self.generator.parameters())
        opt_d = self.optimizer_d(params=self.discriminator.parameters())
        return [opt_g, opt_d]
