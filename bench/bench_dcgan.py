"""DCGAN training: precomputed sentence vectors vs encoding captions on the fly, and Lightning vs a bare loop.

    python bench/bench_dcgan.py [--samples 1000] [--batches 30]

The caption encoder is a randomly initialised BERT of bert-base-multilingual-cased's size (12 layers, 768-d),
so the on-the-fly cost is the thesis' without downloading its weights.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from src.data.caption_encoder import CaptionEncoder
from src.data.datamodule import WebtoonShardDataModule
from src.data.text_features import precompute_text_features
from src.demo.synthetic import generate_synthetic_dataset
from src.modules.dcgan_module import TextToWebtoonGAN

ENCODER = {
    "name_or_path": None,
    "config": {
        "model_type": "bert",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "pooling": "cls",
    "batch_size": 256,
    "device": "cpu",
}


def make_gan() -> TextToWebtoonGAN:
    torch.manual_seed(0)
    return TextToWebtoonGAN(**make_gan_kwargs())


def fit_seconds(model: L.LightningModule, loader, batches: int) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


class EncodeOnTheFly(TextToWebtoonGAN):
    """The same GAN, but each batch's captions are encoded by the text encoder inside the step."""

    def __init__(self, encoder: CaptionEncoder, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_encoder = encoder

    def training_step(self, batch, batch_idx):
        features = self.text_encoder.encode(batch["caption"]).to(self.device)
        batch = batch | {"text_features": features, "wrong_text_features": features.roll(1, dims=0)}
        return super().training_step(batch, batch_idx)


def bare_loop(batch: dict, steps: int) -> float:
    """Manual D-then-G steps with the module's own loss functions and no Trainer around them."""
    from src.modules.gan_losses import discriminator_loss, generator_loss

    model = make_gan()
    opt_g, opt_d = (
        torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999))
        for m in (model.generator, model.discriminator)
    )
    start = time.perf_counter()
    for _ in range(steps):
        real, right, wrong = batch["image"], batch["text_features"], batch["wrong_text_features"]
        fake = model.generator(torch.randn(len(real), 100), right)
        real_logits, real_features = model.discriminator(real, right)
        terms = discriminator_loss(
            real_logits,
            model.discriminator(real, wrong)[0],
            model.discriminator(fake.detach(), right)[0],
            0.9,
        )
        opt_d.zero_grad()
        terms["d_loss"].backward()
        opt_d.step()
        model.discriminator.requires_grad_(
            False
        )  # as Lightning's toggle_optimizer: no D weight grads in G's step
        fake_logits, fake_features = model.discriminator(fake, right)
        g_terms = generator_loss(fake_logits, real_features.detach(), fake_features, 1.0)
        opt_g.zero_grad()
        g_terms["g_loss"].backward()
        opt_g.step()
        model.discriminator.requires_grad_(True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw, features = Path(tmp) / "raw", Path(tmp) / "features"
        generate_synthetic_dataset(raw, num_samples=args.samples, seed=0, split_fractions=(1.0, 0.0, 0.0))
        encoder = CaptionEncoder(**ENCODER, tokenizer=str(raw / "tokenizer"))
        precompute_text_features(str(raw / "train-*.tar"), features, encoder, progress=False)
        common = dict(
            batch_size=32, num_workers=0, preprocess={"image_size": 64}, train_samples=32 * args.batches
        )
        precomputed = WebtoonShardDataModule(root=str(features), text_features=True, **common)
        raw_captions = WebtoonShardDataModule(root=str(raw), **common)

        fit_seconds(make_gan(), precomputed.train_dataloader(), 3)  # warm-up: allocator, kernels, imports
        with_features = fit_seconds(make_gan(), precomputed.train_dataloader(), args.batches)
        on_the_fly = fit_seconds(
            EncodeOnTheFly(encoder, **make_gan_kwargs()), raw_captions.train_dataloader(), args.batches
        )
        print(f"epoch of {args.batches} batches, precomputed vectors : {with_features:6.2f} s")
        print(
            f"epoch of {args.batches} batches, encoding on the fly : {on_the_fly:6.2f} s  ratio {on_the_fly / with_features:.2f}x"
        )

        batch = next(iter(precomputed.train_dataloader()))
        lightning = fit_seconds(make_gan(), DataLoader([batch] * args.batches, batch_size=None), args.batches)
        lightning /= args.batches
        bare = bare_loop(batch, args.batches)
        print(f"bare PyTorch D+G step : {bare * 1000:7.1f} ms")
        print(
            f"Lightning D+G step    : {lightning * 1000:7.1f} ms  ratio {lightning / bare:.2f}x (includes Trainer start-up)"
        )


def make_gan_kwargs() -> dict:
    torch.manual_seed(0)
    return {
        "generator": {"text_dim": 768, "base_channels": 32},
        "discriminator": {"text_dim": 768, "base_channels": 32},
    }


if __name__ == "__main__":
    main()
