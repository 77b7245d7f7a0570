"""train.py / evaluate.py on the CLIP demo: outputs, learning, epoch length, resume, export, DDP, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra_runs import ROOT, compose_config, execute_notebook, synthetic_samples


def demo_overrides(synthetic_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=clip_demo",
        f"data.root={synthetic_dir}",
        f"data.builders.dataset.num_samples={synthetic_samples(synthetic_dir)}",
        "data.num_workers=0",
        "data.batch_size=16",
        "trainer.max_epochs=10",
        # the demo's 150 warmup steps are longer than these 120 steps; the schedule must reach its end
        "model.warmup_steps=100",
        "callbacks.model_summary=null",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(synthetic_dir, tmp_path_factory):
    from train import train

    out = tmp_path_factory.mktemp("train_run")
    metrics, objects = train(compose_config("train.yaml", demo_overrides(synthetic_dir), out))
    return out, metrics, objects


def test_train_writes_config_checkpoints_and_metrics(trained_run):
    out, metrics, _ = trained_run
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert "val/mrr@10" in metrics and "train/loss" in metrics
    for name in ("pca.png", "retrieval_grid.png", "similarity.md", "image_index.safetensors"):
        assert (out / "analyses" / name).is_file()


def test_the_clip_notebook_runs_on_a_run_directory(trained_run):
    execute_notebook("explore_clip", trained_run[0])


def test_a_short_demo_run_beats_chance_and_its_untrained_self(trained_run):
    out, metrics, objects = trained_run
    table = (out / "metrics.md").read_text().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["metric", "this run", "untrained", "chance (random ranking)"]
    row = next(line for line in table if line.startswith("| test/mrr@10 |"))
    ours, untrained, chance = (float(cell) for cell in row.strip("|").split("|")[1:])
    gallery = metrics["test/gallery_images"]
    assert chance == pytest.approx(sum(1 / r for r in range(1, 11)) / gallery, rel=1e-3)
    assert untrained < 2 * chance  # random towers rank at about chance
    assert ours > 2.5 * chance and ours > untrained + 0.15


def test_epoch_length_and_schedule_come_from_sizes_json(trained_run, synthetic_dir):
    _, _, objects = trained_run
    trainer = objects["trainer"]
    train_samples = json.loads((synthetic_dir / "sizes.json").read_text())["train"]
    assert trainer.num_training_batches == train_samples // 16
    assert trainer.global_step == 10 * (train_samples // 16)
    # the cosine schedule spans the whole run instead of collapsing after warmup
    assert trainer.estimated_stepping_batches == 10 * (train_samples // 16)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_evaluate_reruns_the_test_and_exports_for_transformers(trained_run, synthetic_dir, tmp_path):
    """The documented command: python evaluate.py experiment=clip_demo ckpt_path=... export_dir=DIR."""
    from PIL import Image
    from transformers import AutoProcessor, VisionTextDualEncoderModel, pipeline

    from evaluate import evaluate
    from src.data.caption_encoder import CaptionEncoder
    from src.modules.clip_analysis import load_image_index

    out, train_metrics, _ = trained_run
    export_dir = tmp_path / "export"
    overrides = demo_overrides(
        synthetic_dir,
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        f"export_dir={export_dir}",
        f"text_encoder_export_dir={tmp_path / 'text_encoder'}",
    )
    metrics, evaluated = evaluate(compose_config("evaluate.yaml", overrides, tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    keys, index = load_image_index(tmp_path / "analyses" / "image_index.safetensors")
    assert index.shape == (len(keys), 64)
    torch.testing.assert_close(index.norm(dim=-1), torch.ones(len(keys)))

    # The export is the same model: transformers' embeddings equal ours.
    exported = VisionTextDualEncoderModel.from_pretrained(export_dir).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    model = evaluated["model"].eval()
    captions = ["A large red circle in the middle of a white background.", "큰 빨간 원"]
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(text=captions, images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = exported(**inputs)
        ours_text = model.encoder.encode_text(inputs["input_ids"], inputs["attention_mask"])
        ours_image = model.encoder.encode_image(inputs["pixel_values"])
    torch.testing.assert_close(theirs.text_embeds, ours_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.image_embeds, ours_image, atol=1e-5, rtol=1e-5)

    # The text tower alone serves as a sentence encoder (e.g. for the DCGAN's precomputed features).
    sentence_encoder = CaptionEncoder(name_or_path=str(tmp_path / "text_encoder"), pooling="cls")
    with torch.no_grad():
        ids = processor.tokenizer(captions[:1], return_tensors="pt")["input_ids"]
        expected = model.encoder.model.text_model(input_ids=ids).last_hidden_state[0, 0]
    torch.testing.assert_close(sentence_encoder.encode(captions[:1])[0], expected, atol=1e-5, rtol=1e-5)

    classify = pipeline("zero-shot-image-classification", model=str(export_dir))
    labels = ["a red circle", "a blue square"]
    result = classify(image, candidate_labels=labels)
    assert {r["label"] for r in result} == set(labels)
    logits = (
        theirs.image_embeds
        @ exported.get_text_features(
            **processor(text=labels, return_tensors="pt", padding=True)
        ).pooler_output.T
    )
    assert result[0]["label"] == labels[int(logits.argmax())]


def test_evaluate_requires_an_existing_checkpoint(synthetic_dir, tmp_path):
    from evaluate import evaluate

    cfg = compose_config(
        "evaluate.yaml", demo_overrides(synthetic_dir, f"ckpt_path={tmp_path / 'missing.ckpt'}"), tmp_path
    )
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        evaluate(cfg)


def test_unknown_experiment_and_wrong_types_fail_at_once_from_the_command_line():
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=no_such_experiment"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no_such_experiment" in result.stderr and "clip_demo" in result.stderr
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=clip_demo", "trainer.max_epochs=abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "trainer.max_epochs='abc'" in result.stderr


@pytest.mark.slow
def test_ddp_cpu_as_configured_evaluates_every_sample_once_and_reshuffles_every_epoch(
    synthetic_dir, tmp_path
):
    """trainer=ddp_cpu (ddp, 2 gloo ranks launched from the command) with 2 loader workers per rank: the shared
    epoch counter reaches every rank's workers (a new shard order every epoch), and evaluation covers every sample
    once."""
    probe = tmp_path / "first_batches.jsonl"
    overrides = demo_overrides(
        synthetic_dir,
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "data.num_workers=2",
        "data.batch_size=16",
        "report.untrained=false",
        "analyses=false",
        "extras.print_config=false",
        "+callbacks.probe._target_=probes.FirstBatchKeys",
        f"+callbacks.probe.path={probe}",
        f"hydra.run.dir={tmp_path}",
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    sizes = json.loads((synthetic_dir / "sizes.json").read_text())
    assert metrics["test/gallery_images"] == sizes["test"]
    assert metrics["val/gallery_images"] == sizes["val"]
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    assert {(s["rank"], s["epoch"]) for s in seen} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for rank in (0, 1):
        first, second = (
            next(s["keys"] for s in seen if (s["rank"], s["epoch"]) == (rank, e)) for e in (0, 1)
        )
        assert first != second  # persistent workers saw the new epoch number
