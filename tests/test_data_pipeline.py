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
from src.data.pipeline import SKIPPED_KEY, DataStarvationError, decode_record, shard_pipeline
from src.data.shards import read_sizes, write_shards


def _datamodule(tmp_path, **kwargs) -> WebtoonShardDataModule:
    defaults = dict(
        root=str(tmp_path),
        batch_size=4,
        num_workers=0,
        preprocess={"image_size": 16, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]},
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


def test_worker_batches_arrive_normalised_in_shared_memory_as_the_main_process_makes_them(tmp_path):
    write_shards(make_samples(8), tmp_path, "val", samples_per_shard=4)
    preprocess = {"image_size": 16, "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    here = _iterate(_datamodule(tmp_path, preprocess=preprocess).val_dataloader())
    datamodule = _datamodule(tmp_path, preprocess=preprocess, num_workers=1)
    sent = _iterate(datamodule.val_dataloader(), datamodule)
    assert [b["key"] for b in sent] == [b["key"] for b in here]
    for from_worker, from_main in zip(sent, here, strict=True):
        assert from_worker["image"].dtype == torch.float32
        assert torch.equal(from_worker["image"], from_main["image"])
    pixels = torch.stack([b["image"] for b in here]).flatten(0, 1)
    mean, std = torch.tensor(preprocess["image_mean"]), torch.tensor(preprocess["image_std"])
    unnormalised = pixels * std.view(-1, 1, 1) + mean.view(-1, 1, 1)
    assert unnormalised.min() >= -1e-6 and unnormalised.max() <= 1 + 1e-6
    assert torch.allclose(unnormalised * 255, (unnormalised * 255).round(), atol=1e-3)  # uint8 levels


def test_a_worker_writes_its_batch_into_shared_memory_not_a_copy_made_when_sent(tmp_path):
    write_shards(make_samples(4), tmp_path, "val", samples_per_shard=4)
    datamodule = _datamodule(tmp_path)
    (in_main,) = _iterate(datamodule.val_dataloader())
    assert not in_main["image"].is_shared()
    with mock.patch("src.utils.workers.get_worker_info", return_value=object()):  # as a worker
        (in_worker,) = _iterate(datamodule.val_dataloader())
    assert in_worker["image"].is_shared()
    assert torch.equal(in_worker["image"], in_main["image"])


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


@pytest.mark.parametrize("workers", [0, 2])
def test_korean_only_training_draws_korean_captions_and_exact_epoch_length(tmp_path, workers):
    write_shards(make_samples(40), tmp_path, "train", samples_per_shard=7)
    datamodule = _datamodule(tmp_path, languages=["ko"], batch_size=8, num_workers=workers)
    loader = datamodule.train_dataloader()
    batches = _iterate(loader)
    # 5 batches, also with 2 workers (3 + 2), not rounded up to a multiple of the worker count
    assert len(batches) == len(loader) == 40 // 8
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


def test_root_is_a_directory_of_split_shards(tmp_path):
    write_shards(make_samples(6), tmp_path, "val", samples_per_shard=4)
    write_shards(make_samples(5, prefix="t"), tmp_path, "test", samples_per_shard=4)
    datamodule = _datamodule(tmp_path)
    assert datamodule.num_samples("val") == 6 and datamodule.num_samples("test") == 5
    assert [k for b in _iterate(datamodule.test_dataloader()) for k in b["key"]] == [
        f"t{i:05d}" for i in range(5)
    ]
    explicit = _datamodule(tmp_path, test_shards=str(tmp_path / "val-*.tar"))
    assert len([k for b in _iterate(explicit.test_dataloader()) for k in b["key"]]) == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_data_with_nothing_usable_stops_with_the_reason_and_the_setting(tmp_path, workers):
    english_only = make_samples(30)
    for sample in english_only:
        sample.captions_ko = []
    write_shards(english_only, tmp_path, "train", samples_per_shard=10)
    datamodule = _datamodule(
        tmp_path,
        languages=["ko"],
        num_workers=workers,
        skip_policy={"max_records_without_sample": 100},
    )
    with pytest.raises(DataStarvationError) as error:
        _iterate(datamodule.train_dataloader())
    message = str(error.value)
    assert "none of the last 100 records" in message and "no_caption=100" in message
    assert "data.languages" in message and "data.skip_policy.max_records_without_sample" in message


@pytest.mark.parametrize("workers", [0, 2])
def test_a_high_skip_ratio_stops_the_run(tmp_path, workers):
    records = []
    for i, sample in enumerate(make_samples(40)):
        records += _good_record(sample)
        if i % 4:  # 3 of every 4 good records are followed by a broken one: 43% skipped
            records += [(f"bad{i}", "jpg", b"not an image"), (f"bad{i}", "json", b"{}")]
    _tar_with(tmp_path / "train-000000.tar", records[: len(records) // 2])
    _tar_with(tmp_path / "train-000001.tar", records[len(records) // 2 :])
    (tmp_path / "sizes.json").write_text(json.dumps({"train": 40}))
    # No shuffle buffer: records come in file order, so every window of 20 holds about 43 % broken ones.
    options = dict(num_workers=workers, shuffle_buffer=1)
    strict = _datamodule(tmp_path, **options, skip_policy={"max_skip_ratio": 0.3, "window": 20})
    with pytest.raises(DataStarvationError, match=r"bad_image=\d+.*max_skip_ratio"):
        _iterate(strict.train_dataloader(), strict)
    tolerant = _datamodule(tmp_path, **options, skip_policy={"max_skip_ratio": 0.6, "window": 20})
    assert len(_iterate(tolerant.train_dataloader(), tolerant)) == 10


@pytest.mark.parametrize("workers", [0, 2])
def test_a_healthy_run_that_skips_logs_periodic_summaries_by_reason(tmp_path, workers, caplog):
    records = []
    for i, sample in enumerate(make_samples(24)):
        records += _good_record(sample)
        if i % 6 == 0:
            records += [(f"bad{i}", "jpg", b"not an image"), (f"bad{i}", "json", b"{}")]
        if i % 6 == 3:
            records += [(f"nojson{i}", "jpg", sample.to_record()["jpg"]), (f"nojson{i}", "json", b"[1]")]
    _tar_with(tmp_path / "train-000000.tar", records[: len(records) // 2])
    _tar_with(tmp_path / "train-000001.tar", records[len(records) // 2 :])
    (tmp_path / "sizes.json").write_text(json.dumps({"train": 24}))
    datamodule = _datamodule(tmp_path, num_workers=workers, skip_policy={"summary_every_s": 0})
    with caplog.at_level("WARNING", logger="src.data.datamodule"):
        for _ in range(2):  # two epochs
            _iterate(datamodule.train_dataloader(), datamodule)
    summaries = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summaries) >= 2
    assert "bad_image=" in summaries[-1] and "bad_json=" in summaries[-1]
    assert sum(datamodule.skipped.values()) == int(summaries[-1].split("skipped ")[1].split(" ")[0])


def test_empty_shards_stop_an_endless_training_stream(tmp_path):
    _tar_with(tmp_path / "train-000000.tar", [])
    _tar_with(tmp_path / "train-000001.tar", [])
    datamodule = _datamodule(tmp_path, train_samples=8)
    with pytest.raises(DataStarvationError, match="2 shards in a row held no record"):
        _iterate(datamodule.train_dataloader())


def test_a_caption_without_its_feature_row_is_skipped_not_fatal(tmp_path):
    import numpy as np

    samples = make_samples(4)
    for sample in samples:
        sample.feature_captions = sample.captions()
        sample.text_features = np.zeros((4, 3), dtype=np.float32)
    samples[1].feature_captions = ["a caption the sample does not have"] * 4
    samples[2].text_features = np.zeros((1, 3), dtype=np.float32)  # fewer rows than captions
    write_shards(samples, tmp_path, "val", samples_per_shard=10)
    datamodule = _datamodule(tmp_path, text_features=True)
    batches = _iterate(datamodule.val_dataloader(), datamodule)
    assert [k for b in batches for k in b["key"]] == [samples[0].key, samples[3].key]
    assert datamodule.skipped == Counter(bad_text_features=2)
