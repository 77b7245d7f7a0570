"""The DCGAN end to end: captions encoded once, train.py, evaluate.py and generate.py on its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_entry_points import compose_config


def dcgan_overrides(synthetic_dir: Path, features_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=dcgan_demo",
        f"paths.data_dir={synthetic_dir.parent}",
        "data.synthetic=null",
        f"data.precompute_features.shards={synthetic_dir}/*-*.tar",
        f"data.precompute_features.out_dir={features_dir}",
        f"data.precompute_features.encoder.tokenizer={synthetic_dir}/tokenizer",
        f"data.train_shards={features_dir}/train-*.tar",
        f"data.val_shards={features_dir}/val-*.tar",
        f"data.test_shards={features_dir}/test-*.tar",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=3",
        "callbacks.model_summary=null",
        "callbacks.sample_grid.num_per_caption=2",
        "callbacks.colour_agreement.num_per_caption=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def dcgan_run(synthetic_dir, tmp_path_factory):
    from train import train

    out = tmp_path_factory.mktemp("dcgan_run")
    features_dir = tmp_path_factory.mktemp("features")
    metrics, objects = train(compose_config("train.yaml", dcgan_overrides(synthetic_dir, features_dir), out))
    return out, features_dir, metrics, objects


def test_train_precomputes_features_once_and_reports_image_quality(dcgan_run, synthetic_dir):
    out, features_dir, metrics, objects = dcgan_run
    sizes = json.loads((synthetic_dir / "sizes.json").read_text())
    assert json.loads((features_dir / "sizes.json").read_text()) == sizes
    assert (features_dir / "text_features.json").is_file() and (features_dir / "text_encoder").is_dir()

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/fid"] >= 0.0 and saved["test/is"] >= 1.0 and "val/fid" in saved
    for language in ("en", "ko"):
        assert 0.0 <= saved[f"test/colour_match_{language}"] <= 1.0
    # the best checkpoint is chosen by FID, lower is better
    checkpoint = objects["trainer"].checkpoint_callback
    assert checkpoint.monitor == "val/fid" and checkpoint.mode == "min"
    assert Path(checkpoint.best_model_path).is_file()
    grids = sorted(out.rglob("samples/epoch_*.png"))
    assert [g.name for g in grids] == ["epoch_000.png", "epoch_001.png"]


def test_evaluate_puts_the_thesis_numbers_beside_ours(dcgan_run, synthetic_dir, tmp_path):
    from evaluate import evaluate

    out, features_dir, _, _ = dcgan_run
    overrides = dcgan_overrides(synthetic_dir, features_dir, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}")
    metrics, _ = evaluate(compose_config("evaluate.yaml", overrides, tmp_path))
    table = (tmp_path / "metrics.md").read_text()
    assert "| test/fid |" in table and "22.212" in table and "4.992" in table
    assert metrics["test/fid"] == pytest.approx(
        json.loads((tmp_path / "metrics.json").read_text())["test/fid"]
    )


def test_generate_draws_korean_and_english_captions_into_index_named_files(dcgan_run, tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image

    from generate import generate_from_config

    out, features_dir, _, _ = dcgan_run
    captions = ["../../etc/passwd 큰 빨간 원", "a large red circle"]
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "generate.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    cfg.merge_with(
        {
            "ckpt_path": str(out / "checkpoints" / "last.ckpt"),
            "captions": captions,
            "out_dir": str(tmp_path / "generated"),
            "features_dir": str(features_dir),
            "num_per_caption": 2,
            "device": "cpu",
        }
    )
    written = generate_from_config(cfg)
    files = sorted(p.name for p in (tmp_path / "generated").iterdir())
    assert files == ["000_0.png", "000_1.png", "001_0.png", "001_1.png", "captions.json"]
    assert Image.open(tmp_path / "generated" / "000_0.png").size == (64, 64)
    mapping = json.loads((tmp_path / "generated" / "captions.json").read_text())
    assert sorted(mapping.values()) == sorted(captions * 2) and len(written) == 4
