"""Precomputed caption features: encoder pooling, shard rewriting, row alignment, resume, corrupt samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.data.caption_encoder import CaptionEncoder
from src.data.schema import WebtoonSample, decode_npy
from src.data.shards import read_sizes, write_shards
from src.data.text_features import (
    METADATA_FILE,
    SAVED_ENCODER_DIR,
    caption_rows,
    load_text_encoder_from_features,
    precompute_text_features,
)
from src.utils.hub import MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]
KOREAN = ["빨간", "초록", "파란", "노란", "보라", "주황", "검은"]


def make_samples(n: int, prefix: str = "s") -> list[WebtoonSample]:
    """Samples with 2 English and up to 2 Korean captions; every third sample has an empty Korean caption."""
    from PIL import Image

    samples = []
    for i in range(n):
        colour, korean = COLOURS[i % len(COLOURS)], KOREAN[i % len(KOREAN)]
        samples.append(
            WebtoonSample(
                key=f"{prefix}{i:04d}",
                image=Image.new("RGB", (8, 8), ((40 * i) % 256, 0, 0)),
                captions_en=[f"a {colour} circle", f"a big {colour} square number {i}"],
                captions_ko=[f"{korean} 원", "" if i % 3 == 0 else f"큰 {korean} 사각형"],
                image_id=i,
            )
        )
    return samples


def write_tokenizer(directory: Path) -> str:
    """A WordPiece vocabulary covering every word and character of the test captions (no hub access)."""
    from transformers import BertTokenizer

    words = set(COLOURS + KOREAN + ["a", "big", "circle", "square", "number", "원", "큰", "사각형"])
    chars = {ch for w in words for ch in w} | set("0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words), *sorted(chars)]
    vocab += [f"##{ch}" for ch in sorted(chars)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # Cased like multilingual BERT: lower-casing NFD-decomposes Hangul syllables into jamo (all [UNK] here).
    BertTokenizer.from_pretrained(str(directory), do_lower_case=False).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def saved_encoder_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny BERT saved with save_pretrained: loading it by path is the user's pretrained-encoder code path."""
    path = tmp_path_factory.mktemp("tiny_bert")
    CaptionEncoder(name_or_path=None, config=TINY_BERT, tokenizer=tokenizer_dir, seed=1).save(path)
    return str(path)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards")
    write_shards(make_samples(7), path, "train", samples_per_shard=4)
    return path


def read_output(path: Path) -> dict[str, dict]:
    """Every record of a shard, read with plain webdataset: key -> {json, features, image bytes}."""
    import webdataset as wds

    records = {}
    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        records[sample["__key__"]] = {
            "json": json.loads(sample["json"]),
            "features": decode_npy(sample["txtfeat.npy"]),
            "jpg": sample["jpg"],
        }
    return records


def test_encoder_by_path_pools_cls_and_mean(saved_encoder_dir):
    texts = ["a red circle", "큰 빨간 원", "a big blue square number 3"]
    cls = CaptionEncoder(name_or_path=saved_encoder_dir, pooling="cls", batch_size=2)
    mean = CaptionEncoder(name_or_path=saved_encoder_dir, pooling="mean", batch_size=2)
    vectors = cls.encode(texts)
    assert vectors.shape == (3, 32) and vectors.dtype == torch.float32
    assert not torch.allclose(vectors, mean.encode(texts))
    # Batching and length sorting must not change a caption's vector (padding is masked).
    single = torch.cat([cls.encode([t]) for t in texts])
    torch.testing.assert_close(vectors, single, atol=1e-5, rtol=1e-4)
    # Tokenizer sanity: Korean captions are not all [UNK].
    ids = cls.tokenizer("큰 빨간 원")["input_ids"]
    assert cls.tokenizer.unk_token_id not in ids
    assert cls.encode([]).shape == (0, 32)


def test_precompute_writes_aligned_features(tmp_path, shard_dir, saved_encoder_dir):
    encoder = CaptionEncoder(name_or_path=saved_encoder_dir, batch_size=4)
    out = tmp_path / "features"
    stats = precompute_text_features(
        str(shard_dir / "train-{000000..000001}.tar"), out, encoder, progress=False
    )
    assert stats["shards_written"] == 2 and stats["samples_written"] == 7 and stats["samples_corrupt"] == 0
    assert read_sizes(out) == {"train": 7}
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["encoder"] == str(Path(saved_encoder_dir).resolve())
    assert (metadata["pooling"], metadata["dim"], metadata["max_length"]) == ("cls", 32, 64)

    expected = {s.key: s for s in make_samples(7)}
    seen = 0
    for shard in sorted(out.glob("train-*.tar")):
        for key, record in read_output(shard).items():
            sample = expected[key]
            captions = record["json"]["feature_captions"]
            # Recorded order = captions_en + captions_ko without blanks, the schema's captions() order.
            assert captions == sample.captions()
            assert record["json"]["feature_languages"] == ["en"] * 2 + ["ko"] * (len(captions) - 2)
            assert record["json"]["captions_ko"] == sample.captions_ko  # original metadata kept
            assert record["features"].dtype == np.float16
            reference = encoder.encode(captions).numpy()
            np.testing.assert_allclose(record["features"].astype(np.float32), reference, atol=2e-3, rtol=2e-3)
            seen += 1
    assert seen == 7
    assert (
        sum(1 for s in expected.values() if "" in s.captions_ko) >= 2
    )  # the blank-caption path was exercised


def test_training_reader_finds_each_captions_vector(tmp_path, saved_encoder_dir):
    """The data layer's decoder reads the output: every caption maps to its own vector (img2dataset .txt too)."""
    import webdataset as wds

    from src.data.pipeline import decode_record, feature_row, features_of

    source = tmp_path / "source"
    source.mkdir()
    records = [s.to_record() for s in make_samples(3)]
    records.append({"__key__": "img2ds01", "jpg": records[0]["jpg"], "txt": b"a red circle\n", "json": b"{}"})
    with wds.TarWriter(str(source / "train-000000.tar")) as sink:
        for record in records:
            sink.write(record)
    encoder = CaptionEncoder(name_or_path=saved_encoder_dir)
    precompute_text_features(str(source / "train-000000.tar"), tmp_path / "out", encoder, progress=False)

    reader = wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False, empty_check=False)
    samples = [decode_record(record) for record in reader]
    assert [s.key for s in samples] == ["s0000", "s0001", "s0002", "img2ds01"]
    assert samples[-1].captions() == ["a red circle"]
    for sample in samples:
        for caption in sample.captions():
            vector = features_of(sample, [feature_row(sample, caption)])
            np.testing.assert_allclose(vector, encoder.encode([caption]).numpy(), atol=2e-3, rtol=2e-3)


def test_resume_reencodes_only_missing_shard(tmp_path, shard_dir, saved_encoder_dir):
    encoder = CaptionEncoder(name_or_path=saved_encoder_dir, batch_size=4)
    out = tmp_path / "features"
    shards = [str(shard_dir / "train-000000.tar"), str(shard_dir / "train-000001.tar")]
    precompute_text_features(shards, out, encoder, progress=False)
    before = {p.name: read_output(p) for p in out.glob("train-*.tar")}

    raw_before = (out / "train-000001.tar").read_bytes()
    (out / "train-000001.tar").unlink()
    encoded: list[str] = []
    original = encoder.encode

    def counting_encode(texts):
        encoded.extend(texts)
        return original(texts)

    encoder.encode = counting_encode
    stats = precompute_text_features(shards, out, encoder, progress=False)
    assert (stats["shards_skipped"], stats["shards_written"]) == (1, 1)
    missing = [c for s in make_samples(7)[4:] for c in s.captions()]  # the samples of shard 1
    assert sorted(encoded) == sorted(missing)
    assert (out / "train-000001.tar").read_bytes() == raw_before
    after = {p.name: read_output(p) for p in out.glob("train-*.tar")}
    assert before.keys() == after.keys()
    for name, records in before.items():
        for key, record in records.items():
            assert after[name][key]["json"] == record["json"]
            assert after[name][key]["jpg"] == record["jpg"]
            np.testing.assert_array_equal(after[name][key]["features"], record["features"])
    assert read_sizes(out) == {"train": 7}
    assert not list(out.glob("*.tmp"))


def test_corrupt_sample_is_skipped_and_counted(tmp_path, saved_encoder_dir):
    import webdataset as wds

    source = tmp_path / "source"
    write_shards(make_samples(3), source, "val", samples_per_shard=10)
    broken = tmp_path / "broken"
    broken.mkdir()
    with wds.TarWriter(str(broken / "val-000000.tar")) as sink:
        for record in read_raw(source / "val-000000.tar"):
            sink.write(record)
        sink.write({"__key__": "bad0001", "jpg": b"\xff\xd8", "json": b"{not json"})

    encoder = CaptionEncoder(name_or_path=saved_encoder_dir)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        stats = precompute_text_features(str(broken / "val-*.tar"), tmp_path / "out", encoder, progress=False)
    assert stats["samples_corrupt"] == 1 and stats["samples_written"] == 3
    assert set(read_output(tmp_path / "out" / "val-000000.tar")) == {"s0000", "s0001", "s0002"}
    assert read_sizes(tmp_path / "out") == {"val": 3}


def test_a_shard_that_fails_half_way_is_not_marked_done_and_a_rerun_redoes_it(tmp_path, saved_encoder_dir):
    source = tmp_path / "source"
    write_shards(make_samples(6), source, "val", samples_per_shard=3)
    intact = (source / "val-000001.tar").read_bytes()
    (source / "val-000001.tar").write_bytes(intact[: len(intact) * 2 // 3])
    encoder = CaptionEncoder(name_or_path=saved_encoder_dir)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="not written: .*val-000001.tar"):
        precompute_text_features(str(source / "val-*.tar"), out, encoder, progress=False)
    assert (out / "val-000000.tar").is_file()  # the readable shard is done
    assert not (out / "val-000001.tar").exists() and not list(out.glob("*.tmp"))
    assert "val" not in read_sizes(out)  # the split is not complete, so nothing reads it as such

    (source / "val-000001.tar").write_bytes(intact)  # the input is repaired
    stats = precompute_text_features(str(source / "val-*.tar"), out, encoder, progress=False)
    assert (stats["shards_skipped"], stats["shards_written"]) == (1, 1)
    assert read_sizes(out) == {"val": 6}
    assert set(read_output(out / "val-000001.tar")) == {"s0003", "s0004", "s0005"}


def test_out_dir_must_differ_from_input_dir(shard_dir, saved_encoder_dir):
    encoder = CaptionEncoder(name_or_path=saved_encoder_dir)
    with pytest.raises(ValueError, match="holds input shards"):
        precompute_text_features(str(shard_dir / "train-*.tar"), shard_dir, encoder, progress=False)


def read_raw(path: Path) -> list[dict]:
    import webdataset as wds

    return [
        {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
        for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    ]


def test_random_encoder_is_saved_and_reloaded(tmp_path, shard_dir, tokenizer_dir):
    encoder = CaptionEncoder(
        name_or_path=None, config=TINY_BERT, tokenizer=tokenizer_dir, pooling="mean", seed=3
    )
    out = tmp_path / "features"
    precompute_text_features(str(shard_dir / "train-000000.tar"), out, encoder, progress=False)
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["saved_encoder"] == SAVED_ENCODER_DIR and metadata["pooling"] == "mean"
    assert (out / SAVED_ENCODER_DIR / "config.json").exists()

    # Moving the directory must not break the reload: the saved encoder is found relative to it.
    moved = tmp_path / "moved"
    out.rename(moved)
    reloaded = load_text_encoder_from_features(moved)
    assert reloaded.pooling == "mean" and reloaded.fingerprint() == encoder.fingerprint()
    texts = ["a red circle", "큰 빨간 원"]
    torch.testing.assert_close(reloaded.encode(texts), encoder.encode(texts), atol=0, rtol=0)
    stored = next(iter(read_output(moved / "train-000000.tar").values()))
    np.testing.assert_allclose(
        stored["features"].astype(np.float32),
        reloaded.encode(stored["json"]["feature_captions"]).numpy(),
        atol=2e-3,
        rtol=2e-3,
    )


def test_other_encoder_in_same_out_dir_is_refused(tmp_path, shard_dir, saved_encoder_dir, tokenizer_dir):
    out = tmp_path / "features"
    first = CaptionEncoder(name_or_path=saved_encoder_dir)
    precompute_text_features(str(shard_dir / "train-000000.tar"), out, first, progress=False)
    other = CaptionEncoder(name_or_path=None, config=TINY_BERT, tokenizer=tokenizer_dir, seed=99)
    with pytest.raises(ValueError, match="another encoder"):
        precompute_text_features(str(shard_dir / "train-000001.tar"), out, other, progress=False)


def test_caption_rows_drop_blanks_in_order():
    captions, languages = caption_rows({"captions_en": ["a", " ", "b"], "captions_ko": ["", "가"]})
    assert captions == ["a", "b", "가"] and languages == ["en", "en", "ko"]


def test_missing_hub_weights_name_the_setting(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError, match="encoder.name_or_path") as error:
        CaptionEncoder(name_or_path="bert-base-multilingual-cased")
    assert "bert-base-multilingual-cased" in str(error.value)


def test_config_composes_and_runs_in_process(tmp_path, shard_dir, tokenizer_dir, monkeypatch):
    """The real config with a random encoder (Hydra overrides as a user writes them), relative paths from cwd."""
    from hydra import compose, initialize_config_dir

    monkeypatch.syspath_prepend(str(ROOT))
    from precompute_text_features import precompute

    monkeypatch.chdir(tmp_path)
    os.symlink(shard_dir, tmp_path / "shards")
    overrides = [
        "shards=[shards/train-000000.tar,shards/train-000001.tar]",
        "out_dir=feats",
        "encoder.name_or_path=null",
        f"encoder.tokenizer={tokenizer_dir}",
        "encoder.config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
        "intermediate_size: 64, max_position_embeddings: 64}",
        "encoder.device=cpu",
        "progress=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="precompute_text_features", overrides=overrides)
    stats = precompute(cfg)
    assert stats["samples_written"] == 7 and read_sizes(tmp_path / "feats") == {"train": 7}
    assert load_text_encoder_from_features(tmp_path / "feats").dim == 32


@pytest.mark.slow
def test_cli_with_brace_pattern(tmp_path, shard_dir, saved_encoder_dir):
    """The Hydra entry point in a fresh process, run from another directory, leaves nothing in that directory."""
    work = tmp_path / "cwd"
    work.mkdir()
    os.symlink(shard_dir, work / "shards")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "precompute_text_features.py"),
            "shards='shards/train-{000000..000001}.tar'",
            "out_dir=feats",
            f"encoder.name_or_path={saved_encoder_dir}",
            "encoder.pooling=cls",
            "encoder.device=cpu",
            "progress=false",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["feats", "shards"]
    assert sorted(p.name for p in (work / "feats").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert read_sizes(work / "feats") == {"train": 7}
