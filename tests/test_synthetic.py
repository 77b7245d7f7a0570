"""The synthetic bilingual dataset: deterministic shards, learnable captions, a tokenizer with no [UNK]."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from src.data.shards import read_sizes
from src.demo.synthetic import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    KO_COLOUR_ADJ,
    POSITIONS,
    SIZES,
    STYLES,
    Scene,
    caption_scene,
    caption_vocabulary,
    changed_scene,
    colour_caption_set,
    dominant_background,
    dominant_colour,
    generate_synthetic_dataset,
    num_attribute_combinations,
    render_scene,
    sample_scene,
    scene_captions,
    synthetic_sample,
)

# Read by huggingface_hub when transformers is first imported (inside the tokenizer test).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NUM_SAMPLES = 60


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out_dir = tmp_path_factory.mktemp("synthetic")
    return out_dir, generate_synthetic_dataset(out_dir, NUM_SAMPLES, seed=0)


def shards(out_dir: Path, split: str) -> list[Path]:
    return sorted(out_dir.glob(f"{split}-*.tar"))


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    # Member names and payloads, not raw tar bytes: write_shards stamps each member with the current
    # time (webdataset's TarWriter mtime), so the archives differ in their headers from run to run.
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_samples(out_dir: Path, split: str) -> list[dict]:
    urls = [str(p) for p in shards(out_dir, split)]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_same_seed_same_shards_and_other_seed_differs(dataset, tmp_path):
    out_dir, _ = dataset
    generate_synthetic_dataset(tmp_path / "again", NUM_SAMPLES, seed=0)
    generate_synthetic_dataset(tmp_path / "other", NUM_SAMPLES, seed=1)
    for split in ("train", "val", "test"):
        first, again = shards(out_dir, split), shards(tmp_path / "again", split)
        assert [p.name for p in first] == [p.name for p in again]
        for a, b in zip(first, again, strict=True):
            assert tar_members(a) == tar_members(b)
    assert tar_members(shards(out_dir, "train")[0]) != tar_members(shards(tmp_path / "other", "train")[0])


def test_split_counts_match_sizes_json_and_every_split_has_four_shards(dataset):
    out_dir, counts = dataset
    assert counts == {"train": 48, "val": 6, "test": 6}
    assert read_sizes(out_dir) == counts
    for split, count in counts.items():
        assert len(shards(out_dir, split)) >= 4
        assert len(read_samples(out_dir, split)) == count


def test_plain_webdataset_reads_jpg_and_bilingual_json(dataset):
    out_dir, _ = dataset
    samples = read_samples(out_dir, "val")
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for sample in samples:
        assert {"jpg", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        assert len(meta["captions_en"]) == 5 and len(meta["captions_ko"]) == 5
        assert meta["style"] in STYLES and isinstance(meta["image_id"], int)
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)


def test_tokenizer_loads_offline_and_knows_every_caption(dataset):
    from transformers import AutoTokenizer

    out_dir, _ = dataset
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
    # Cased on purpose: lower-casing NFD-decomposes Hangul into jamo, which the vocabulary does not hold.
    assert tokenizer.tokenize("큰 빨간 원") == ["큰", "빨간", "원"]
    captions = []
    for split in ("train", "val", "test"):
        for sample in read_samples(out_dir, split):
            meta = json.loads(sample["json"])
            captions += meta["captions_en"] + meta["captions_ko"]
    ids = tokenizer(captions)["input_ids"]
    unknown = [c for c, row in zip(captions, ids, strict=True) if tokenizer.unk_token_id in row]
    assert not unknown, unknown[:3]


def test_vocabulary_covers_the_whole_grammar():
    chunks: set[str] = set()  # whitespace-separated pieces first: few distinct ones, cheap to split further
    for kind, colour, size, position, background in itertools.product(
        KINDS, COLOURS, SIZES, POSITIONS, BACKGROUNDS
    ):
        for style in STYLES:
            english, korean = scene_captions(Scene(kind, colour, size, position, background), style)
            chunks.update(" ".join(english + korean).split())
    words = {word for chunk in chunks for word in re.findall(r"\w+|[^\w\s]", chunk)}
    assert words <= set(caption_vocabulary()), words - set(caption_vocabulary())


def test_captions_are_specific():
    assert num_attribute_combinations() > 1000
    first_captions = Counter(
        synthetic_sample("train", i, seed=0, image_size=16).captions_en[0] for i in range(500)
    )
    shared = sum(n for n in first_captions.values() if n > 1)
    assert shared / 500 < 0.05


def test_captions_name_every_attribute_in_both_languages():
    scene = Scene(kind="circle", colour="red", size="large", position="left", background="sky blue")
    english = caption_scene(scene, "en", 0, "outline")
    assert english == "A large red circle on the left side of a sky blue background, drawn as an outline."
    assert (
        caption_scene(scene, "ko", 1, "outline") == "윤곽선으로 그린 큰 빨간 원이 하늘색 배경의 왼쪽에 있다."
    )
    # 을/를 and 이/가 follow the noun's final consonant.
    heart = Scene(kind="heart", colour="blue", size="small", position="center", background="white")
    assert "하트를" in caption_scene(heart, "ko", 0, "flat") and "하트가" in caption_scene(
        heart, "ko", 1, "flat"
    )
    english, korean = scene_captions(scene, "sketch")
    assert len(set(english)) == 5 and len(set(korean)) == 5
    with pytest.raises(ValueError, match="language"):
        caption_scene(scene, "fr", 0)


def test_colour_caption_set_matches_colours():
    scenes = colour_caption_set()
    assert {s.scene.colour for s in scenes} == set(COLOURS)
    for s in scenes:
        assert s.scene.colour in s.english.split() and KO_COLOUR_ADJ[s.scene.colour] in s.korean.split()
        drawings = s.render(3)
        assert all(dominant_colour(d) == s.scene.colour for d in drawings)
        assert drawings[0].tobytes() != drawings[1].tobytes()  # real drawings of one caption vary


def test_shape_colour_dominates_after_jpeg(dataset):
    out_dir, _ = dataset
    for sample in read_samples(out_dir, "train"):
        colour = json.loads(sample["json"])["captions_en"][4].split()[0]  # tag caption: "red circle, ..."
        assert dominant_colour(Image.open(io.BytesIO(sample["jpg"]))) == colour
    rng = random.Random(0)
    for _ in range(200):  # small images are the hard case: edges blend into the background
        scene, style = sample_scene(rng), rng.choice(STYLES)
        buffer = io.BytesIO()
        render_scene(scene, style, 32, rng).save(buffer, format="JPEG", quality=95)
        assert dominant_colour(Image.open(buffer)) == scene.colour, (scene, style)
        assert dominant_background(Image.open(buffer)) == scene.background, (scene, style)
    assert dominant_colour(Image.new("RGB", (8, 8), BACKGROUNDS["white"])) is None


def test_empty_split_and_regeneration_leave_no_stale_shards(tmp_path):
    generate_synthetic_dataset(tmp_path, 40, seed=0, image_size=16, samples_per_shard=1)  # 32 train shards
    counts = generate_synthetic_dataset(tmp_path, 8, seed=0, image_size=16, split_fractions=(1.0, 0.0, 0.0))
    assert counts == {"train": 8, "val": 0, "test": 0} == read_sizes(tmp_path)
    assert not shards(tmp_path, "val") and not shards(tmp_path, "test")
    assert len(read_samples(tmp_path, "train")) == 8
    with pytest.raises(ValueError, match="sum to 1"):
        generate_synthetic_dataset(tmp_path, 8, split_fractions=(0.5, 0.1, 0.1))


def test_changed_scene_changes_only_the_named_attribute_to_another_value():
    import dataclasses
    import random

    scene = Scene(kind="star", colour="red", size="small", position="center", background="white")
    values = {
        "kind": KINDS,
        "colour": COLOURS,
        "size": SIZES,
        "position": POSITIONS,
        "background": BACKGROUNDS,
    }
    rng = random.Random(0)
    for attribute, allowed in values.items():
        seen = set()
        for _ in range(40):
            changed = changed_scene(scene, attribute, rng)
            value = getattr(changed, attribute)
            assert value in allowed and value != getattr(scene, attribute)
            assert dataclasses.replace(changed, **{attribute: getattr(scene, attribute)}) == scene
            seen.add(value)
        assert len(seen) == len(allowed) - 1  # every other value is reachable
