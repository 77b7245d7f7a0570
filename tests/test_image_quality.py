"""FID / IS with the offline extractor, the Lightning callbacks, the Inception weights error, and generate.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from src.callbacks.image_quality import ImageQualityMetrics
from src.callbacks.sample_grid import CaptionSampleGrid
from src.metrics.image_quality import (
    INCEPTION_WEIGHTS_FILE,
    FeatureOutput,
    ImageQuality,
    MissingInceptionWeightsError,
    SeededInceptionScore,
    build_feature_extractor,
)

ROOT = Path(__file__).resolve().parents[1]


def solid_colours(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` single-colour uint8 images."""
    colours = torch.randint(
        0, 256, (n, 3, 1, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    return colours.expand(n, 3, size, size).contiguous()


def noise_images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_small_extractor_fid_and_is():
    metric = ImageQuality(build_feature_extractor("small"), splits=4)
    images = solid_colours(40)
    metric.update(images, real=True)
    metric.update(images, real=False)
    same = metric.compute()
    assert abs(float(same["fid"])) < 1e-3
    assert float(same["is"]) >= 1.0 and float(same["is_std"]) >= 0.0

    metric.reset()
    metric.update(images, real=True)
    metric.update(noise_images(40), real=False)
    different = metric.compute()
    assert float(different["fid"]) > 0.1
    # The extractor is deterministic: a second one gives the same numbers.
    again = ImageQuality(build_feature_extractor("small"), splits=4)
    again.update(images, real=True)
    again.update(noise_images(40), real=False)
    torch.testing.assert_close(again.compute()["fid"], different["fid"])


def test_extractor_as_torchmetrics_feature_accepts_uint8_and_float():
    extractor = build_feature_extractor("small")
    images = noise_images(8)
    # normalize=True: float [0, 1] goes to the custom module unchanged; normalize=False: uint8.
    as_float = FrechetInceptionDistance(feature=FeatureOutput(extractor), normalize=True)
    as_uint8 = FrechetInceptionDistance(feature=FeatureOutput(extractor), normalize=False)
    as_float.update(images.float() / 255, real=True)
    as_float.update(solid_colours(8).float() / 255, real=False)
    as_uint8.update(images, real=True)
    as_uint8.update(solid_colours(8), real=False)
    torch.testing.assert_close(as_float.compute(), as_uint8.compute(), rtol=1e-4, atol=1e-4)
    # torchmetrics' IS casts normalised floats to uint8 itself; the logits output serves it.
    inception_score = SeededInceptionScore(FeatureOutput(extractor, "logits"), splits=2)
    inception_score.update(images)
    assert float(inception_score.compute()[0]) >= 1.0


def test_inception_score_clips_splits_to_sample_count():
    metric = SeededInceptionScore(nn.Identity(), splits=10)
    metric.update(torch.randn(5, 10, generator=torch.Generator().manual_seed(0)))
    mean, std = metric.compute()
    assert torch.isfinite(mean) and torch.isfinite(std) and float(mean) >= 1.0


def test_inception_without_weights_raises_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(MissingInceptionWeightsError) as error:
        build_feature_extractor("inception")
    message = str(error.value)
    assert "callbacks.image_quality.weights_path=" in message and INCEPTION_WEIGHTS_FILE in message
    assert "https://github.com/toshas/torch-fidelity/releases" in message
    with pytest.raises(MissingInceptionWeightsError, match="does not exist"):
        build_feature_extractor("inception", weights_path=tmp_path / "nowhere.pth")
    bogus = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"not": torch.zeros(1)}, bogus)
    with pytest.raises(MissingInceptionWeightsError, match="not the torch-fidelity Inception"):
        build_feature_extractor("inception", weights_path=bogus)
    # The callback fails at setup, before any training epoch.
    with pytest.raises(MissingInceptionWeightsError, match="weights_path"):
        ImageQualityMetrics(feature_extractor="inception").setup(None, None, "fit")


def test_inception_loads_a_local_weights_file(tmp_path, monkeypatch):
    """A state dict in torch-fidelity's layout (random values here) loads from weights_path and runs."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as patch:
        patch.setattr(tf_inception.torch, "load", lambda *a, **k: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        random_net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused")
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(random_net.state_dict(), weights)
    extractor = build_feature_extractor("inception", weights_path=weights)
    # The reference resize to 299 px costs seconds on a CPU; 75 px (Inception's minimum) checks the same wiring.
    extractor.net.INPUT_IMAGE_SIZE = 75
    features, logits = extractor(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    extractor.train()
    assert not extractor.training


class RecordingLogger(Logger):
    """Keeps every logged metric dict, to see which epochs logged what."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.history.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class ToyGenerator(LightningModule):
    """Images from a linear layer; validation/test return {"real", "fake"} in [-1, 1] like the GAN module."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3 * 16 * 16)

    def training_step(self, batch, batch_idx):
        return self.layer(torch.randn(2, 4)).pow(2).mean()

    def _images(self, batch):
        real = batch[0]
        fake = torch.tanh(self.layer(torch.randn(real.shape[0], 4, device=self.device))).view(-1, 3, 16, 16)
        return {"real": real, "fake": fake}

    def validation_step(self, batch, batch_idx):
        return self._images(batch)

    def test_step(self, batch, batch_idx):
        return self._images(batch)

    def generate(self, text_features, noise=None, generator=None):
        # A solid colour per sample drawn from `generator`: rows of the grid share noise, so they must match.
        colours = torch.rand(text_features.shape[0], 3, 1, 1, generator=generator) * 2 - 1
        return colours.expand(-1, 3, 16, 16).to(text_features.device)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 12, batch_size: int = 4):
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(TensorDataset(images), batch_size=batch_size)


def tiny_trainer(tmp_path, callbacks, logger=None, max_epochs=1) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        num_sanity_val_steps=0,
    )


def test_callback_logs_fid_and_is_on_its_epochs(tmp_path):
    logger = RecordingLogger()
    callback = ImageQualityMetrics(feature_extractor="small", every_n_epochs=2, splits=3, max_samples=10)
    trainer = tiny_trainer(tmp_path, [callback], logger=logger, max_epochs=2)
    trainer.fit(ToyGenerator(), train_dataloaders=loader(), val_dataloaders=loader())
    logged = [set(m) for m in logger.history if "epoch" in m]
    with_fid = [keys for keys in logged if "val/fid" in keys]
    assert len(with_fid) == 1 and {"val/is", "val/is_std"} <= with_fid[0]
    assert float(trainer.callback_metrics["val/fid"]) > 0 and float(trainer.callback_metrics["val/is"]) >= 1
    assert int(callback._metrics["val"].fid.fake_features_num_samples) == 0  # reset after logging

    trainer.test(ToyGenerator(), dataloaders=loader(), verbose=False)
    assert {"test/fid", "test/is", "test/is_std"} <= set(trainer.callback_metrics)


def write_tokenizer(directory: Path, captions: list[str]) -> str:
    from transformers import BertTokenizer

    chars = sorted({ch for caption in captions for ch in caption if not ch.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{ch}" for ch in chars]]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer.from_pretrained(str(directory), do_lower_case=False).save_pretrained(str(directory))
    return str(directory)


TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def test_sample_grid_writes_png_rows_per_caption(tmp_path):
    captions = ["a large red circle", "큰 빨간 원", "a small blue square"]
    encoder = {
        "name_or_path": None,
        "config": TINY_BERT,
        "tokenizer": write_tokenizer(tmp_path / "tok", captions),
    }
    grid = CaptionSampleGrid(captions, encoder=encoder, num_per_caption=4, seed=7)
    trainer = tiny_trainer(tmp_path / "run", [grid])
    trainer.fit(ToyGenerator(), train_dataloaders=loader(), val_dataloaders=loader())

    path = tmp_path / "run" / "samples" / "epoch_000.png"
    assert grid.last_path == path and path.exists()
    image = Image.open(path)
    # make_grid with padding 2: 4 columns and 3 rows of 16-pixel images.
    assert image.size == (4 * (16 + 2) + 2, 3 * (16 + 2) + 2)
    pixels = torch.from_numpy(np.array(image.convert("RGB")))
    rows = [pixels[2 + r * 18 : 18 + r * 18] for r in range(3)]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[1], rows[2])  # same noise in every row
    assert path.with_suffix(".txt").read_text(encoding="utf-8").splitlines()[1] == "row 1: 큰 빨간 원"


class ToyGAN(LightningModule):
    """Stands in for TextToWebtoonGAN: networks passed in, rebuilt from `_target_` configs by generate.py."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, noise_dim: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator"])
        self.generator = generator
        self.discriminator = discriminator

    def generate(self, text_features, noise=None, generator=None):
        if noise is None:
            noise = torch.randn(text_features.shape[0], self.hparams.noise_dim, generator=generator)
        out = self.generator(torch.cat([noise.to(text_features), text_features], dim=1))
        return torch.tanh(out).view(-1, 3, 8, 8)


def test_generate_from_checkpoint(tmp_path, monkeypatch):
    import lightning
    from hydra import compose, initialize_config_dir

    from src.data.schema import WebtoonSample
    from src.data.shards import write_shards
    from src.data.text_features import TextFeatureEncoder, precompute_text_features

    captions = ["a large red circle", "큰 빨간 원"]
    tokenizer = write_tokenizer(tmp_path / "tok", captions)
    shards = tmp_path / "shards"
    sample = WebtoonSample("k0", Image.new("RGB", (8, 8)), captions_en=captions[:1], captions_ko=captions[1:])
    write_shards([sample], shards, "train")
    features = tmp_path / "features"
    encoder = TextFeatureEncoder(None, config=TINY_BERT, tokenizer=tokenizer, seed=5)
    precompute_text_features(str(shards / "train-000000.tar"), features, encoder, progress=False)

    g_cfg = {"_target_": "torch.nn.Linear", "in_features": 4 + 32, "out_features": 3 * 8 * 8}
    d_cfg = {"_target_": "torch.nn.Linear", "in_features": 3 * 8 * 8, "out_features": 1}
    module = ToyGAN(nn.Linear(36, 192), nn.Linear(192, 1))
    checkpoint = tmp_path / "toy.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": {**module.hparams, "generator": g_cfg, "discriminator": d_cfg},
            "pytorch-lightning_version": lightning.__version__,
        },
        checkpoint,
    )

    monkeypatch.syspath_prepend(str(ROOT))
    from generate import generate_from_config

    overrides = [
        f"ckpt_path={checkpoint}",
        'captions=["a large red circle", "큰 빨간 원"]',
        f"out_dir={tmp_path / 'out'}",
        f"features_dir={features}",
        "num_per_caption=2",
        "device=cpu",
        f"module_class={__name__}.ToyGAN",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=overrides)
    files = generate_from_config(cfg)
    assert files == {
        "000_0.png": captions[0],
        "000_1.png": captions[0],
        "001_0.png": captions[1],
        "001_1.png": captions[1],
    }
    assert json.loads((tmp_path / "out" / "captions.json").read_text(encoding="utf-8")) == files
    assert Image.open(tmp_path / "out" / "001_1.png").size == (8, 8)
    # Same weights, same encoder, same seed: identical images on a second run.
    first = (tmp_path / "out" / "000_0.png").read_bytes()
    generate_from_config(cfg)
    assert (tmp_path / "out" / "000_0.png").read_bytes() == first


def test_small_extractor_inception_score_separates_diverse_from_identical_images(synthetic_dir):
    """The demo IS must move: varied drawings score well above a set of one repeated image."""
    import io
    import tarfile

    from torchvision.transforms.functional import pil_to_tensor

    from src.metrics.image_quality import ImageQuality

    images = []
    with tarfile.open(next(synthetic_dir.glob("train-*.tar"))) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                images.append(
                    pil_to_tensor(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                )
    diverse = torch.stack(images[:24])
    repeated = diverse[:1].expand(24, -1, -1, -1)
    scores = []
    for fake in (diverse, repeated):
        metric = ImageQuality(build_feature_extractor("small"), splits=2)
        metric.update(diverse, real=True)
        metric.update(fake, real=False)
        scores.append(metric.compute()["is"])
    assert scores[0] > 1.2 and scores[1] == pytest.approx(1.0, abs=1e-3)
