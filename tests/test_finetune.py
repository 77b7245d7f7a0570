"""The shared fine-tuning objective and each method's details, on a tiny local Stable Diffusion."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from tiny_sd import build_tiny_stable_diffusion

from src.modules.diffusion.objective import denoising_target, per_example_loss


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def tiny_sd_v(tmp_path_factory) -> Path:
    """An SD 2.x-like checkpoint: its scheduler predicts v."""
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction")


def batch(n: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1,
        "captions": ["a photo of * in the fire"] * n,
        "cache_key": torch.arange(n),
        "is_prior": torch.zeros(n, dtype=torch.bool),
    }


def quiet(module):
    """Outside a Trainer, ``self.log`` has nowhere to go."""
    module.log = lambda *args, **kwargs: None
    return module.train()


def loss_at(module, data: dict, seed: int) -> float:
    """The training loss with fixed noise and timesteps, so that two calls compare the weights only."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(module.training_step(data, 0))


def test_v_prediction_checkpoint_trains_on_the_velocity_target(tiny_sd_v):
    from src.modules.diffusion.lora import LoRAFineTune

    module = quiet(LoRAFineTune(pretrained_model_name_or_path=str(tiny_sd_v), rank=4))
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    timesteps = torch.tensor([10, 900])
    target = denoising_target(module.noise_scheduler, latents, noise, timesteps)
    torch.testing.assert_close(target, module.noise_scheduler.get_velocity(latents, noise, timesteps))
    assert not torch.allclose(target, noise)

    data = batch()
    before = loss_at(module, data, seed=1)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(15):
        torch.manual_seed(1)
        module.training_step(data, 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss_at(module, data, seed=1) < 0.9 * before


def test_min_snr_weights_clamp_the_low_noise_timesteps(tiny_sd):
    from src.modules.diffusion.lora import LoRAFineTune

    module = LoRAFineTune(pretrained_model_name_or_path=str(tiny_sd), snr_gamma=5.0)
    prediction, target = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    timesteps = torch.tensor([5, 950])  # SNR far above and far below gamma
    alphas = module.noise_scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    mse = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    expected = mse * torch.minimum(snr, torch.tensor(5.0)) / snr
    losses = per_example_loss(prediction, target, module.noise_scheduler, timesteps, module.hparams.snr_gamma)
    torch.testing.assert_close(losses, expected)
    assert expected[0] < 0.1 * mse[0] and torch.isclose(expected[1], mse[1])


def test_latents_are_cached_by_key_and_recomputed_without_one(tiny_sd, monkeypatch):
    from src.modules.diffusion.lora import LoRAFineTune

    module = LoRAFineTune(pretrained_model_name_or_path=str(tiny_sd))
    calls = []
    encode = module.vae.encode
    monkeypatch.setattr(module.vae, "encode", lambda x: calls.append(len(x)) or encode(x))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    module.encode_images(pixels, torch.tensor([4, 5]))
    module.encode_images(pixels, torch.tensor([5, 4]))
    module.encode_images(pixels, torch.tensor([-1, 4]))  # -1: random crop, pixels not reproducible
    assert calls == [2, 2]


def test_textual_inversion_captions_reach_the_tokenizer_as_the_new_token(tiny_sd):
    from src.modules.diffusion.textual_inversion import TextualInversion

    module = quiet(
        TextualInversion(
            pretrained_model_name_or_path=str(tiny_sd),
            placeholder_token="<hanok>",
            initializer_token="house",
            num_vectors=2,
        )
    )
    ids = module.tokenizer(module.training_prompt("a photo of * in the fire")).input_ids
    new_ids = module.tokenizer.convert_tokens_to_ids(["<hanok>", "<hanok>_1"])
    assert [i for i in ids if i in new_ids] == new_ids
    assert module.prompt_aliases == {"*": "<hanok>"}

    # The new rows start at the initializer word and are what the embedding layer outputs for the new token.
    embeddings = module.text_encoder.get_input_embeddings()
    house = module.tokenizer.convert_tokens_to_ids("house</w>")
    torch.testing.assert_close(module.placeholder_embeddings[0], embeddings.weight[house])
    with torch.no_grad():
        module.placeholder_embeddings.add_(1.0)
        out = embeddings(torch.tensor([ids]))[0]
    position = ids.index(new_ids[1])
    torch.testing.assert_close(out[position], module.placeholder_embeddings[1])

    # Only the placeholder rows receive a gradient; the matrix is frozen.
    module.training_step(batch(), 0).backward()
    assert module.placeholder_embeddings.grad.abs().sum() > 0
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["placeholder_embeddings"]


def textual_inversion(tiny_sd, **settings):
    from src.modules.diffusion.textual_inversion import TextualInversion

    return TextualInversion(
        pretrained_model_name_or_path=str(tiny_sd),
        placeholder_token="<hanok>",
        initializer_token="house",
        **settings,
    )


def folder_with_captions(folder: Path, captions: list[str]) -> Path:
    """A kohya folder: image_i.png with image_i.txt holding ``captions[i]``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"image_{i}.png")
        (folder / f"image_{i}.txt").write_text(caption + "\n")
    return folder


TRUNCATED = "a photo of the red house in the fire, " * 4 + "*"  # 41 tokens: `*` is cut at 32


def test_textual_inversion_checks_every_caption_before_the_first_step(tiny_sd, tmp_path):
    import lightning as L

    from src.data.image_folder import CaptionedImageDataModule

    captions = ["a photo of * in the fire", "a photo of a house", TRUNCATED, "a painting of *"]
    folder = folder_with_captions(tmp_path / "images", captions)
    datamodule = CaptionedImageDataModule(str(folder), resolution=32, batch_size=4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="2 images have a caption without the placeholder") as error:
        trainer.fit(textual_inversion(tiny_sd), datamodule=datamodule)
    assert "image_1.png, image_2.png" in str(error.value) and "32 tokens" in str(error.value)
    assert trainer.global_step == 0  # refused before training, not at the batch that lacked it

    # With the fallback, those two images train on the templates; the others keep their own captions.
    module = textual_inversion(tiny_sd, captions_without_placeholder="fallback")
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    datamodule = CaptionedImageDataModule(
        str(folder), resolution=32, batch_size=4, fallback_captions=["a rendering of *"]
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    trained = datamodule.train_dataset.training_captions()
    assert trained == {
        "image_0.png": ["a photo of * in the fire"],
        "image_1.png": ["a rendering of *"],
        "image_2.png": ["a rendering of *"],
        "image_3.png": ["a painting of *"],
    }


def test_textual_inversion_rejects_a_known_word_and_a_multi_token_initializer(tiny_sd):
    from src.modules.diffusion.textual_inversion import TextualInversion

    with pytest.raises(ValueError, match="already a word"):
        TextualInversion(
            pretrained_model_name_or_path=str(tiny_sd), placeholder_token="house", initializer_token="house"
        )
    with pytest.raises(ValueError, match="single token"):
        TextualInversion(
            pretrained_model_name_or_path=str(tiny_sd),
            placeholder_token="<hanok>",
            initializer_token="hanokish",
        )


def test_hypernetwork_file_has_the_webui_layout(tiny_sd, tmp_path):
    from src.modules.diffusion.hypernetwork import HypernetworkFineTune

    module = HypernetworkFineTune(pretrained_model_name_or_path=str(tiny_sd), name="hanok_hn")
    module.export(tmp_path)
    path = tmp_path / "hanok_hn.pt"
    # The legacy stream (not a zip archive), readable by the WebUI's restricted unpickler.
    assert not zipfile.is_zipfile(path)
    state = torch.load(path, weights_only=True)
    # One pair per context width: the text encoder's (48) and the UNet's (32, 64), keyed by int as the WebUI does.
    assert sorted(k for k in state if isinstance(k, int)) == [32, 48, 64]
    for size in (32, 48, 64):
        assert len(state[size]) == 2
        # layer structure 1-2-1 with a linear activation: Linear(d, 2d) at index 0, Linear(2d, d) at index 1
        assert {k: tuple(v.shape) for k, v in state[size][0].items()} == {
            "linear.0.weight": (2 * size, size),
            "linear.0.bias": (2 * size,),
            "linear.1.weight": (size, 2 * size),
            "linear.1.bias": (size,),
        }
    assert state["layer_structure"] == [1.0, 2.0, 1.0] and state["activation_func"] == "linear"
    assert state["name"] == "hanok_hn" and "activate_output" in state and "is_layer_norm" in state


def test_frozen_parts_go_to_half_precision_and_trained_ones_stay_float32(tiny_sd):
    from src.modules.diffusion.lora import LoRAFineTune

    module = quiet(LoRAFineTune(pretrained_model_name_or_path=str(tiny_sd), frozen_dtype="bfloat16"))
    module.setup("fit")
    assert module.vae.dtype == module.text_encoder.dtype == torch.bfloat16
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    frozen_unet = [p for n, p in module.unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in frozen_unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch(), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trained)


def test_8bit_adam_falls_back_to_adamw_off_cuda_with_a_notice(tiny_sd, caplog):
    from src.modules.diffusion.lora import LoRAFineTune

    module = LoRAFineTune(pretrained_model_name_or_path=str(tiny_sd), use_8bit_adam=True)
    with caplog.at_level("WARNING"):
        optimizer = module.build_optimizer([p for p in module.parameters() if p.requires_grad])
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == pytest.approx(1e-4)
    assert "8-bit AdamW runs on CUDA only" in caplog.text


def test_a_missing_base_model_names_the_setting(tmp_path):
    from src.modules.diffusion.lora import LoRAFineTune
    from src.utils.hub import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="model.pretrained_model_name_or_path"):
        LoRAFineTune(pretrained_model_name_or_path=str(tmp_path / "no_model"))
    with pytest.raises(MissingWeightsError, match="hf download stable-diffusion-v1-5/stable-diffusion-v1-5"):
        LoRAFineTune(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_dreambooth_with_lora_adds_the_prior_term_for_class_images(tiny_sd):
    """DreamBooth + LoRA is the LoRA module on DreamBooth's data: the loss is instance + weight x prior."""
    from src.modules.diffusion.lora import LoRAFineTune

    module = LoRAFineTune(pretrained_model_name_or_path=str(tiny_sd), prior_loss_weight=0.5).train()
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    data = batch(4)
    data["is_prior"] = torch.tensor([False, False, True, True])
    torch.manual_seed(0)
    loss = float(module.training_step(data, 0))
    assert loss == pytest.approx(logged["train/instance_loss"] + 0.5 * logged["train/prior_loss"], rel=1e-5)
    assert logged["train/instance_loss"] != logged["train/prior_loss"]
