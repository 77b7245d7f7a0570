"""The CLIP image index: a checkpoint and its export encode alike, the index holds every readable image with
its captions and pixels, exact search equals a full sort, builds resume per shard, other encoders are refused."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import make_samples
from hydra_runs import compose_plain
from PIL import Image

from src.data.shards import read_records, write_shards
from src.retrieval.encoder import CLIPEncoder
from src.retrieval.index import ImageIndex, IndexRow, build_image_index, exact_top_k

TEXTS = ["A large red circle in the middle of a white background.", "큰 빨간 원", "a blue star"]


def tiny_clip(tokenizer_dir: Path, seed: int):
    """A WebtoonCLIP of tiny random towers that reads 32 px images and the demo dataset's vocabulary."""
    from transformers import AutoTokenizer

    from src.modules.clip_module import WebtoonCLIP

    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    return WebtoonCLIP(
        text_encoder={"config": {"model_type": "bert", "vocab_size": vocab_size, **tower}, "pooling": "cls"},
        image_encoder={"config": {"model_type": "vit", "image_size": 32, "patch_size": 8, **tower}},
        preprocess={"image_size": 32, "tokenizer": str(tokenizer_dir), "max_length": 32},
        projection_dim=16,
    )


@pytest.fixture(scope="module")
def clips(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    """A CLIP trained for two steps, saved as train.py saves it (checkpoint) and exported; another CLIP."""
    import lightning as L

    out = tmp_path_factory.mktemp("clips")
    module = tiny_clip(synthetic_dir / "tokenizer", seed=0)
    tokens = module.preprocess.tokenize(["a red circle", "큰 파란 별"] * 2)
    batches = [
        {"image": image, **{k: v[i] for k, v in tokens.items()}}
        for i, image in enumerate(torch.randn(4, 3, 32, 32))
    ]
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=2))
    trainer.save_checkpoint(out / "clip.ckpt")
    module.export(out / "export")
    tiny_clip(synthetic_dir / "tokenizer", seed=1).export(out / "other")
    return {"checkpoint": out / "clip.ckpt", "export": out / "export", "other": out / "other"}


@pytest.fixture(scope="module")
def encoder(clips) -> CLIPEncoder:
    return CLIPEncoder.load(clips["checkpoint"])


@pytest.fixture(scope="module")
def built(synthetic_dir, encoder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("index")
    stats = build_image_index(
        str(synthetic_dir / "{train,val,test}-*.tar"), encoder, out, batch_size=32, progress=False
    )
    return out, stats


def shard_images(synthetic_dir: Path) -> list[tuple[str, Image.Image, dict]]:
    """Key, image and json of every record of the dataset, in shard order, read without the index."""
    out = []
    for split in ("train", "val", "test"):  # the order the brace pattern names them
        for shard in sorted(synthetic_dir.glob(f"{split}-*.tar")):
            for record in read_records(shard):
                out.append(
                    (
                        record["__key__"],
                        Image.open(io.BytesIO(record["jpg"])).convert("RGB"),
                        json.loads(record["json"]),
                    )
                )
    return out


def test_a_checkpoint_and_its_export_encode_alike_and_share_a_fingerprint(clips, synthetic_dir):
    checkpoint, export = CLIPEncoder.load(clips["checkpoint"]), CLIPEncoder.load(clips["export"])
    images = [image for _, image, _ in shard_images(synthetic_dir)[:5]] + [
        Image.new("RGB", (48, 30), (200, 30, 30))
    ]
    torch.testing.assert_close(
        checkpoint.encode_texts(TEXTS), export.encode_texts(TEXTS), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        checkpoint.encode_images(images), export.encode_images(images), atol=1e-5, rtol=1e-5
    )
    embeds = checkpoint.encode_texts(TEXTS)
    assert embeds.shape == (3, 16) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds.norm(dim=1), torch.ones(3))

    assert checkpoint.record["kind"] == "checkpoint" and export.record["kind"] == "export"
    assert checkpoint.record["path"] == str(clips["checkpoint"].resolve())
    assert checkpoint.record["fingerprint"] == export.record["fingerprint"]
    assert checkpoint.record["config_hash"] == export.record["config_hash"]
    other = CLIPEncoder.load(clips["other"])
    assert other.record["fingerprint"] != export.record["fingerprint"]
    # the same architecture, other weights
    assert other.record["config_hash"] == export.record["config_hash"]


def test_a_missing_clip_fails_with_one_message_naming_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="`clip`.*does not exist"):
        CLIPEncoder.load(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="`panel.clip`"):
        CLIPEncoder.load(tmp_path / "empty", setting="panel.clip")
    torch.save({"state_dict": {}, "hyper_parameters": {"generator": {}}}, tmp_path / "gan.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint of the CLIP"):
        CLIPEncoder.load(tmp_path / "gan.ckpt")


def test_the_index_holds_every_image_with_its_key_captions_and_pixels(built, synthetic_dir, encoder):
    out, stats = built
    records = shard_images(synthetic_dir)
    index = ImageIndex.load(out)
    assert len(index) == len(records) == stats["images"] == 240 and stats["skipped"] == {}
    assert stats["dim"] == 16 and stats["shards"] == len(list(synthetic_dir.glob("*.tar")))
    assert [row.key for row in index.rows] == [key for key, _, _ in records]
    for row, (_, _, meta) in zip(index.rows, records, strict=True):
        assert row.captions_en == tuple(meta["captions_en"]) and row.captions_ko == tuple(meta["captions_ko"])
        assert row.member == f"{row.key}.jpg" and Path(row.shard).is_file()
    assert index.embeddings.dtype == torch.float32 and index.embeddings.shape == (240, 16)
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(240))
    assert index.encoder == encoder.record
    # pixels come back by offset, equal to the shard's image; the embeddings are the encoder's
    for row in (0, 97, 239):
        assert np.array_equal(np.asarray(index.image(row)), np.asarray(records[row][1]))
    assert index.image(index.rows[5]).mode == "RGB"
    sample = [records[i][1] for i in (0, 97, 239)]
    torch.testing.assert_close(
        index.embeddings[[0, 97, 239]], encoder.encode_images(sample), atol=1e-5, rtol=1e-5
    )
    recorded = json.loads((out / "index.json").read_text())
    assert (
        recorded["count"] == 240 and recorded["dtype"] == "float32" and recorded["encoder"] == encoder.record
    )


def test_float16_halves_the_bytes_and_resumes_from_the_float32_parts(
    built, encoder, synthetic_dir, tmp_path, monkeypatch
):
    out, _ = built
    shutil.copytree(out / "parts", tmp_path / "parts")
    calls = count_encoding(encoder, monkeypatch)
    stats = build_image_index(
        str(synthetic_dir / "{train,val,test}-*.tar"), encoder, tmp_path, dtype="float16", progress=False
    )
    assert calls() == 0 and stats["encoded_shards"] == 0 and stats["resumed_shards"] == stats["shards"]
    half, full = ImageIndex.load(tmp_path), ImageIndex.load(out)
    assert half.embeddings.dtype == torch.float16 and half.embeddings.nbytes * 2 == full.embeddings.nbytes
    size = {d: (d / "embeddings.safetensors").stat().st_size for d in (out, tmp_path)}
    assert size[tmp_path] / size[out] < 0.51
    torch.testing.assert_close(half.embeddings.float(), full.embeddings, atol=1e-3, rtol=0)
    # float16 moves scores by ~1e-4: the same top-1 wherever the float32 top-2 are further apart than that
    queries = full.embeddings[:40]
    for found_half, found_full in zip(half.search(queries, 2), full.search(queries, 2), strict=True):
        assert found_half[0].score == pytest.approx(found_full[0].score, abs=1e-3)
        if found_full[0].score - found_full[1].score > 1e-3:
            assert found_half[0].row == found_full[0].row


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_search_equals_a_full_sort_across_chunk_boundaries(dtype, threads, monkeypatch):
    import src.retrieval.index as index_module

    # a few float32 queries are searched in one slice of rows per thread, merged after
    monkeypatch.setattr(index_module, "PARALLEL_MIN_ROWS", 16)
    monkeypatch.setattr(index_module.torch, "get_num_threads", lambda: threads)
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(1000, 24, generator=generator), dim=1).to(dtype)
    queries = torch.nn.functional.normalize(torch.randn(9, 24, generator=generator), dim=1)
    # float16 rows summed in float32: many of these scores are closer than float16 can tell apart
    reference = queries @ embeddings.float().T
    expected_rows = reference.argsort(dim=1, descending=True)
    # 9 queries and 1 or 2 queries take float16's two paths (widened rows; matrix-vector product + re-scoring)
    for batch in (slice(0, 9), slice(0, 1), slice(3, 5)):
        for chunk_rows in (50, 333, 1000, None):
            for top_k in (1, 10, 2000):
                scores, rows = exact_top_k(embeddings, queries[batch], top_k, chunk_rows)
                k = min(top_k, 1000)
                assert torch.equal(rows, expected_rows[batch, :k]), (batch, chunk_rows, top_k)
                torch.testing.assert_close(scores, reference[batch].gather(1, expected_rows[batch, :k]))
    # a crowd: more rows than float16 can tell apart from the k-th best, so every row must be looked at
    noise = 2e-3 * torch.randn(300, 24, generator=generator)
    crowd = torch.nn.functional.normalize(queries[0] + noise, dim=1)
    crowded = torch.cat([embeddings[:700], crowd.to(dtype)])
    crowd_reference = queries[:1] @ crowded.float().T
    for top_k in (1, 10, 150):  # near 1.0 float32 itself has ties: the right scores, each row once
        scores, rows = exact_top_k(crowded, queries[:1], top_k)
        assert torch.equal(scores, crowd_reference.sort(dim=1, descending=True).values[:, :top_k])
        assert torch.equal(crowd_reference.gather(1, rows), scores) and rows.unique().numel() == top_k
    rows = [IndexRow(f"k{i}", "shard.tar", f"k{i}.jpg", 0, 1) for i in range(1000)]
    index = ImageIndex(embeddings, rows, {"fingerprint": "f"}, chunk_rows=100)
    hits = index.search(queries, top_k=3)
    assert [[hit.row for hit in found] for found in hits] == expected_rows[:, :3].tolist()
    assert hits[2][0].key == f"k{int(expected_rows[2, 0])}"
    assert hits[2][0].score == pytest.approx(float(reference[2, expected_rows[2, 0]]), abs=1e-6)


def test_a_query_equal_to_an_indexed_image_finds_it_first_and_other_encoders_are_refused(
    built, encoder, clips
):
    out, _ = built
    index = ImageIndex.load(out)
    rows = [3, 50, 200]
    hits = index.search(encoder.encode_images([index.image(r) for r in rows]), top_k=5)
    assert [found[0].row for found in hits] == rows
    assert all(found[0].score == pytest.approx(1.0, abs=1e-5) and len(found) == 5 for found in hits)
    assert all(found[i].score >= found[i + 1].score for found in hits for i in range(4))
    text_hits = index.search_texts(
        CLIPEncoder.load(clips["export"]), TEXTS, top_k=2
    )  # the export is the same CLIP
    assert [[hit.row for hit in found] for found in text_hits] == [
        [hit.row for hit in found] for found in index.search(encoder.encode_texts(TEXTS), top_k=2)
    ]
    with pytest.raises(ValueError, match=f"{clips['other'].name}.*{clips['checkpoint'].name}"):
        index.search_texts(CLIPEncoder.load(clips["other"]), TEXTS)


def count_encoding(encoder: CLIPEncoder, monkeypatch) -> Callable[[], int]:
    """Count the images ``encoder`` embeds from now on (until the test ends); returns the counter."""
    embedded = []
    original = encoder.encode_images
    monkeypatch.setattr(encoder, "encode_images", lambda images: embedded.extend(images) or original(images))
    return lambda: len(embedded)


def test_a_rebuild_resumes_finished_shards_and_corrupt_records_are_counted(clips, tmp_path, monkeypatch):
    good, mixed = tmp_path / "good", tmp_path / "mixed"
    write_shards(make_samples(6, "a"), good, "train", samples_per_shard=3)
    records = [sample.to_record() for sample in make_samples(4, "b")]
    records[0]["jpg"] = b"not a jpeg"
    records[1]["json"] = b"{not json"
    del records[2]["jpg"]
    mixed.mkdir()
    with wds.TarWriter(str(mixed / "train-000000.tar")) as sink:
        for record in records:
            sink.write(record)
    shards = [str(good / "train-*.tar"), str(mixed / "train-000000.tar")]
    encoder = CLIPEncoder.load(clips["checkpoint"])
    calls = count_encoding(encoder, monkeypatch)
    out = tmp_path / "index"
    first = build_image_index(shards, encoder, out, batch_size=4, progress=False)
    assert first["images"] == 7 and calls() == 7 and first["encoded_shards"] == 3
    assert first["skipped"] == {"bad_image": 1, "bad_json": 1, "no_image": 1}
    assert json.loads((out / "index.json").read_text())["skipped"] == first["skipped"]
    assert [row.key for row in ImageIndex.load(out).rows] == [f"a{i:05d}" for i in range(6)] + ["b00003"]

    again = build_image_index(shards, encoder, out, batch_size=4, progress=False)
    assert calls() == 7 and again["resumed_shards"] == 3 and again["images"] == 7
    # a shard rewritten since its part was made is embedded again, and only that one
    write_shards(make_samples(6, "c"), good, "train", samples_per_shard=3)
    third = build_image_index(shards, encoder, out, batch_size=4, progress=False)
    assert calls() == 7 + 6 and third["encoded_shards"] == 2 and third["resumed_shards"] == 1
    assert ImageIndex.load(out).rows[0].key == "c00000"

    with pytest.raises(ValueError, match="another CLIP"):
        build_image_index(shards, CLIPEncoder.load(clips["other"]), out, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "train-000000.tar")) as sink:
        sink.write(records[0])
    with pytest.raises(ValueError, match="No image.*bad_image=1"):
        build_image_index(str(bad / "*.tar"), encoder, tmp_path / "empty", progress=False)
    with pytest.raises(FileNotFoundError, match="shards="):
        build_image_index(str(tmp_path / "none-*.tar"), encoder, tmp_path / "empty", progress=False)


def test_prepare_data_source_index_writes_a_loadable_index(clips, synthetic_dir, tmp_path, user_error):
    """python prepare_data.py source=index clip=CKPT shards='DIR/val-*.tar' out_dir=OUT index.dtype=float16"""
    from test_captioning import load_prepare_data

    module = load_prepare_data()

    def prepare_data(*overrides: str) -> dict:
        argv = module.hydra_overrides(["prepare_data.py", "source=index", *overrides])
        return module.main(compose_plain("prepare_data.yaml", argv[1:]))

    out = tmp_path / "index"
    stats = prepare_data(
        f"clip={clips['export']}",
        f"shards={synthetic_dir}/{{val,test}}-*.tar",
        f"out_dir={out}",
        "index.dtype=float16",
    )
    index = ImageIndex.load(out)
    assert stats["images"] == len(index) == 48 and index.embeddings.dtype == torch.float16
    assert index.encoder["kind"] == "export" and index.rows[0].key.startswith("val")
    with user_error("needs clip="):
        prepare_data(f"shards={synthetic_dir}/val-*.tar", f"out_dir={out}")
    with user_error("`clip`"):
        prepare_data(f"clip={tmp_path / 'nothing'}", f"shards={synthetic_dir}/val-*.tar", f"out_dir={out}")
    with pytest.raises(FileNotFoundError, match="`panel.index`.*prepare_data.py source=index"):
        ImageIndex.load(tmp_path / "nothing", setting="panel.index")


def test_faiss_hnsw_finds_the_exact_top_1_of_easy_queries(built, encoder):
    pytest.importorskip("faiss")
    out, _ = built
    exact = ImageIndex.load(out)
    rows = list(range(0, 240, 7))
    queries = exact.embeddings[rows]
    approximate = ImageIndex.load(out, backend="faiss")
    found = approximate.search(queries, top_k=3)
    assert [hits[0].row for hits in found] == rows
    # its scores are the similarities, as exact search's
    for hits, exact_hits in zip(found, exact.search(queries, top_k=3), strict=True):
        assert [h.score for h in hits] == pytest.approx([h.score for h in exact_hits], abs=1e-5)
    assert (out / "hnsw.faiss").is_file()
    reloaded = ImageIndex.load(out, backend="faiss")  # read from the saved graph
    text_queries = encoder.encode_texts(TEXTS)
    assert [[h.row for h in f] for f in reloaded.search(text_queries, 5)] == [
        [h.row for h in f] for f in approximate.search(text_queries, 5)
    ]
    exact_text = exact.search(text_queries, 1)
    assert [f[0].row for f in approximate.search(text_queries, 1)] == [f[0].row for f in exact_text]
