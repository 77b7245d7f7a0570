"""FID / IS with the demo extractor, the Lightning callbacks, the Inception weights error, captioned grids."""

from __future__ import annotations

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
from src.demo.feature_extractor import SmallFeatureExtractor
from src.metrics.image_quality import (
    INCEPTION_WEIGHTS_FILE,
    FeatureOutput,
    ImageQuality,
    MissingInceptionWeightsError,
    SeededInceptionScore,
    build_inception,
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
    metric = ImageQuality(SmallFeatureExtractor(), splits=4)
    images = solid_colours(40)
    metric.update(images, real=True)
    metric.update(images, real=False)
    same = metric.compute()
    assert abs(float(same["fid"])) < 1e-3

    metric.reset()
    metric.update(images, real=True)
    metric.update(noise_images(40), real=False)
    different = metric.compute()
    assert float(different["fid"]) > 0.1
    # The extractor is deterministic: a second one gives the same numbers.
    again = ImageQuality(SmallFeatureExtractor(), splits=4)
    again.update(images, real=True)
    again.update(noise_images(40), real=False)
    torch.testing.assert_close(again.compute()["fid"], different["fid"])


def test_extractor_as_torchmetrics_feature_accepts_uint8_and_float():
    extractor = SmallFeatureExtractor()
    images = noise_images(8)
    # normalize=True: float [0, 1] goes to the custom module unchanged; normalize=False: uint8.
    as_float = FrechetInceptionDistance(feature=FeatureOutput(extractor), normalize=True)
    as_uint8 = FrechetInceptionDistance(feature=FeatureOutput(extractor), normalize=False)
    as_float.update(images.float() / 255, real=True)
    as_float.update(solid_colours(8).float() / 255, real=False)
    as_uint8.update(images, real=True)
    as_uint8.update(solid_colours(8), real=False)
    torch.testing.assert_close(as_float.compute(), as_uint8.compute(), rtol=1e-4, atol=1e-4)
    # The logits output serves torchmetrics' IS: one split gives exp(E_x KL(p(y|x) || p(y))) of those logits.
    inception_score = SeededInceptionScore(FeatureOutput(extractor, "logits"), splits=1)
    inception_score.update(images)
    log_p = extractor(images)[1].double().log_softmax(dim=1)
    log_marginal = log_p.exp().mean(dim=0).log()
    expected = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean().exp()
    torch.testing.assert_close(inception_score.compute()[0].double(), expected, rtol=1e-4, atol=1e-4)


def test_inception_score_clips_splits_to_sample_count():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    scores = []
    for splits in (10, 2):  # 5 images allow at most 2 splits of >= 2 images
        metric = SeededInceptionScore(nn.Identity(), splits=splits)
        metric.update(logits)
        scores.append(metric.compute())
    torch.testing.assert_close(scores[0], scores[1])
    assert torch.isfinite(scores[0][1]) and float(scores[0][1]) > 0  # two splits: a spread


def test_inception_without_weights_raises_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(MissingInceptionWeightsError) as error:
        build_inception()
    message = str(error.value)
    assert "callbacks.image_quality.weights_path=" in message and INCEPTION_WEIGHTS_FILE in message
    assert "https://github.com/toshas/torch-fidelity/releases" in message
    with pytest.raises(MissingInceptionWeightsError, match="does not exist"):
        build_inception(weights_path=tmp_path / "nowhere.pth")
    bogus = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"not": torch.zeros(1)}, bogus)
    with pytest.raises(MissingInceptionWeightsError, match="not the torch-fidelity Inception"):
        build_inception(weights_path=bogus)
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
    extractor = build_inception(weights_path=weights)
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
    callback = ImageQualityMetrics(
        feature_extractor=SmallFeatureExtractor(), every_n_epochs=2, splits=3, max_samples=10
    )
    trainer = tiny_trainer(tmp_path, [callback], logger=logger, max_epochs=2)
    trainer.fit(ToyGenerator(), train_dataloaders=loader(), val_dataloaders=loader())
    logged = [set(m) for m in logger.history if "epoch" in m]
    with_fid = [keys for keys in logged if "val/fid" in keys]
    assert len(with_fid) == 1 and {"val/is", "val/is_std"} <= with_fid[0]
    # tanh-squashed linear images are not the real noise images
    assert float(trainer.callback_metrics["val/fid"]) > 0.1
    note = callback.report_notes()[0]
    assert "SmallFeatureExtractor" in note and "never with published" in note
    assert int(callback._metrics["val"].fid.fake_features_num_samples) == 0  # reset after logging

    trainer.test(ToyGenerator(), dataloaders=loader(), verbose=False)
    assert {"test/fid", "test/is", "test/is_std"} <= set(trainer.callback_metrics)


class SolidColours:
    """A text-to-image model whose images depend only on the seed: every caption row must be the same."""

    def __call__(self, captions, num_images_per_prompt=1, seed=0, on_step=None):
        colours = torch.rand(num_images_per_prompt, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
        return colours.expand(-1, 3, 16, 16).unsqueeze(0).repeat(len(captions), 1, 1, 1, 1)


def test_sample_grid_prints_each_caption_beside_its_row(tmp_path, monkeypatch):
    from src.utils.image_grid import captioned_grid

    captions = ["a large red circle", "큰 빨간 원", "a small blue square"]
    grid = CaptionSampleGrid(captions, num_per_caption=4, seed=7)
    # the grid draws through the project's loader; what it draws is not this test's subject
    monkeypatch.setattr("src.callbacks.sample_grid.text_to_image_for", lambda module: SolidColours())
    trainer = tiny_trainer(tmp_path / "run", [grid])
    trainer.fit(ToyGenerator(), train_dataloaders=loader(), val_dataloaders=loader())

    path = tmp_path / "run" / "samples" / "epoch_000.png"
    assert grid.last_path == path and path.exists()
    image = np.array(Image.open(path).convert("RGB")).astype(int)
    expected = captioned_grid(list(SolidColours()(captions, 4, seed=7)), captions)
    assert image.shape == np.array(expected).shape
    np.testing.assert_array_equal(image, np.array(expected))
    # Geometry of captioned_grid: caption column 260 px, cells of 128 px with 4 px padding.
    rows = [image[4 + r * 132 : 132 + r * 132, 264:] for r in range(3)]
    assert (rows[0] == rows[1]).all() and (rows[1] == rows[2]).all()  # same noise in every row
    captions_area = [image[4 + r * 132 : 132 + r * 132, :260] for r in range(3)]
    assert all((area < 128).any() for area in captions_area)  # text is drawn beside every row
    assert not (captions_area[0] == captions_area[1]).all()


def test_hangul_captions_render_as_glyphs_not_boxes():
    from src.utils.image_grid import caption_font, font_path

    assert font_path() is not None and font_path().endswith("NanumGothic.ttf")
    from PIL import ImageDraw

    font = caption_font(20)

    def render(text: str) -> np.ndarray:
        canvas = Image.new("L", (40, 40), 0)
        ImageDraw.Draw(canvas).text((5, 5), text, fill=255, font=font)
        return np.array(canvas)

    masks = [render(text) for text in ("원", "빨", "큰")]
    # A font without Hangul draws the same missing-glyph box for every syllable.
    assert all(mask.sum() > 0 for mask in masks)
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


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
        metric = ImageQuality(SmallFeatureExtractor(), splits=2)
        metric.update(diverse, real=True)
        metric.update(fake, real=False)
        scores.append(metric.compute()["is"])
    assert scores[0] > 1.2 and scores[1] == pytest.approx(1.0, abs=1e-3)
