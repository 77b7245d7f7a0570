"""DCGAN text-to-webtoon (thesis chapter III): networks, GAN-INT-CLS loss terms and the Lightning training loop."""

import functools
import math

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from src.modules.dcgan_module import TextToWebtoonGAN
from src.modules.gan_losses import discriminator_loss, generator_loss, interpolate_text, mode_seeking_loss
from src.modules.networks import WebtoonDiscriminator, WebtoonGenerator

TEXT_DIM = 32
NOISE_DIM = 100
BATCH = 4
TINY = {"text_embed_dim": 16, "base_channels": 8}


def make_generator(**overrides) -> WebtoonGenerator:
    return WebtoonGenerator(TEXT_DIM, noise_dim=NOISE_DIM, **{**TINY, **overrides})


def make_discriminator(**overrides) -> WebtoonDiscriminator:
    return WebtoonDiscriminator(TEXT_DIM, **{**TINY, **overrides})


GENERATOR = {"text_dim": TEXT_DIM, "noise_dim": NOISE_DIM, **TINY}
DISCRIMINATOR = {"text_dim": TEXT_DIM, **TINY}


def make_module(**overrides) -> TextToWebtoonGAN:
    adam = functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))
    kwargs = {"optimizer_g": adam, "optimizer_d": adam, **overrides}
    return TextToWebtoonGAN(GENERATOR, DISCRIMINATOR, **kwargs)


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """What the data layer yields per sample; default_collate stacks tensors and lists the captions."""
    rng = torch.Generator().manual_seed(seed)
    texts = torch.randn(n, TEXT_DIM, generator=rng)
    return [
        {
            "image": torch.rand(3, 64, 64, generator=rng) * 2 - 1,
            "text_features": texts[i],
            "wrong_text_features": texts[(i + 1) % n],
            "caption": f"caption {i}",
            "key": f"{i:06d}",
        }
        for i in range(n)
    ]


def tiny_trainer(**overrides) -> lightning.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **overrides,
    }
    return lightning.Trainer(**options)


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    # For nets this small, intra-op threads cost more in synchronisation than they save (4× slower on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- networks


def test_networks_shapes_and_range():
    generator, discriminator = make_generator(), make_discriminator()
    noise, text = torch.randn(BATCH, NOISE_DIM), torch.randn(BATCH, TEXT_DIM)
    images = generator(noise, text)
    assert images.shape == (BATCH, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1

    logits, features = discriminator(images, text)
    assert logits.shape == (BATCH,)
    assert features.shape == (BATCH, discriminator.feature_dim) == (BATCH, 8 * TINY["base_channels"] * 16)


@pytest.mark.parametrize("conditioning", ["concat", "projection"])
def test_discriminator_scores_shared_image_features_as_separate_passes(conditioning):
    # The training step passes the real images once for their right and wrong captions.
    discriminator = make_discriminator(conditioning=conditioning).train()
    images, right, wrong = (
        torch.randn(BATCH, 3, 64, 64),
        torch.randn(BATCH, TEXT_DIM),
        torch.randn(BATCH, TEXT_DIM),
    )
    features = discriminator.image_blocks(images)
    torch.testing.assert_close(discriminator.score(features, right), discriminator(images, right)[0])
    torch.testing.assert_close(discriminator.score(features, wrong), discriminator(images, wrong)[0])
    assert not torch.allclose(discriminator.score(features, right), discriminator.score(features, wrong))


def test_projection_discriminator_reads_the_text_only_through_its_inner_product_with_pooled_features():
    discriminator = make_discriminator(conditioning="projection").eval()
    images, right, wrong = (
        torch.randn(BATCH, 3, 64, 64),
        torch.randn(BATCH, TEXT_DIM),
        torch.randn(BATCH, TEXT_DIM),
    )
    features = discriminator.image_blocks(images)
    pooled = features.mean(dim=(2, 3))
    text_difference = discriminator.text_projection(right) - discriminator.text_projection(wrong)
    torch.testing.assert_close(
        discriminator.score(features, right) - discriminator.score(features, wrong),
        (text_difference * pooled).sum(dim=1),
    )
    assert discriminator(images, right)[0].shape == (BATCH,)
    with pytest.raises(ValueError, match="conditioning must be"):
        make_discriminator(conditioning="film")


def test_networks_have_the_thesis_six_blocks_at_64px():
    generator, discriminator = make_generator(dropout=0.3), make_discriminator()
    assert len(generator.blocks) == 6
    for block in generator.blocks[:-1]:
        assert [type(layer) for layer in block] == [
            torch.nn.ConvTranspose2d,
            torch.nn.Dropout,
            torch.nn.BatchNorm2d,
            torch.nn.ReLU,
        ]
        assert block[1].p == 0.3
    assert isinstance(generator.blocks[-1][-1], torch.nn.Tanh)
    # 4 downsampling image blocks, the text-fusion block and the logit conv.
    assert len(discriminator.image_blocks) + 2 == 6


@pytest.mark.parametrize("image_size", [32, 64])
def test_nearest_upsampling_doubles_every_block_without_transposed_convolutions(image_size):
    generator = make_generator(upsampling="nearest", image_size=image_size)
    maps = [torch.randn(BATCH, NOISE_DIM + TINY["text_embed_dim"], 1, 1)]
    for block in generator.blocks:
        maps.append(block(maps[-1]))
    assert [m.shape[-1] for m in maps] == [2**i for i in range(len(maps))]
    assert maps[-1].shape == (BATCH, 3, image_size, image_size) and maps[-1].abs().max() <= 1
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in generator.modules())
    with pytest.raises(ValueError, match="upsampling must be one of"):
        make_generator(upsampling="bilinear")


def test_dcgan_init():
    generator = make_generator(base_channels=32)
    conv = generator.blocks[2][0].weight
    norm = generator.blocks[2][2].weight
    assert abs(conv.mean().item()) < 0.005 and conv.std().item() == pytest.approx(0.02, rel=0.1)
    assert norm.mean().item() == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------- loss terms


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_discriminator_loss_matches_hand_computation():
    real_right, real_wrong, fake_right = (
        torch.tensor([2.0, -1.0]),
        torch.tensor([0.5, 0.0]),
        torch.tensor([-3.0, 1.0]),
    )
    terms = discriminator_loss(real_right, real_wrong, fake_right, real_label=0.9)

    expected_real = (bce(2.0, 0.9) + bce(-1.0, 0.9)) / 2
    expected_wrong = (bce(0.5, 0.0) + bce(0.0, 0.0)) / 2
    expected_fake = (bce(-3.0, 0.0) + bce(1.0, 0.0)) / 2
    assert set(terms) == {"d_real", "d_wrong", "d_fake", "d_loss"}
    assert all(torch.isfinite(value) for value in terms.values())
    assert terms["d_real"].item() == pytest.approx(expected_real, rel=1e-6)
    assert terms["d_wrong"].item() == pytest.approx(expected_wrong, rel=1e-6)
    assert terms["d_fake"].item() == pytest.approx(expected_fake, rel=1e-6)
    assert terms["d_loss"].item() == pytest.approx(
        expected_real + (expected_wrong + expected_fake) / 2, rel=1e-6
    )


def test_label_smoothing_moves_the_optimum_of_d_real_to_the_smoothed_target():
    # With target 0.9 the real term is minimal where sigmoid(logit) = 0.9, not at +inf.
    logits = torch.linspace(-2, 6, 801).unsqueeze(1)
    losses = torch.stack([discriminator_loss(x, x, x, real_label=0.9)["d_real"] for x in logits])
    best = torch.sigmoid(logits[losses.argmin()]).item()
    assert best == pytest.approx(0.9, abs=0.01)


def test_generator_loss_terms():
    fake_logits = torch.tensor([0.0, 1.0])
    real_features, fake_features = (
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.tensor([[0.0, 0.0], [2.0, 2.0]]),
    )
    terms = generator_loss(fake_logits, real_features, fake_features, feature_matching_weight=0.5)

    g_adv = (bce(0.0, 1.0) + bce(1.0, 1.0)) / 2
    # Batch means (2, 3) and (1, 1): MSE = ((2-1)^2 + (3-1)^2) / 2 = 2.5.
    assert terms["g_adv"].item() == pytest.approx(g_adv, rel=1e-6)
    assert terms["g_feature_matching"].item() == pytest.approx(2.5)
    assert terms["g_loss"].item() == pytest.approx(g_adv + 0.5 * 2.5, rel=1e-6)

    disabled = generator_loss(fake_logits)
    assert set(disabled) == {"g_adv", "g_loss"} and disabled["g_loss"] == disabled["g_adv"]
    with pytest.raises(ValueError, match="feature matching"):
        generator_loss(fake_logits, feature_matching_weight=1.0)


def test_feature_matching_is_zero_for_equal_features():
    features = torch.randn(BATCH, 64)
    terms = generator_loss(torch.zeros(BATCH), features, features.clone(), feature_matching_weight=1.0)
    assert terms["g_feature_matching"].item() == 0.0


def test_interpolate_text_mixes_with_another_sample():
    text = torch.arange(12.0).reshape(4, 3)
    mixed = interpolate_text(text, beta=0.5)
    for i in range(4):
        assert torch.equal(mixed[i], (text[i] + text[i - 1]) / 2)
    assert torch.equal(interpolate_text(text, beta=1.0), text)


def test_discriminator_steps_lower_its_loss_on_a_fixed_batch():
    discriminator = make_discriminator()
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batch = torch.utils.data.default_collate(make_samples(BATCH))
    fake = torch.rand(BATCH, 3, 64, 64) * 2 - 1

    def d_loss() -> torch.Tensor:
        real_right, _ = discriminator(batch["image"], batch["text_features"])
        real_wrong, _ = discriminator(batch["image"], batch["wrong_text_features"])
        fake_right, _ = discriminator(fake, batch["text_features"])
        return discriminator_loss(real_right, real_wrong, fake_right, real_label=0.9)["d_loss"]

    losses = []
    for _ in range(20):
        loss = d_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------- LightningModule


class StepWatcher(Callback):
    """Records which parameters each optimizer step changed, through torch's optimizer step hooks."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, bool, bool]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        names = ["generator", "discriminator"]  # configure_optimizers order
        for name, optimizer in zip(names, trainer.optimizers, strict=True):
            optimizer.register_step_pre_hook(functools.partial(self._before, pl_module))
            optimizer.register_step_post_hook(functools.partial(self._after, pl_module, name))

    def _snapshot(self, net: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in net.parameters()]

    def _before(self, pl_module, optimizer, args, kwargs) -> None:
        self._g, self._d = self._snapshot(pl_module.generator), self._snapshot(pl_module.discriminator)

    def _after(self, pl_module, name, optimizer, args, kwargs) -> None:
        def changed(before, net):
            return any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))

        self.steps.append(
            (name, changed(self._g, pl_module.generator), changed(self._d, pl_module.discriminator))
        )


@pytest.mark.parametrize(("interpolation_weight", "mode_seeking_weight"), [(0.0, 0.0), (0.5, 1.0)])
def test_training_alternates_d_and_g_steps_and_logs_every_term(interpolation_weight, mode_seeking_weight):
    module = make_module(interpolation_weight=interpolation_weight, mode_seeking_weight=mode_seeking_weight)
    watcher = StepWatcher()
    loader = DataLoader(make_samples(2 * BATCH), batch_size=BATCH)
    # Manual optimisation counts each optimizer.step() as a global step: 4 steps = 2 batches.
    trainer = tiny_trainer(max_steps=4, limit_val_batches=0, callbacks=[watcher])
    trainer.fit(module, train_dataloaders=loader)

    assert [name for name, _, _ in watcher.steps] == ["discriminator", "generator"] * 2
    for name, generator_changed, discriminator_changed in watcher.steps:
        assert (generator_changed, discriminator_changed) == (name == "generator", name == "discriminator")

    expected = {
        f"train/{name}"
        for name in (
            "d_loss", "d_real", "d_wrong", "d_fake", "g_loss", "g_adv", "g_feature_matching",
            "d_real_prob", "d_wrong_prob", "d_fake_prob",
        )
    }  # fmt: skip
    if interpolation_weight:
        expected.add("train/g_interpolated")
    if mode_seeking_weight:
        expected.add("train/g_mode_seeking")
    assert set(trainer.callback_metrics) == expected
    assert all(torch.isfinite(value) for value in trainer.callback_metrics.values())
    assert module.generator.training and module.discriminator.training


class OutputCollector(Callback):
    def __init__(self) -> None:
        self.outputs: list[dict[str, torch.Tensor]] = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.outputs.append(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.outputs.append(outputs)


def test_validation_and_test_return_real_and_fake_reproducibly():
    module = make_module()
    loader = DataLoader(make_samples(2 * BATCH), batch_size=BATCH)
    first, second = OutputCollector(), OutputCollector()
    val_metrics = tiny_trainer(callbacks=[first]).validate(module, dataloaders=loader, verbose=False)
    tiny_trainer(callbacks=[second]).test(module, dataloaders=loader, verbose=False)

    assert {"val/d_loss", "val/g_loss", "val/d_real_prob", "val/d_fake_prob"} <= set(val_metrics[0])
    assert len(first.outputs) == 2
    for a, b, batch in zip(first.outputs, second.outputs, loader, strict=True):
        assert torch.equal(a["real"], batch["image"])
        assert a["fake"].shape == (BATCH, 3, 64, 64) and a["fake"].abs().max() <= 1
        # Noise is seeded per batch index, so every evaluation sees the same images.
        assert torch.equal(a["fake"], b["fake"])
    assert not torch.equal(first.outputs[0]["fake"], first.outputs[1]["fake"])


def test_generate_is_deterministic_per_noise_and_restores_training_mode():
    module = make_module()
    text = torch.randn(BATCH, TEXT_DIM)
    module.train()

    first = module.generate(text, noise=module.sample_noise(BATCH, seed=7))
    again = module.generate(text, noise=module.sample_noise(BATCH, seed=7))
    other = module.generate(text, noise=module.sample_noise(BATCH, seed=8))

    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (BATCH, 3, 64, 64) and first.abs().max() <= 1 and not first.requires_grad
    assert module.generator.training


def test_match_logits_are_the_discriminators_in_eval_mode_and_restore_training_mode():
    module = make_module()
    images, text = torch.rand(BATCH, 3, 64, 64) * 2 - 1, torch.randn(BATCH, TEXT_DIM)
    module.train()

    logits = module.match_logits(images, text)

    module.discriminator.eval()
    assert torch.equal(logits, module.discriminator(images, text)[0])
    assert logits.shape == (BATCH,) and not logits.requires_grad
    module.train()
    module.match_logits(images, text)
    assert module.discriminator.training


def test_mode_seeking_loss_is_large_for_identical_drawings_and_falls_as_they_differ():
    noise_a, noise_b = torch.zeros(2, 8), torch.ones(2, 8)
    image = torch.zeros(2, 3, 4, 4)
    assert mode_seeking_loss(image, image, noise_a, noise_b) == pytest.approx(1e5)
    assert mode_seeking_loss(image, image + 0.5, noise_a, noise_b) == pytest.approx(2.0, rel=1e-4)
    assert mode_seeking_loss(image, image + 1.0, noise_a, noise_b) == pytest.approx(1.0, rel=1e-4)


def test_hparams_and_optimizers():
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    module = make_module(label_smoothing=0.2, optimizer_d=sgd)
    assert module.noise_dim == NOISE_DIM and module.real_label == pytest.approx(0.8)
    assert not {"optimizer_g", "optimizer_d"} & set(module.hparams)
    assert module.hparams.generator == GENERATOR and module.preprocess.image_size == 64
    opt_g, opt_d = module.configure_optimizers()
    assert {id(p) for p in opt_g.param_groups[0]["params"]} == {id(p) for p in module.generator.parameters()}
    assert {id(p) for p in opt_d.param_groups[0]["params"]} == {
        id(p) for p in module.discriminator.parameters()
    }
    assert opt_g.defaults["betas"] == (0.5, 0.999) and isinstance(opt_d, torch.optim.SGD)
    # Without optimizers (loading only to generate) the thesis' Adam is used.
    default_g, _ = TextToWebtoonGAN(GENERATOR, DISCRIMINATOR).configure_optimizers()
    assert default_g.defaults["lr"] == 2e-4 and default_g.defaults["betas"] == (0.5, 0.999)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_module(label_smoothing=1.0)
    with pytest.raises(ValueError, match="preprocess.image_size"):
        make_module(preprocess={"image_size": 32})


def test_checkpoint_resumes_and_loads_with_weights_only(tmp_path):
    # torch.load defaults to weights_only=True: the hparams must hold plain values only.
    loader = DataLoader(make_samples(BATCH), batch_size=BATCH)
    module = make_module(label_smoothing=0.2)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)

    torch.load(path, weights_only=True)  # plain containers and tensors only
    # The networks are rebuilt from their keyword arguments in the checkpoint's hparams.
    loaded = TextToWebtoonGAN.load_from_checkpoint(path, weights_only=True)
    assert loaded.hparams.label_smoothing == 0.2 and isinstance(loaded.generator, WebtoonGenerator)
    text = torch.randn(2, TEXT_DIM)
    assert torch.equal(
        module.generate(text, module.sample_noise(2)), loaded.generate(text, loaded.sample_noise(2))
    )

    resumed = tiny_trainer(max_steps=4, limit_val_batches=0)
    resumed.fit(make_module(label_smoothing=0.2), train_dataloaders=loader, ckpt_path=path)
    assert resumed.global_step == 4
