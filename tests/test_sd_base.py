"""The text-to-image model trained from scratch: its two stages, its export, and experiment=sd_demo_base as run.

The export must be a Stable Diffusion directory in every respect that matters to users: ``from_pretrained`` of
diffusers' pipeline loads it and draws, and the fine-tuning methods take it as their base model.
"""

from __future__ import annotations

import functools
import json
import random

import lightning as L
import pytest
import torch
from hydra_runs import DIFFUSION_EXPERIMENTS, compose_config, synthetic_samples
from torch.utils.data import DataLoader

TINY = {
    "text_encoder": {
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
    "unet": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "vae": {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
    },
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from src.demo.bpe_tokenizer import caption_clip_tokenizer

    return caption_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


def tiny_model(tokenizer, vae_steps: int = 3):
    from src.modules.diffusion.text_to_image import LatentDiffusionFromScratch

    torch.manual_seed(0)
    return LatentDiffusionFromScratch(
        tokenizer=tokenizer,
        **TINY,
        # as configs/model/sd_base.yaml trains
        noise_scheduler={
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction",
        },
        snr_gamma=5.0,
        preprocess={"image_size": 16},
        vae_steps=vae_steps,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )


def hydra_value(value) -> str:
    """A value in Hydra's override grammar (its dict keys are unquoted)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return json.dumps(value)


def batches(n: int, size: int = 16):
    captions = [
        "A large red circle in the middle of a white background.",
        "blue star, small, left, black background",
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield {"image": torch.rand(2, 3, size, size, generator=generator) * 2 - 1, "caption": captions}


def test_words_of_the_captions_are_single_tokens_and_unknown_words_fall_back_to_bytes(tokenizer):
    from src.demo.synthetic import caption_vocabulary

    words = [w.lower() for w in caption_vocabulary() if w.isascii() and w.isalpha()]
    assert [w for w in words if len(tokenizer(w).input_ids) != 3] == []  # <start> word <end>
    assert tokenizer.decode(tokenizer("sks hanok").input_ids, skip_special_tokens=True) == "sks hanok"


class Snapshots(L.Callback):
    """The parameters at the start and after every optimizer step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.at[0] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.at[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_stage_one_trains_only_the_vae_and_stage_two_only_the_text_encoder_and_unet(tokenizer):
    model, snapshots = tiny_model(tokenizer, vae_steps=3), Snapshots()
    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        callbacks=[snapshots],
    )
    trainer.fit(model, train_dataloaders=DataLoader(list(batches(6)), batch_size=None))
    stage_one, stage_two = moved(snapshots.at[0], snapshots.at[3]), moved(snapshots.at[3], snapshots.at[6])
    assert stage_one and all(name.startswith("vae.") for name in stage_one)
    # Stage 2 only collapses the posterior: the log-variance rows of quant_conv, never the means'
    assert {n for n in stage_two if n.startswith("vae.")} == {"vae.quant_conv.weight", "vae.quant_conv.bias"}
    latent_channels = model.vae.config.latent_channels
    for name in ("vae.quant_conv.weight", "vae.quant_conv.bias"):
        before, after = snapshots.at[3][name], snapshots.at[6][name]
        torch.testing.assert_close(after[:latent_channels], before[:latent_channels], rtol=0, atol=0)
    assert any(n.startswith("unet.") for n in stage_two) and any(
        n.startswith("text_encoder.") for n in stage_two
    )
    assert float(model.latent_scale) > 0


def test_the_vae_learns_the_colour_of_small_shapes(tokenizer):
    """Stage 1 reconstructs a small shape's colour, which the loss it replaced (L1 of a posterior sample) lost:
    L1's optimum for a pixel that may be shape or background is the background."""
    from torchvision.transforms.functional import pil_to_tensor

    from src.demo.synthetic import Scene, dominant_colour, render_scene
    from src.utils.image_grid import to_pil

    model = tiny_model(tokenizer)
    scenes = [
        Scene(kind="circle", colour=colour, size="small", position="center", background="white")
        for colour in ("red", "blue", "green", "yellow")
    ]
    images = torch.stack(
        [pil_to_tensor(render_scene(scene, "flat", 16, random.Random(0))) for scene in scenes]
    )
    images = images.float() / 127.5 - 1
    optimizer = torch.optim.AdamW(model.vae.parameters(), lr=3e-3)
    for _ in range(300):  # ~9 s; L1 of a posterior sample, the same steps: green, green, green, no colour
        loss = model.autoencoder_loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        posterior = model.vae.encode(images).latent_dist
        reconstructions = model.vae.decode(posterior.mode()).sample.clamp(-1, 1)
    colours = [dominant_colour(to_pil((image + 1) / 2)) for image in reconstructions]
    assert colours == [scene.colour for scene in scenes]


def test_denoising_loss_goes_down_on_a_fixed_batch(tokenizer):
    model = tiny_model(tokenizer, vae_steps=0)
    batch = next(batches(1))
    optimizer = torch.optim.AdamW([*model.unet.parameters(), *model.text_encoder.parameters()], lr=3e-3)

    def fixed_noise_loss() -> float:
        with torch.no_grad():
            return float(
                model.denoising_loss(
                    batch["image"], batch["caption"], generator=torch.Generator().manual_seed(1)
                )
            )

    before = fixed_noise_loss()
    for step in range(40):
        loss = model.denoising_loss(
            batch["image"], batch["caption"], generator=torch.Generator().manual_seed(step)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_noise_loss() < 0.7 * before


def test_export_is_a_stable_diffusion_directory_that_diffusers_and_the_finetuning_methods_load(
    tokenizer, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from src.modules.diffusion.components import load_components
    from src.pipelines.loading import text_to_image_for

    model = tiny_model(tokenizer, vae_steps=0)
    images = next(batches(1))["image"]
    means = model.vae.encode(images).latent_dist.mode()
    latents = model.encode_images(images)  # stage 2 begins: the latent scale is measured
    torch.testing.assert_close(model.encode_images(images), latents)  # the posterior's mode, not a sample
    torch.testing.assert_close(latents, means * model.latent_scale)  # collapsing the posterior kept its mode
    export = model.export(tmp_path / "export")

    pipeline = StableDiffusionPipeline.from_pretrained(export, safety_checker=None)
    assert pipeline.vae.config.scaling_factor == pytest.approx(float(model.latent_scale))
    # whoever samples the exported posterior, as diffusers' training scripts do, gets the latents trained on
    posterior = pipeline.vae.encode(images).latent_dist
    torch.testing.assert_close(posterior.sample(), posterior.mode(), atol=1e-5, rtol=0)
    # the sampler predicts what the UNet was trained to predict
    assert pipeline.scheduler.config.prediction_type == model.noise_scheduler.config.prediction_type
    images = pipeline(
        ["A large red circle in the middle of a white background."],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 16, 16)
    ours = text_to_image_for(model, num_inference_steps=2, guidance_scale=3.0)(
        ["A large red circle in the middle of a white background."], 1, seed=0
    )
    assert torch.allclose(ours[0], images.float(), atol=1e-5)  # the same model, through our own inference
    components = load_components(str(export))
    assert components.text_encoder.config.hidden_size == components.unet.config.cross_attention_dim == 24


def test_swapped_prompts_change_only_the_named_attribute():
    import dataclasses

    from src.demo.prompt_following import SWAPPED_ATTRIBUTES, PromptFollowing
    from src.demo.synthetic import BACKGROUNDS, COLOURS, KINDS, caption_scene

    following = PromptFollowing(judge="unused", num_prompts=12)
    values_of = {"kind": KINDS, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
    assert set(SWAPPED_ATTRIBUTES) == set(values_of)
    for attribute, values in values_of.items():
        swapped = following.swapped_prompts(attribute)
        assert swapped == following.swapped_prompts(attribute)  # the same for the same seed
        for (scene, style, _), template, caption in zip(
            following.prompts, following.templates, swapped, strict=True
        ):
            others = [value for value in values if value != getattr(scene, attribute)]
            worded = {
                caption_scene(dataclasses.replace(scene, **{attribute: other}), "en", template, style)
                for other in others
            }
            assert caption in worded


class CaptionReadingLoss:
    """A stand-in module whose loss on a batch is 1 + the share of its captions with the kind swapped, and which
    records the noise each call draws: the probe must pair every variant's noise."""

    def __init__(self, following) -> None:
        from src.data.preprocess import Preprocess

        self.preprocess = Preprocess.of({"image_size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
        self.device = torch.device("cpu")
        self.kind_swapped = set(following.swapped_prompts("kind"))
        self.noise: list[torch.Tensor] = []

    def denoising_loss(self, images, captions, generator=None):
        assert images.min() >= -1 and images.max() <= 1
        self.noise.append(torch.randn(3, generator=generator))
        return torch.tensor(1.0 + sum(caption in self.kind_swapped for caption in captions) / len(captions))


def test_loss_rise_compares_each_swap_with_the_right_prompts_on_the_same_noise():
    from src.demo.prompt_following import LOSS_PROBE_DRAWS, PromptFollowing

    following = PromptFollowing(judge="unused", num_prompts=5, num_images_per_prompt=2)
    module = CaptionReadingLoss(following)
    rises = following.loss_rise(module, following.real_drawings())

    assert rises["loss_rise_kind"] == pytest.approx(1.0)  # every kind swapped: loss 2 against 1
    assert rises["loss_rise_colour"] == pytest.approx(0.0)
    assert rises["loss_rise_background"] == pytest.approx(0.0)
    variants = 4  # the right prompts and three swaps, each drawn LOSS_PROBE_DRAWS times
    assert len(module.noise) == variants * LOSS_PROBE_DRAWS
    for draw in range(LOSS_PROBE_DRAWS):
        calls = module.noise[draw * variants : (draw + 1) * variants]
        assert all(torch.equal(calls[0], other) for other in calls[1:])
    assert not torch.equal(module.noise[0], module.noise[variants])


@pytest.mark.slow
@pytest.mark.parametrize("experiment", DIFFUSION_EXPERIMENTS)
def test_sd_demo_base_trains_both_stages_is_judged_and_exports(
    experiment, synthetic_dir, tiny_towers, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from train import train

    run = tmp_path / "run"
    overrides = [
        f"experiment={experiment}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"data.root={synthetic_dir}",
        f"data.builders.dataset.num_samples={synthetic_samples(synthetic_dir)}",
        f"data.builders.shape_judge.out_dir={tiny_towers['shape_judge']}",  # present: the judge is not trained
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "model.vae_steps=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "callbacks.validation_prompts.every_n_steps=3",
        "callbacks.validation_prompts.num_inference_steps=2",
        "callbacks.prompt_following.num_prompts=3",
        "callbacks.prompt_following.num_images_per_prompt=2",
        "callbacks.prompt_following.num_inference_steps=2",
        *(f"model.{part}={hydra_value(TINY[part])}" for part in ("unet", "vae")),
    ]
    metrics, objects = train(compose_config("train.yaml", overrides, run))

    assert objects["trainer"].global_step == 4
    assert {
        "train/vae_loss",
        "train/loss",
        "test/colour_match",
        "test/shape_match",
        "test/both_match",
        "test/background_match",
        "test/shape_match_real",
    } <= set(metrics)
    rises = [metrics[f"test/loss_rise_{name}"] for name in ("kind", "colour", "background")]
    assert all(torch.isfinite(torch.as_tensor(rise)) for rise in rises)
    table = (run / "metrics.md").read_text()
    assert "chance" in table and "real drawings" in table and "paper" not in table
    assert "test/loss_rise_kind" in table and "one attribute of their prompt is swapped" in table
    assert list(run.rglob("prompt_following.png")) and list(run.rglob("validation/step_000003.png"))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert float(checkpoint["state_dict"]["latent_scale"]) > 0  # a resumed run keeps the scale
    pipeline = StableDiffusionPipeline.from_pretrained(run / "export")
    assert pipeline.unet.config.sample_size == 16 and pipeline.vae.config.sample_size == 32
