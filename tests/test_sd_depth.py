"""Depth-to-image grown from a text-to-image base: the depth maps of the generated scenes, the widened UNet's
invariant, the estimator's learning, and experiment=sd_demo_depth as run, its export loaded by diffusers."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from hydra_runs import DEPTH_EXPERIMENTS, compose_config
from PIL import Image
from tiny_sd import build_tiny_stable_diffusion

# configs/model/sd_depth.yaml's estimator
DEPTH_ESTIMATOR = {
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "backbone_out_indices": [0, 1, 2, 3],
    "neck_hidden_sizes": [8, 16, 32, 32],
    "fusion_hidden_size": 16,
}
PROMPT = "a red pentagon"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A text-to-image base like the demo's: factor-2 VAE, 32 px images, 16 x 16 latents."""
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_base"))


def depth_module(base, **settings):
    from src.modules.diffusion.depth_to_image import DepthToImageFineTune

    torch.manual_seed(0)
    return DepthToImageFineTune(base, depth_estimator=DEPTH_ESTIMATOR, image_size=32, **settings)


def scene_image(index: int = 0) -> Image.Image:
    from src.demo.synthetic import render_scene, synthetic_scene

    scene, style, rng = synthetic_scene("test", index)
    return render_scene(scene, style, 32, rng)


# --- depth maps of the scenes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["flat", "outline", "sketch", "dotted"])
def test_depth_rendering_draws_render_scenes_image_with_the_whole_silhouette_in_front(style):
    from src.demo.synthetic import GROUND_DEPTH, Scene, render_scene, render_scene_with_depth

    scene = Scene(kind="circle", colour="red", size="large", position="center", background="white")
    image, depth = render_scene_with_depth(scene, style, 32, random.Random(7))
    assert image.tobytes() == render_scene(scene, style, 32, random.Random(7)).tobytes()
    assert depth.dtype == np.float32 and depth.shape == (32, 32)
    # the circle's centre is near however it is drawn (an outline's inside is background-coloured pixels)
    assert depth[14:18, 14:18].min() == pytest.approx(1.0)
    # a receding ground plane around it: far at the top, nearer at the bottom, so every map has a range
    assert depth[0, 0] == pytest.approx(GROUND_DEPTH[0], abs=0.01)
    assert depth[-1, 0] == pytest.approx(GROUND_DEPTH[1], abs=0.01)
    assert np.all(np.diff(depth[:, 0]) > 0) and depth.min() >= 0.0 and depth.max() <= 1.0


def test_depth_items_are_the_synthetic_samples_of_the_same_index_with_their_depth_and_a_caption():
    from torchvision.transforms.functional import pil_to_tensor

    from src.demo.depth import SyntheticDepthDataModule, SyntheticDepthDataset
    from src.demo.synthetic import synthetic_sample

    datamodule = SyntheticDepthDataModule(image_size=32, batch_size=4, num_samples=50)
    assert {split: len(d) for split, d in datamodule.datasets.items()} == {"train": 40, "val": 5, "test": 5}
    again = SyntheticDepthDataset("val", 5, 32)
    for index in range(5):
        item, sample = datamodule.datasets["val"][index], synthetic_sample("val", index, image_size=32)
        expected = pil_to_tensor(sample.image).float() / 127.5 - 1
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)
        assert item["caption"] in sample.captions_en
        assert item["depth"].shape == (1, 32, 32) and float(item["depth"].max()) == pytest.approx(1.0)
        assert item["caption"] == again[index]["caption"] and torch.equal(
            item["depth"], again[index]["depth"]
        )
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["depth"].shape == (4, 1, 32, 32)
    assert len(batch["caption"]) == 4


# --- the widened UNet -----------------------------------------------------------------------------------------


def test_widened_unet_with_its_depth_channel_at_zero_draws_what_img2img_draws_with_the_base(tiny_base):
    from diffusers import StableDiffusionDepth2ImgPipeline, StableDiffusionImg2ImgPipeline

    from src.modules.diffusion.depth_to_image import widen_unet_for_depth

    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_base, safety_checker=None)
    img2img.set_progress_bar_config(disable=True)
    widened = widen_unet_for_depth(img2img.unet)
    assert widened.config.in_channels == 5 and not widened.conv_in.weight[:, 4].any()

    def depth_to_image(unet):
        pipeline = StableDiffusionDepth2ImgPipeline(
            **{name: getattr(img2img, name) for name in ("vae", "text_encoder", "tokenizer", "scheduler")},
            unet=unet,
            depth_estimator=None,
            feature_extractor=None,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    image = scene_image()
    settings = {"strength": 0.8, "num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "np"}
    any_depth = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = depth_to_image(widened)(
        PROMPT, image=image, depth_map=any_depth, generator=torch.Generator().manual_seed(0), **settings
    ).images
    reference = img2img(PROMPT, image=image, generator=torch.Generator().manual_seed(0), **settings).images
    assert ours.shape == reference.shape == (1, 32, 32, 3)
    assert np.abs(ours - reference).max() < 1e-5
    with pytest.raises(RuntimeError, match="4 channels, but got 5"):
        depth_to_image(img2img.unet)(PROMPT, image=image, depth_map=any_depth, **settings)


def test_depth_condition_is_what_the_pipeline_feeds_the_unet(tiny_base):
    from diffusers import StableDiffusionDepth2ImgPipeline

    from src.modules.diffusion.depth_to_image import depth_condition

    module = depth_module(tiny_base)
    pipeline = StableDiffusionDepth2ImgPipeline(**module.diffusion_parts())
    depth = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))
    images = [scene_image(0), scene_image(1)]
    fed = pipeline.prepare_depth_map(images, depth, 2, False, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(depth_condition(depth[:, None], (16, 16)), fed)
    assert float(fed.amin()) == -1.0 and float(fed.amax()) == 1.0


# --- training ------------------------------------------------------------------------------------------------


def test_the_estimator_learns_the_depth_maps_of_the_scenes(tiny_base):
    from src.demo.depth import SyntheticDepthDataset

    module = depth_module(tiny_base)
    dataset = SyntheticDepthDataset("train", 8, 32)
    images = torch.stack([dataset[i]["image"] for i in range(8)])
    depth = torch.stack([dataset[i]["depth"] for i in range(8)])
    optimizer = torch.optim.AdamW(module.depth_estimator.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = module.depth_loss(images, depth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_mismatched_image_size_names_the_setting(tiny_base):
    module = depth_module(tiny_base)
    batch = {"image": torch.zeros(1, 3, 16, 16), "depth": torch.zeros(1, 1, 16, 16), "caption": ["x"]}
    with pytest.raises(ValueError, match="data.image_size=32"):
        module.training_step(batch, 0)


# --- the experiment ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("experiment", DEPTH_EXPERIMENTS)
def test_sd_demo_depth_trains_on_the_base_made_on_demand_and_exports_a_depth_to_image_model(
    experiment, tiny_base, tmp_path
):
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTForDepthEstimation

    from src.pipelines.loading import load_module
    from train import train

    data_dir = tmp_path / "data"
    # present with its marker, so the experiment's on-demand builder takes it instead of training sd_demo_base
    shutil.copytree(tiny_base, data_dir / "models" / "sd_demo_base")
    run = tmp_path / "run"
    overrides = [
        f"experiment={experiment}",
        f"paths.data_dir={data_dir}",
        "data.num_samples=40",
        "data.batch_size=4",
        "trainer.max_steps=3",
        "trainer.check_val_every_n_epoch=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "model.lr_scheduler.warmup_steps=1",
    ]
    metrics, objects = train(compose_config("train.yaml", overrides, run))

    assert objects["trainer"].global_step == 3
    assert objects["model"].hparams.pretrained_model_name_or_path == str(data_dir / "models" / "sd_demo_base")
    tested = {"loss", "loss_depth_zeroed", "depth_loss", "depth_mae", "depth_iou"}
    assert {f"test/{name}" for name in tested} | {"train/loss", "train/depth_loss"} <= set(metrics)
    assert 0.0 <= metrics["test/depth_iou"] <= 1.0
    table = (run / "metrics.md").read_text()
    assert "untrained" in table.splitlines()[0]

    pipeline = StableDiffusionDepth2ImgPipeline.from_pretrained(run / "export")
    assert isinstance(pipeline.depth_estimator, DPTForDepthEstimation)
    assert pipeline.unet.config.in_channels == 5
    images = pipeline(
        PROMPT,
        image=scene_image(),
        strength=0.8,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # the checkpoint rebuilds the same trained model
    restored = load_module(run / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(restored.unet.conv_in.weight, pipeline.unet.conv_in.weight)
    estimator = restored.depth_estimator.state_dict()
    for name, value in pipeline.depth_estimator.state_dict().items():
        torch.testing.assert_close(estimator[name], value)
