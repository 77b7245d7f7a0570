"""ControlNet training: Canny control images (on the fly and precomputed into shards), the ControlNet's zero start,
training that moves only the ControlNet, the edge-agreement judge, and experiment=controlnet_* as run, their
exports loaded by diffusers."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra_runs import CONTROLNET_EXPERIMENTS, compose_config
from PIL import Image, ImageDraw
from tiny_sd import build_tiny_stable_diffusion

PROMPT = "a red pentagon"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A text-to-image base like the demo's: factor-2 VAE, 32 px images, 16 x 16 latents."""
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def canny():
    from src.data.controls import CannyDetector

    return CannyDetector()


def controlnet_module(base: Path, **settings):
    from src.modules.diffusion.controlnet import ControlNetTraining

    torch.manual_seed(0)
    return ControlNetTraining(base, **settings)


def square_image(size: int = 32, low: int = 8, high: int = 23) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).rectangle([low, low, high, high], fill=(215, 30, 30))
    return image


def square_outline(size: int = 32, low: int = 8, high: int = 23) -> np.ndarray:
    outline = np.zeros((size, size), dtype=bool)
    outline[low : high + 1, [low, high]] = True
    outline[[low, high], low : high + 1] = True
    return outline


def demo_batch(count: int, canny) -> dict:
    from src.demo.edges import SyntheticEdgesDataset, collate

    dataset = SyntheticEdgesDataset("train", count, 32, canny)
    return collate([dataset[i] for i in range(count)])


# --- control images --------------------------------------------------------------------------------------------


def test_canny_control_of_a_drawn_shape_is_white_on_its_outline_and_black_elsewhere(canny):
    from src.demo.control_following import dilated

    control = canny(square_image())
    assert control.mode == "RGB" and control.size == (32, 32)
    pixels = np.asarray(control)
    assert set(np.unique(pixels)) == {0, 255} and (pixels == pixels[..., :1]).all()
    edges, outline = pixels[..., 0] == 255, square_outline()
    near_outline = dilated(outline, 1)
    assert not (edges & ~near_outline).any()  # nothing inside the square or on the background
    # every pixel of the outline has an edge next to it: the whole outline is drawn
    assert (outline & dilated(edges, 1)).sum() == outline.sum()


def test_canny_thresholds_out_of_order_are_refused():
    from src.data.controls import CannyDetector

    with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
        CannyDetector(low_threshold=200, high_threshold=100)


@pytest.fixture
def shards(tmp_path) -> Path:
    """Five drawn scenes in two shards, and a third shard holding one more and a record whose image is broken."""
    from src.data.shards import write_shards
    from src.demo.synthetic import synthetic_sample

    out = tmp_path / "shards"
    write_shards([synthetic_sample("train", i, image_size=32) for i in range(5)], out, "train", 3, "png")
    good = synthetic_sample("train", 5, image_size=32).to_record("png")
    with wds.TarWriter(str(out / "train-000002.tar"), encoder=False, mtime=0) as sink:
        sink.write({**good, "__key__": "train_0000005"})
        sink.write({**good, "__key__": "broken", "png": b"not a png"})
    return out


def test_control_shards_hold_a_control_per_record_resume_per_shard_and_count_corrupt_records(
    shards, tmp_path, canny
):
    from src.data.controls import CONTROL_KEY, CannyDetector, write_control_shards
    from src.data.pipeline import decode_record
    from src.data.shards import read_records, read_sizes

    out = tmp_path / "controls"
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        stats = write_control_shards(str(shards / "train-*.tar"), out, canny, progress=False)
    assert (stats["shards_written"], stats["samples_written"], stats["samples_corrupt"]) == (3, 6, 1)
    assert stats["corrupt"] == {"bad_image": 1} and read_sizes(out) == {"train": 6}
    keys = []
    for path in sorted(out.glob("train-*.tar")):
        for record in read_records(path):
            control = Image.open(io.BytesIO(record[CONTROL_KEY]))
            assert np.array_equal(np.asarray(control), np.asarray(canny(decode_record(record).image)))
            keys.append(record["__key__"])
    assert keys == [f"train_{i:07d}" for i in range(6)]

    # resumed: finished shards are kept, the missing one is written again, byte for byte
    written = (out / "train-000001.tar").read_bytes()
    (out / "train-000001.tar").unlink()
    again = write_control_shards(str(shards / "train-*.tar"), out, canny, progress=False)
    assert (again["shards_skipped"], again["shards_written"], again["samples_written"]) == (2, 1, 2)
    assert (out / "train-000001.tar").read_bytes() == written and read_sizes(out) == {"train": 6}
    with pytest.raises(ValueError, match="already holds controls of CannyDetector"):
        write_control_shards(str(shards / "train-*.tar"), out, CannyDetector(50, 150), progress=False)


def test_batches_read_the_precomputed_controls_as_the_detector_makes_them_on_the_fly(shards, tmp_path, canny):
    from src.data.controls import ControlShardDataModule, write_control_shards

    out = tmp_path / "controls"
    with pytest.warns(UserWarning):
        write_control_shards(str(shards / "train-*.tar"), out, canny, progress=False)
    settings = {"resolution": 32, "batch_size": 4, "num_workers": 0}
    precomputed = ControlShardDataModule(val_shards=str(out / "train-*.tar"), detector=None, **settings)
    on_the_fly = ControlShardDataModule(val_shards=str(shards / "train-*.tar"), detector=canny, **settings)
    batches = {}
    for name, datamodule in (("precomputed", precomputed), ("on the fly", on_the_fly)):
        batches[name] = [datamodule.on_after_batch_transfer(b, 0) for b in datamodule.val_dataloader()]
    first, second = batches["precomputed"], batches["on the fly"]
    assert (
        [b["key"] for b in first]
        == [b["key"] for b in second]
        == [
            [f"train_{i:07d}" for i in range(4)],
            ["train_0000004", "train_0000005"],
        ]
    )
    for a, b in zip(first, second, strict=True):
        assert a["pixel_values"].shape == a["control"].shape == (len(a["key"]), 3, 32, 32)
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["control"], b["control"])
        assert a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1
        assert set(a["control"].unique().tolist()) == {0.0, 1.0}
        assert all(isinstance(caption, str) and caption for caption in a["captions"])
    assert dict(on_the_fly.skipped) == {"bad_image": 1} and not precomputed.skipped


def test_demo_items_are_the_synthetic_samples_of_the_same_index_with_their_edges(canny):
    from torchvision.transforms.functional import pil_to_tensor

    from src.demo.edges import SyntheticEdgesDataModule, SyntheticEdgesDataset
    from src.demo.synthetic import synthetic_sample

    datamodule = SyntheticEdgesDataModule(image_size=32, detector=canny, batch_size=4, num_samples=50)
    assert {split: len(d) for split, d in datamodule.datasets.items()} == {"train": 40, "val": 5, "test": 5}
    again = SyntheticEdgesDataset("test", 5, 32, canny)
    for index in range(5):
        item, sample = datamodule.datasets["test"][index], synthetic_sample("test", index, image_size=32)
        torch.testing.assert_close(item["pixel_values"], pil_to_tensor(sample.image).float() / 127.5 - 1)
        torch.testing.assert_close(item["control"], pil_to_tensor(canny(sample.image)).float() / 255)
        assert item["caption"] in sample.captions_en and item["caption"] == again[index]["caption"]
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["pixel_values"].shape == batch["control"].shape == (4, 3, 32, 32)
    assert len(batch["captions"]) == 4 and batch["cache_key"].shape == (4,)


# --- the ControlNet ------------------------------------------------------------------------------------------


def test_the_control_image_encoder_follows_the_vae_factor():
    from src.modules.diffusion.controlnet import conditioning_channels_for

    def vae(*widths):
        return SimpleNamespace(config=SimpleNamespace(block_out_channels=list(widths)))

    assert conditioning_channels_for(vae(16, 32)) == (16, 32)  # the demo base: factor 2
    assert conditioning_channels_for(vae(128, 256, 512, 512)) == (16, 32, 96, 256)  # SD: factor 8, diffusers'
    assert conditioning_channels_for(vae(16, 32), [8, 24]) == (8, 24)
    with pytest.raises(
        ValueError, match=r"conditioning_embedding_out_channels=\[16, 32, 96, 256\].*give log2\(2\)"
    ):
        conditioning_channels_for(vae(16, 32), [16, 32, 96, 256])


def test_a_fresh_controlnet_has_zero_outputs_and_draws_what_the_base_draws(tiny_base, canny):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from src.pipelines.loading import diffusers_pipeline_for

    module = controlnet_module(tiny_base)
    controlnet = module.controlnet
    zero_convolutions = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convolutions.append(controlnet.controlnet_cond_embedding.conv_out)
    assert all(not p.any() for conv in zero_convolutions for p in conv.parameters())
    # initialised from the base UNet's encoder
    torch.testing.assert_close(
        controlnet.down_blocks[0].resnets[0].conv1.weight, module.unet.down_blocks[0].resnets[0].conv1.weight
    )

    settings = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}
    with_controlnet = diffusers_pipeline_for(module, StableDiffusionControlNetPipeline)(
        PROMPT, image=canny(square_image()), generator=torch.Generator().manual_seed(0), **settings
    ).images
    plain = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    reference = plain(PROMPT, generator=torch.Generator().manual_seed(0), **settings).images
    assert with_controlnet.shape == reference.shape == (1, 32, 32, 3)
    assert np.abs(with_controlnet - reference).max() < 1e-5


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step outside a Trainer
def test_training_moves_only_the_controlnet_and_lowers_the_loss_on_a_fixed_batch(tiny_base, canny):
    module = controlnet_module(tiny_base, caption_dropout=0.5)
    assert module.trained_parameter_names() == {
        f"controlnet.{n}" for n, _ in module.controlnet.named_parameters()
    }
    frozen = {
        name: p.detach().clone()
        for name, p in module.named_parameters()
        if not name.startswith("controlnet.")
    }
    initial = {name: p.detach().clone() for name, p in module.controlnet.named_parameters()}
    batch = demo_batch(4, canny)
    optimizer = torch.optim.AdamW(module.controlnet.parameters(), lr=3e-3)

    def loss_on_fixed_noise(drop_captions: bool = False) -> torch.Tensor:
        generator = torch.Generator().manual_seed(
            0
        )  # the same noise, timesteps and dropped captions every time
        pixels, control, captions = batch["pixel_values"], batch["control"], batch["captions"]
        return module.denoising_loss(
            pixels, control, captions, drop_captions=drop_captions, generator=generator
        )

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    module.train()
    with torch.no_grad():
        before = loss_on_fixed_noise().item()
    step(module.training_step(batch, 0))
    assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if name in frozen)
    assert all(
        not torch.equal(p, initial[name])
        for name, p in module.controlnet.controlnet_down_blocks.named_parameters(
            prefix="controlnet_down_blocks"
        )
    )
    for _ in range(8):
        step(loss_on_fixed_noise(drop_captions=True))
    with torch.no_grad():
        after = loss_on_fixed_noise().item()
    assert after < 0.8 * before
    assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if name in frozen)


def test_controls_of_another_size_than_the_images_name_the_fix(tiny_base):
    module = controlnet_module(tiny_base)
    with pytest.raises(ValueError, match="the data must give both at the same size"):
        module.denoising_loss(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16), ["x"])
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels"):
        controlnet_module(tiny_base, conditioning_embedding_out_channels=[16, 32, 96, 256])


def test_training_continues_from_a_saved_controlnet(tiny_base, tmp_path):
    trained = controlnet_module(tiny_base)
    with torch.no_grad():
        trained.controlnet.controlnet_mid_block.weight.fill_(0.5)
    trained.export(tmp_path / "export")
    continued = controlnet_module(tiny_base, controlnet_model_name_or_path=str(tmp_path / "export"))
    for name, value in trained.controlnet.state_dict().items():
        torch.testing.assert_close(continued.controlnet.state_dict()[name], value)
    with pytest.raises(Exception, match="model.controlnet_model_name_or_path"):
        controlnet_module(tiny_base, controlnet_model_name_or_path=str(tmp_path / "nothing"))


# --- the judge ----------------------------------------------------------------------------------------------


def test_edge_f1_is_one_for_the_same_edges_zero_for_disjoint_ones_and_tolerates_a_pixel_either_way():
    from src.demo.control_following import edge_f1

    outline = square_outline()
    empty = np.zeros_like(outline)
    assert edge_f1(outline, outline) == 1.0
    assert edge_f1(outline, square_outline(low=26, high=30)) == 0.0  # 3 px apart at their nearest
    assert edge_f1(empty, empty) == 1.0 and edge_f1(outline, empty) == edge_f1(empty, outline) == 0.0
    for shift in (-1, 1):
        moved = np.roll(outline, shift, axis=0)
        assert edge_f1(moved, outline) == edge_f1(outline, moved) == 1.0
        assert edge_f1(moved, outline, tolerance=0) <= 0.5  # only the sides along the shift still meet
    far = np.roll(outline, 3, axis=1)
    assert 0.0 < edge_f1(far, outline) < 0.7
    noise = np.random.default_rng(0).random(outline.shape) < 0.1
    assert edge_f1(noise, outline) == pytest.approx(edge_f1(outline, noise))


# --- the experiments ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("experiment", CONTROLNET_EXPERIMENTS)
def test_controlnet_experiments_train_validate_and_export_a_controlnet_diffusers_loads(
    experiment, tiny_base, synthetic_dir, tmp_path
):
    from diffusers import ControlNetModel

    from src.pipelines.loading import load_module
    from train import train

    data_dir = tmp_path / "data"
    # present with its marker, so the demo's on-demand builder takes it instead of training sd_demo_base
    shutil.copytree(tiny_base, data_dir / "models" / "sd_demo_base")
    run = tmp_path / "run"
    overrides = [
        f"experiment={experiment}",
        f"paths.data_dir={data_dir}",
        "trainer=cpu",
        "+trainer.num_sanity_val_steps=0",
        "trainer.max_steps=3",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "data.batch_size=4",
        "callbacks.control_validation.every_n_steps=2",
        "callbacks.control_validation.num_pairs=2",
        "callbacks.control_validation.num_images_per_prompt=1",
        "callbacks.control_validation.num_inference_steps=2",
    ]
    if experiment == "controlnet_demo":
        overrides += [
            "data.num_samples=40",
            "model.lr_scheduler.warmup_steps=1",
            "callbacks.control_following.num_scenes=4",
            "callbacks.control_following.num_inference_steps=2",
        ]
    else:  # the user's shards and a local base model; the tiny base's VAE asks for a 2-entry control encoder
        overrides += [
            f"data.root={synthetic_dir}",
            f"model.pretrained_model_name_or_path={tiny_base}",
            "data.resolution=32",
            "data.num_workers=0",
        ]
    metrics, objects = train(compose_config("train.yaml", overrides, run))

    model = objects["model"]
    assert objects["trainer"].global_step == 3
    assert {"train/loss", "test/loss", "test/loss_without_control"} <= set(metrics)
    # validation grids at step 2 (every_n_steps) and at train end, beside the logger's files
    assert sorted(p.name for p in run.rglob("validation/*.png")) == ["step_000002.png", "step_000003.png"]
    if experiment == "controlnet_demo":
        assert model.hparams.pretrained_model_name_or_path == str(data_dir / "models" / "sd_demo_base")
        judged = {"test/edge_f1", "test/edge_f1_without", "test/colour_match", "test/colour_match_without"}
        assert judged <= set(metrics) and all(0.0 <= metrics[name] <= 1.0 for name in judged)
        assert len(list(run.rglob("control_following.png"))) == 1
        assert "real drawings through the VAE" in (run / "metrics.md").read_text()

    exported = ControlNetModel.from_pretrained(run / "export")
    for name, value in model.controlnet.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value)
    record = json.loads((run / "export" / "finetune.json").read_text())
    assert (
        record["method"] == "controlnet"
        and record["base_model"] == model.hparams.pretrained_model_name_or_path
    )
    # the checkpoint holds the ControlNet alone and rebuilds the same trained model
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(k.startswith("controlnet.") for k in checkpoint["state_dict"])
    restored = load_module(run / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(
        restored.controlnet.controlnet_mid_block.weight, exported.controlnet_mid_block.weight
    )
