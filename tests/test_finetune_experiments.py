"""Every Stable Diffusion fine-tuning experiment runs as users run it, on a tiny local SD and a folder of images.

Per experiment: ``train.py`` trains a few steps; only the method's parameters moved (the frozen rest equals the
base model); its validation grid and checkpoint are written; its export loads into a fresh vanilla diffusers
pipeline the way the ecosystem loads it, changes the image against the base model at the same seed, and draws
exactly what the framework's own inference draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra_runs import FINETUNE_EXPERIMENTS, compose_config, compose_plain
from tiny_sd import build_tiny_stable_diffusion, write_image_folder

PROMPTS = ["a photo of * in the fire"]
INFERENCE = {"num_inference_steps": 3, "guidance_scale": 3.0}
# What each experiment's module trains, by parameter-name fragment; everything else must stay at the base.
TRAINED = {
    "finetune_lora": ("lora_",),
    "style_lora": ("lora_",),
    "finetune_dreambooth": ("unet.",),
    "finetune_textual_inversion": ("placeholder_embeddings",),
    "finetune_hypernetwork": ("hypernetwork.",),
}
METHOD = {
    "finetune_lora": "lora",
    "style_lora": "lora",
    "finetune_dreambooth": "dreambooth",
    "finetune_textual_inversion": "textual_inversion",
    "finetune_hypernetwork": "hypernetwork",
}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def hanok_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("hanok"), num_images=6)


def finetune_overrides(
    experiment: str, model_dir: Path, image_dir: Path, data_dir: Path, *extra: str
) -> list[str]:
    """A few CPU steps of ``experiment``: the base model and the images by path, small sizes, few sampler steps."""
    overrides = [
        f"experiment={experiment}",
        f"model.pretrained_model_name_or_path={model_dir}",
        f"data.image_dir={image_dir}",
        f"paths.data_dir={data_dir}",
        "data.resolution=32",
        "data.num_images=4",
        "data.num_workers=0",
        "trainer=cpu",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=1",
        "trainer.log_every_n_steps=1",
        # large enough that three steps visibly change the images
        "model.optimizer.lr=5e-3",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.validation_prompts.every_n_steps=3",
        "callbacks.validation_prompts.num_images_per_prompt=1",
        "callbacks.validation_prompts.num_inference_steps=2",
        "+callbacks.snapshot._target_=probes.TrainedParameterSnapshot",
    ]
    if experiment == "finetune_dreambooth":
        overrides += [
            "data.prior_preservation.num_class_images=2",
            "data.prior_preservation.generator.num_inference_steps=2",
            "data.prior_preservation.generator.sample_batch_size=2",
        ]
    return [*overrides, *extra]


def frozen_parameters_equal_base(model, base_dir: Path, trained: tuple[str, ...]) -> list[str]:
    """Names of parameters that are not the method's yet differ from the base model's."""
    from src.modules.diffusion.components import load_components

    base = load_components(str(base_dir))
    moved = []
    for part in ("unet", "vae", "text_encoder"):
        base_state = getattr(base, part).state_dict()
        for name, value in getattr(model, part).state_dict().items():
            if any(t in f"{part}.{name}" for t in trained) or "lora_" in name:
                continue
            key = name.replace(".base_layer", "")
            if key in base_state and base_state[key].shape == value.shape:
                if not torch.equal(base_state[key], value.float()):
                    moved.append(f"{part}.{name}")
            elif part == "text_encoder" and "token_embedding" in name:
                # textual inversion grew the matrix: the old rows must be untouched
                old = base_state[key]
                if not torch.equal(old, value[: old.shape[0]]):
                    moved.append(f"{part}.{name}")
    return moved


@pytest.mark.slow
@pytest.mark.parametrize("experiment", FINETUNE_EXPERIMENTS)
def test_finetune_experiment_trains_only_its_parameters_and_exports_what_diffusers_loads(
    experiment, tiny_sd, hanok_folder, tmp_path
):
    from src.pipelines.loading import load_text_to_image, text_to_image_for
    from train import train

    run = tmp_path / "run"
    cfg = compose_config(
        "train.yaml", finetune_overrides(experiment, tiny_sd, hanok_folder, tmp_path / "data"), run
    )
    metrics, objects = train(cfg)
    model, trainer = objects["model"], objects["trainer"]
    assert trainer.global_step == 3

    # Only the method's parameters trained, and all of them moved.
    snapshot = next(c for c in trainer.callbacks if type(c).__name__ == "TrainedParameterSnapshot")
    trained = TRAINED[experiment]
    assert snapshot.initial and all(any(t in n for t in trained) for n in snapshot.initial), list(
        snapshot.initial
    )
    current = dict(model.named_parameters())
    unmoved = [n for n, p in snapshot.initial.items() if torch.equal(p, current[n].detach())]
    assert not unmoved, unmoved[:5]
    assert frozen_parameters_equal_base(model, tiny_sd, trained) == []

    # The run directory: validation grid, a checkpoint of the trained parameters only, the ecosystem files.
    assert len(list(run.rglob("validation/step_000003.png"))) == 1
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(snapshot.initial)
    export = run / "export"

    # The export in a fresh vanilla pipeline draws what the framework draws, and not what the base draws.
    ours = text_to_image_for(model, **INFERENCE)(PROMPTS, num_images_per_prompt=1, seed=0)
    method = METHOD[experiment]
    loaded = load_text_to_image(
        base_model=str(tiny_sd), method=method, weights=export, device="cpu", **INFERENCE
    )
    theirs = loaded(PROMPTS, num_images_per_prompt=1, seed=0)
    base = load_text_to_image(base_model=str(tiny_sd), device="cpu", **INFERENCE)(
        [
            loaded.prompt(p) if method != "textual_inversion" else "a photo of house in the fire"
            for p in PROMPTS
        ],
        num_images_per_prompt=1,
        seed=0,
    )
    assert ours.shape == (1, 1, 3, 32, 32)
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=0)
    assert (theirs - base).abs().max() > 1e-3

    if method == "lora":
        # The kohya/WebUI copy holds the same adapter: diffusers converts it back to identical images.
        kohya = export / f"{cfg.model.name}.safetensors"
        from_kohya = load_text_to_image(
            base_model=str(tiny_sd), method="lora", weights=kohya, device="cpu", **INFERENCE
        )
        torch.testing.assert_close(from_kohya(PROMPTS, 1, 0), ours, atol=2e-4, rtol=0)
    if method == "textual_inversion":
        # The WebUI embedding, read by diffusers' loader, is the same word.
        from_webui = load_text_to_image(
            base_model=str(tiny_sd),
            method="textual_inversion",
            weights=export / "hanok.pt",
            device="cpu",
            **INFERENCE,
        )
        torch.testing.assert_close(from_webui(PROMPTS, 1, 0), ours, atol=2e-4, rtol=0)
    if experiment == "finetune_dreambooth":
        # Prior preservation: the base model drew the class images once; every batch carried them.
        assert len(list((tmp_path / "data" / "class_images" / "house").glob("class_*.png"))) == 2
        batch = snapshot.first_batch
        assert batch["is_prior"].tolist() == [False, True]
        assert batch["captions"][1] == "a photo of a house"
        assert "train/prior_loss" in trainer.callback_metrics
    # Training time and peak memory reach the loggers.
    logged = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/time_s", "train/peak_memory_mb", "train/loss"} <= set(logged)
    assert metrics["train/time_s"] > 0 and metrics["train/peak_memory_mb"] > 0


@pytest.fixture(scope="module")
def lora_run(tiny_sd, hanok_folder, tmp_path_factory) -> tuple[Path, list[str], dict, Any]:
    from train import train

    run = tmp_path_factory.mktemp("lora_run")
    overrides = finetune_overrides("finetune_lora", tiny_sd, hanok_folder, run.parent / f"{run.name}_data")
    _, objects = train(compose_config("train.yaml", overrides, run))
    trained = {n: p.detach().clone() for n, p in objects["model"].named_parameters() if p.requires_grad}
    return run, overrides, trained, objects["model"]


@pytest.mark.slow
def test_lora_run_resumes_from_its_checkpoint_and_continues_the_step_count(lora_run, tmp_path):
    from train import train

    first, overrides, trained, _ = lora_run
    resumed_overrides = [
        *overrides,
        "trainer.max_steps=5",
        f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
    ]
    _, objects = train(compose_config("train.yaml", resumed_overrides, tmp_path))
    assert objects["trainer"].global_step == 5
    snapshot = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "TrainedParameterSnapshot")
    # Training resumed from the first run's adapter, not from a fresh one.
    assert set(snapshot.initial) == set(trained)
    for name, value in trained.items():
        torch.testing.assert_close(snapshot.initial[name], value, atol=0, rtol=0)


@pytest.mark.slow
def test_generate_draws_a_finetuned_model_from_its_export_directory_alone(lora_run, tmp_path):
    """python generate.py weights=<run>/export captions=[...]: method, base model and `*` come from the export;
    the same seed gives the pixels the validation callback drew from the module while it trained."""
    import json

    import numpy as np
    from PIL import Image

    from generate import generate_from_config
    from src.callbacks.validation_prompts import ValidationPromptGrid

    run, _, _, model = lora_run
    out = tmp_path / "generated"
    overrides = [
        f"weights={run / 'export'}",
        'captions=["*, fire", "A fire broke out in *"]',
        "num_per_caption=2",
        "num_inference_steps=3",
        "guidance_scale=3.0",
        f"out_dir={out}",
        "device=cpu",
    ]
    files = generate_from_config(compose_plain("generate.yaml", overrides))["images"]
    assert sorted(files) == ["000_0.png", "000_1.png", "001_0.png", "001_1.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["method"] == "lora"
    assert manifest["settings"]["prompt_aliases"] == {"*": "sks hanok"}

    callback = ValidationPromptGrid(
        ["A fire broke out in *"], every_n_steps=1, num_images_per_prompt=2, seed=0, **INFERENCE
    )
    expected = callback.render(model)
    written = np.asarray(Image.open(out / "001_1.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(written, expected[0, 1].permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-3)
