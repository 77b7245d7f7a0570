"""The shard reader: round trip, corrupt samples, node x worker splitting, img2dataset shards, batches."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from unittest import mock

import pytest
import torch
from conftest import make_samples

from src.data.datamodule import WebtoonShardDataModule
from src.data.pipeline import SKIPPED_KEY, decode_record, shard_pipeline
from src.data.shards import read_sizes, write_shards


def _datamodule(tmp_path, **kwargs) -> WebtoonShardDataModule:
    defaults = dict(
        train_shards=str(tmp_path / "train-*.tar"),
        val_shards=str(tmp_path / "val-*.tar"),
        test_shards=str(tmp_path / "test-*.tar"),
        batch_size=4,
        num_workers=0,
        image_size=16,
        image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0),
    )
    return WebtoonShardDataModule(**(defaults | kwargs))


def _iterate(loader, datamodule=None) -> list[dict]:
    batches = []
    for batch in loader:
        if datamodule is not None:
            batch = datamodule.on_after_batch_transfer(batch, 0)
        batches.append(batch)
    return batches


def test_write_read_round_trip_keeps_images_and_captions(tmp_path):
    samples = make_samples(10)
    assert write_shards(samples, tmp_path, "val", samples_per_shard=3) == 10
    assert read_sizes(tmp_path) == {"val": 10}
    assert len(list(tmp_path.glob("val-*.tar"))) == 4

    batches = _iterate(_datamodule(tmp_path).val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert keys == [s.key for s in samples]  # evaluation reads in order, each sample once
    images = torch.cat([b["image"] for b in batches])
    expected = torch.tensor([s.image.getpixel((0, 0)) for s in samples], dtype=torch.float32) / 255
    # JPEG is lossy: a solid colour comes back within a few levels
    assert torch.allclose(images[:, :, 8, 8], expected, atol=4 / 255)
    captions = [c for b in batches for c in b["all_captions"]]
    assert captions == [c for s in samples for c in s.captions_en + s.captions_ko]
    index = torch.cat([b["caption_image_index"] for b in batches[:1]])
    assert index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def _tar_with(path, records: list[tuple[str, str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, ext, data in records:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _good_record(sample) -> list[tuple[str, str, bytes]]:
    record = sample.to_record()
    return [(sample.key, "jpg", record["jpg"]), (sample.key, "json", record["json"])]


def test_corrupt_samples_are_skipped_counted_and_never_fatal(tmp_path):
    good = make_samples(6)
    jpg = good[0].to_record()["jpg"]
    records = []
    for sample in good[:3]:
        records += _good_record(sample)
    records += [
        ("truncated", "jpg", jpg[: len(jpg) // 2]),
        ("truncated", "json", good[0].to_record()["json"]),
    ]
    records += [("badjson", "jpg", jpg), ("badjson", "json", b"{not json")]
    empty = json.dumps({"captions_en": ["", " "], "captions_ko": [""]}).encode()
    records += [("nocaption", "jpg", jpg), ("nocaption", "json", empty)]
    records += [("noimage", "json", good[0].to_record()["json"])]
    for sample in good[3:]:
        records += _good_record(sample)
    _tar_with(tmp_path / "test-000000.tar", records)

    datamodule = _datamodule(tmp_path)
    batches = _iterate(datamodule.test_dataloader(), datamodule)
    assert [k for b in batches for k in b["key"]] == [s.key for s in good]
    assert datamodule.skipped == Counter(bad_image=1, bad_json=1, no_caption=1, no_image=1)


def test_korean_only_training_draws_korean_captions_and_fixed_epoch_length(tmp_path):
    write_shards(make_samples(40), tmp_path, "train", samples_per_shard=7)
    datamodule = _datamodule(tmp_path, languages=["ko"], batch_size=8)
    batches = _iterate(datamodule.train_dataloader())
    assert len(batches) == 40 // 8
    assert all(len(b["key"]) == 8 for b in batches)
    for batch in batches:
        for key, caption in zip(batch["key"], batch["caption"], strict=True):
            i = int(key[1:])
            assert caption in (f"그림 {i}", f"사진 {i}")


def _keys_seen(urls, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "WORKER": str(worker),
        "NUM_WORKERS": str(num_workers),
    }
    pipeline = shard_pipeline(
        urls, lambda s: {"key": s.key}, lambda items: {"key": [i["key"] for i in items]}, 3, training=False
    )
    with mock.patch.dict(os.environ, env):
        return [k for batch in pipeline for k in batch["key"]]


def test_node_by_worker_split_reads_every_sample_exactly_once(tmp_path):
    samples = make_samples(50)
    write_shards(samples, tmp_path, "val", samples_per_shard=5)  # 10 shards over 2 nodes x 3 workers
    seen = [
        key
        for rank in range(2)
        for worker in range(3)
        for key in _keys_seen(str(tmp_path / "val-*.tar"), rank, 2, worker, 3)
    ]
    assert sorted(seen) == sorted(s.key for s in samples)
    assert len(seen) == len(set(seen))


def test_img2dataset_shards_are_read(tmp_path):
    sample = make_samples(1)[0]
    jpg = sample.to_record()["jpg"]
    meta = json.dumps(
        {"key": "000000001", "caption": "a cat on a mat", "status": "success", "url": "http://x"}
    ).encode()
    _tar_with(
        tmp_path / "test-000000.tar",
        [("000000001", "jpg", jpg), ("000000001", "txt", b"a cat on a mat"), ("000000001", "json", meta)],
    )
    decoded = decode_record({"__key__": "000000001", "jpg": jpg, "txt": b"a cat on a mat", "json": meta})
    assert decoded.captions_en == ["a cat on a mat"] and decoded.captions_ko == []
    batches = _iterate(_datamodule(tmp_path, languages=["en"]).test_dataloader())
    assert batches[0]["all_captions"] == ["a cat on a mat"]


def test_skip_counts_reach_the_main_process_from_workers(tmp_path):
    records = []
    for i, sample in enumerate(make_samples(8)):
        records += _good_record(sample)
        if i % 2:
            records += [(f"bad{i}", "jpg", b"not an image"), (f"bad{i}", "json", b"{}")]
    _tar_with(tmp_path / "val-000000.tar", records[: len(records) // 2])
    _tar_with(tmp_path / "val-000001.tar", records[len(records) // 2 :])
    datamodule = _datamodule(tmp_path, num_workers=2)
    batches = _iterate(datamodule.val_dataloader(), datamodule)
    assert sorted(k for b in batches for k in b["key"]) == [s.key for s in make_samples(8)]
    assert datamodule.skipped == Counter(bad_image=4)
    assert all(SKIPPED_KEY not in b for b in batches)


def test_text_features_and_mismatched_text_in_batches(tmp_path):
    import numpy as np

    samples = make_samples(8)
    for i, sample in enumerate(samples):
        sample.feature_captions = sample.captions()
        sample.text_features = np.stack([np.full(3, 10 * i + j, dtype=np.float32) for j in range(4)])
    write_shards(samples, tmp_path, "train", samples_per_shard=4)
    datamodule = _datamodule(tmp_path, text_features=True, batch_size=4, shuffle_buffer=1)
    for batch in _iterate(datamodule.train_dataloader()):
        for key, caption, vector in zip(batch["key"], batch["caption"], batch["text_features"], strict=True):
            i = int(key[1:])
            row = samples[i].captions().index(caption)
            assert torch.equal(vector, torch.full((3,), 10.0 * i + row))
        # the wrong text of each sample belongs to another sample of the batch
        owners = (batch["wrong_text_features"][:, 0] // 10).long()
        assert not torch.equal(owners, torch.tensor([int(k[1:]) for k in batch["key"]]))
        assert all(o != int(k[1:]) for o, k in zip(owners.tolist(), batch["key"], strict=True))


def test_missing_shards_fail_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        _datamodule(tmp_path).val_dataloader()
