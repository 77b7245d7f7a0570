"""train.py / evaluate.py end to end on the generated dataset, with the real configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.extras.print_config = False
    return cfg


def demo_overrides(synthetic_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=clip_demo",
        f"paths.data_dir={synthetic_dir.parent}",
        f"data.train_shards={synthetic_dir}/train-*.tar",
        f"data.val_shards={synthetic_dir}/val-*.tar",
        f"data.test_shards={synthetic_dir}/test-*.tar",
        f"data.tokenizer={synthetic_dir}/tokenizer",
        "data.synthetic=null",
        "data.num_workers=0",
        "data.batch_size=32",
        "trainer.max_epochs=1",
        "callbacks.model_summary=null",
        *extra,
    ]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_names_importable_targets(experiment, tmp_path):
    import importlib

    cfg = compose_config("train.yaml", [f"experiment={experiment}"], tmp_path)
    for node in (cfg.data, cfg.model, cfg.trainer):
        module, _, name = node._target_.rpartition(".")
        assert hasattr(importlib.import_module(module), name)
    eval_cfg = compose_config("evaluate.yaml", [f"experiment={experiment}", "ckpt_path=x.ckpt"], tmp_path)
    assert eval_cfg.model._target_ == cfg.model._target_


def test_unknown_experiment_fails_with_hydras_list_of_choices():
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=no_such_experiment"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no_such_experiment" in result.stderr and "clip_demo" in result.stderr


# transformers' dual encoder pools with [CLS]; the exported run uses it so the export can be checked.
EXPORTABLE = ["model.text_encoder.pooling=cls", "model.image_encoder.pooling=cls"]


@pytest.fixture(scope="module")
def trained_run(synthetic_dir, tmp_path_factory):
    from train import train

    out = tmp_path_factory.mktemp("train_run")
    metrics, objects = train(compose_config("train.yaml", demo_overrides(synthetic_dir, *EXPORTABLE), out))
    return out, metrics, objects


def test_train_writes_config_checkpoints_and_metrics(trained_run):
    out, metrics, _ = trained_run
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for k in (1, 5, 10):
        assert 0.0 <= saved[f"test/mrr@{k}"] <= 1.0
    assert saved["test/mrr@1"] <= saved["test/mrr@5"] <= saved["test/mrr@10"]
    assert "val/mrr@10" in saved and "train/loss" in saved


def test_epoch_length_and_schedule_come_from_sizes_json(trained_run, synthetic_dir):
    _, _, objects = trained_run
    trainer = objects["trainer"]
    train_samples = json.loads((synthetic_dir / "sizes.json").read_text())["train"]
    assert trainer.num_training_batches == train_samples // 32
    assert trainer.global_step == train_samples // 32
    # the cosine schedule spans the whole run instead of collapsing after warmup
    assert trainer.estimated_stepping_batches == train_samples // 32


def test_resume_from_last_checkpoint_continues_the_run(trained_run, synthetic_dir, tmp_path):
    from train import train

    out, _, objects = trained_run
    steps_one_epoch = objects["trainer"].global_step
    overrides = demo_overrides(
        synthetic_dir,
        *EXPORTABLE,
        "trainer.max_epochs=2",
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        "test=false",
    )
    _, resumed = train(compose_config("train.yaml", overrides, tmp_path))
    assert resumed["trainer"].current_epoch == 2
    assert resumed["trainer"].global_step == 2 * steps_one_epoch  # one more epoch, not two


def test_evaluate_reruns_the_test_and_exports_for_transformers(trained_run, synthetic_dir, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, VisionTextDualEncoderModel

    from evaluate import evaluate
    from src.modules.clip_analysis import load_image_index

    out, train_metrics, objects = trained_run
    export_dir = tmp_path / "export"
    overrides = demo_overrides(
        synthetic_dir,
        *EXPORTABLE,
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        f"export_dir={export_dir}",
        f"text_encoder_export_dir={tmp_path / 'text_encoder'}",
    )
    metrics, evaluated = evaluate(compose_config("evaluate.yaml", overrides, tmp_path))

    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert "| test/mrr@10 |" in (tmp_path / "metrics.md").read_text()
    analyses = tmp_path / "analyses"
    for name in ("pca.png", "retrieval_grid.png"):
        assert Image.open(analyses / name).size[0] > 100
    assert "cosine similarity" in (analyses / "similarity.md").read_text()
    keys, index = load_image_index(analyses / "image_index.safetensors")
    assert index.shape == (len(keys), 64) and torch.allclose(
        index.norm(dim=-1), torch.ones(len(keys)), atol=1e-4
    )

    # The export is the same model: transformers' embeddings equal ours.
    exported = VisionTextDualEncoderModel.from_pretrained(export_dir).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    model = evaluated["model"].eval()
    captions = ["a large red circle", "큰 빨간 원"]
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(text=captions, images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = exported(**inputs)
        ours_text = model.encoder.encode_text(inputs["input_ids"], inputs["attention_mask"])
        ours_image = model.encoder.encode_image(inputs["pixel_values"])
    assert torch.allclose(theirs.text_embeds, ours_text, atol=1e-5)
    assert torch.allclose(theirs.image_embeds, ours_image, atol=1e-5)

    from transformers import pipeline

    # The text tower alone serves as a sentence encoder (e.g. for the DCGAN's precomputed features).
    from src.data.text_features import TextFeatureEncoder

    sentence_encoder = TextFeatureEncoder(name_or_path=str(tmp_path / "text_encoder"), pooling="cls")
    with torch.no_grad():
        ids = processor.tokenizer(captions[:1], return_tensors="pt")["input_ids"]
        expected = model.encoder.model.text_model(input_ids=ids).last_hidden_state[0, 0]
    assert torch.allclose(sentence_encoder.encode(captions[:1])[0], expected, atol=1e-5)

    classify = pipeline("zero-shot-image-classification", model=str(export_dir))
    result = classify(image, candidate_labels=captions)
    assert {r["label"] for r in result} == set(captions) and sum(r["score"] for r in result) == pytest.approx(
        1.0, abs=1e-4
    )


def test_evaluate_requires_an_existing_checkpoint(synthetic_dir, tmp_path):
    from evaluate import evaluate

    cfg = compose_config(
        "evaluate.yaml", demo_overrides(synthetic_dir, f"ckpt_path={tmp_path / 'missing.ckpt'}"), tmp_path
    )
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        evaluate(cfg)


def test_ddp_on_two_cpu_processes_evaluates_every_test_sample_once(synthetic_dir, tmp_path):
    """Two gloo ranks read disjoint shards; the retrieval gallery gathers exactly the whole test split."""
    overrides = demo_overrides(
        synthetic_dir,
        "trainer=ddp_cpu",
        "trainer.strategy=ddp",
        "+trainer.limit_train_batches=2",
        "data.batch_size=16",
        "extras.print_config=false",
        f"hydra.run.dir={tmp_path}",
    )
    result = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    sizes = json.loads((synthetic_dir / "sizes.json").read_text())
    assert metrics["test/gallery_images"] == sizes["test"]
    assert metrics["val/gallery_images"] == sizes["val"]
