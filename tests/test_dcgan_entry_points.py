"""The DCGAN end to end: captions encoded once, train.py, and generate.py on its checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra_runs import ROOT, compose_config, compose_plain, execute_notebook, experiment_overrides


@pytest.fixture(scope="module")
def dcgan_run(synthetic_dir, tiny_towers, tmp_path_factory):
    """The random-text ablation: the one DCGAN demo whose encoder needs no CLIP training first."""
    from train import train

    out = tmp_path_factory.mktemp("dcgan_run")
    data_dir = tmp_path_factory.mktemp("dcgan_data")
    overrides = experiment_overrides(
        "dcgan_demo_random_text",
        synthetic_dir,
        data_dir,
        tiny_towers,
        # one epoch of 100 steps over the 192 training images (the shards repeat within an epoch)
        "~trainer.limit_train_batches",
        "data.train_samples=3200",
    )
    metrics, objects = train(compose_config("train.yaml", overrides, out))
    return out, data_dir / "synthetic_random_text_features", metrics, objects


def test_features_are_computed_once_and_the_checkpoint_records_their_encoder(dcgan_run, synthetic_dir):
    out, features_dir, _, objects = dcgan_run
    sizes = json.loads((synthetic_dir / "sizes.json").read_text())
    assert json.loads((features_dir / "sizes.json").read_text()) == sizes
    metadata = json.loads((features_dir / "text_features.json").read_text())
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    record = checkpoint["hyper_parameters"]["caption_encoder"]
    assert record["fingerprint"] == metadata["fingerprint"]
    assert Path(record["encoder"]) == (features_dir / "text_encoder").resolve()
    # the demos test the generator as training left it (their FID is a small extractor's, noisy epoch to epoch)
    assert objects["trainer"].checkpoint_callback.monitor is None


def test_the_thesis_dcgan_keeps_the_checkpoint_with_the_lowest_fid():
    cfg = compose_plain("train.yaml", ["experiment=dcgan_webtoon", "data.root=/data/coco_webtoon/hayao"])
    checkpoint = cfg.callbacks.model_checkpoint
    assert checkpoint.monitor == "val/fid" and checkpoint.mode == "min"


def test_training_lowers_fid_below_the_untrained_generator(dcgan_run):
    out, _, metrics, _ = dcgan_run
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")[1:]]
        for line in (out / "metrics.md").read_text().splitlines()[2:]
        if line.startswith("|")
    }
    trained, untrained = float(rows["test/fid"][0]), float(rows["test/fid"][1])
    assert trained == pytest.approx(metrics["test/fid"], rel=1e-3)
    assert trained < 0.8 * untrained


def test_generate_needs_only_the_checkpoint(dcgan_run, tmp_path):
    """python generate.py ckpt_path=... captions=[...]: Korean and English, files named by index only."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from generate import generate_from_config
    from src.callbacks.sample_grid import CaptionSampleGrid
    from src.pipelines.loading import load_module

    out, _, _, objects = dcgan_run
    captions = ["../../etc/passwd 큰 빨간 원", "a large red circle"]
    checkpoint = out / "checkpoints" / "last.ckpt"
    overrides = [
        f"ckpt_path={checkpoint}",
        f"captions={json.dumps(captions, ensure_ascii=False)}",
        f"out_dir={tmp_path / 'generated'}",
        "num_per_caption=2",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=overrides)
    written = generate_from_config(cfg)["images"]
    files = sorted(p.name for p in (tmp_path / "generated").iterdir())
    assert files == ["000_0.png", "000_1.png", "001_0.png", "001_1.png", "manifest.json"]
    manifest = json.loads((tmp_path / "generated" / "manifest.json").read_text())
    assert manifest["images"] == written and written["000_1.png"] == captions[0]
    assert manifest["settings"]["seed"] == 0 and manifest["settings"]["num_per_caption"] == 2

    # The files hold exactly what the sample-grid callback draws with the checkpoint's module, seed for seed.
    images = CaptionSampleGrid(captions, num_per_caption=2, seed=0).render(load_module(checkpoint))
    saved = torch.from_numpy(np.array(Image.open(tmp_path / "generated" / "001_1.png")))
    expected = (images[1, 1] * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(saved, expected)
    # The manifest alone redraws the same pixels, from another directory.
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        again = compose(
            config_name="generate",
            overrides=[
                f"manifest={tmp_path / 'generated' / 'manifest.json'}",
                f"out_dir={tmp_path / 'again'}",
            ],
        )
    generate_from_config(again)
    for name in ("000_0.png", "001_1.png"):
        first = np.array(Image.open(tmp_path / "generated" / name))
        assert (first == np.array(Image.open(tmp_path / "again" / name))).all()
    # Same noise for every caption; different noise across a caption's images.
    assert not torch.equal(images[0, 0], images[0, 1])


def test_the_dcgan_notebook_draws_from_a_run_directory(dcgan_run):
    execute_notebook("dcgan_samples", dcgan_run[0])
