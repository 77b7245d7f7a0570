"""Shared fixtures: everything offline, small, and written in the real formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fail fast instead of retrying the hub for ~46 s; users with a network leave these unset.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
if "PYTEST_XDIST_WORKER" in os.environ:
    # One thread per xdist worker (and per process it starts): with one worker per core, more threads only
    # contend; measured on 2 cores, the diffusion tests ran in half the time.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_samples(n: int, prefix: str = "s", size: int = 16):
    """``n`` samples with a distinct solid colour each and 2 English + 2 Korean captions."""
    from PIL import Image

    from src.data.schema import WebtoonSample

    return [
        WebtoonSample(
            key=f"{prefix}{i:05d}",
            image=Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)),
            captions_en=[f"picture {i}", f"image number {i}"],
            captions_ko=[f"그림 {i}", f"사진 {i}"],
            style="flat",
            image_id=i,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small generated bilingual dataset, shared by the tests that need real-looking data."""
    from src.demo.synthetic import generate_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(out, num_samples=240, seed=0, image_size=64)
    return out


@pytest.fixture(scope="session")
def tiny_shape_judge(tmp_path_factory) -> Path:
    """The demo's shape judge trained for two steps: the wiring's stand-in (its accuracy is tested in
    test_shape_judge.py, not relied on elsewhere)."""
    from src.demo.shape_judge import train_shape_judge

    out = tmp_path_factory.mktemp("shape_judge")
    train_shape_judge(out, num_train=32, num_heldout=4, steps=2, batch_size=8)
    return out


@pytest.fixture(scope="session")
def tiny_towers(synthetic_dir, tiny_shape_judge, tmp_path_factory) -> dict[str, Path]:
    """Local copies of the hub towers, as a user without network makes them: a tiny BERT (with the demo
    dataset's tokenizer) and a tiny ViT for 224 px images, saved with ``save_pretrained``; the shape judge
    beside them."""
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

    out = tmp_path_factory.mktemp("towers")
    tokenizer = AutoTokenizer.from_pretrained(synthetic_dir / "tokenizer")
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(out / "bert")
    tokenizer.save_pretrained(out / "bert")
    vit = ViTModel(
        ViTConfig(
            image_size=224,
            patch_size=32,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    vit.save_pretrained(out / "vit")
    return {"bert": out / "bert", "vit": out / "vit", "shape_judge": tiny_shape_judge}


@pytest.fixture
def user_error(capsys):
    """``with user_error("needs model="):`` — an entry point's ``main`` stops with status 1 and one line on
    stderr that matches, as a user's mistake should end (src/utils/cli.py)."""
    import contextlib
    import re

    @contextlib.contextmanager
    def expect(pattern: str):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            yield
        assert stopped.value.code == 1
        stderr = capsys.readouterr().err
        lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
        assert len(lines) == 1 and re.search(pattern, lines[0]), stderr

    return expect
