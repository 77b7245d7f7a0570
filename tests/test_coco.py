"""COCO 2014 + AI Hub Korean captions -> shards, on tiny files in the official formats; prepare_data.py."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from src.data.coco import build_coco_shards
from src.data.shards import read_sizes

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IDS = [1, 2, 3, 4, 5]  # 3: no Korean entry, 4: only empty Korean captions, 5: file missing
VAL_IDS = list(range(101, 111))  # 101: some empty Korean captions, 110: garbage bytes
SEVEN_CAPTIONS = 2


def file_name(subset: str, image_id: int) -> str:
    return f"COCO_{subset}_{image_id:012d}.jpg"


def english(image_id: int) -> list[str]:
    count = 7 if image_id == SEVEN_CAPTIONS else 5
    return [f"caption {k} of image {image_id}" for k in range(count)]


def korean(image_id: int) -> list[str]:
    if image_id == 4:
        return ["", " ", "", "", ""]
    if image_id == 101:
        return [" 고양이 한 마리 ", "", "소파 위의 고양이", "", "잠자는 고양이"]
    return [f"이미지 {image_id}의 설명 {k}" for k in range(5)]


def write_captions(path: Path, subset: str, ids: list[int]) -> None:
    images = [{"id": i, "file_name": file_name(subset, i), "width": 32, "height": 24} for i in ids]
    annotations = [
        {"image_id": i, "id": 1000 * i + k, "caption": caption + " "}
        for i in ids
        for k, caption in enumerate(english(i))
    ]
    annotations.reverse()  # files do not list annotations in order; the loader sorts by id
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coco")
    for subset, ids in (("train2014", TRAIN_IDS), ("val2014", VAL_IDS)):
        (root / "images" / subset).mkdir(parents=True)
        for image_id in ids:
            path = root / "images" / subset / file_name(subset, image_id)
            if image_id == 5:
                continue
            if image_id == 110:
                path.write_bytes(b"\xff\xd8 definitely not a jpeg")
                continue
            colour = (image_id * 37 % 256, 200, 40)  # saturated, so a gray style is visible
            Image.new("RGB", (32, 24), colour).save(path, format="JPEG")
    write_captions(root / "captions_train2014.json", "train2014", TRAIN_IDS)
    write_captions(root / "captions_val2014.json", "val2014", VAL_IDS)
    entries = [
        {
            "file_path": f"{'val2014' if i > 100 else 'train2014'}/{file_name('val2014' if i > 100 else 'train2014', i)}",
            "captions": english(i)[:5],
            "id": i,
            "caption_ko": korean(i),
        }
        for i in TRAIN_IDS + VAL_IDS
        if i != 3
    ]
    # AI Hub's file is UTF-8 with Korean text unescaped (and sometimes a byte-order mark).
    (root / "korean.json").write_text("\ufeff" + json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    karpathy = [
        {"filepath": "train2014", "filename": file_name("train2014", 1), "cocoid": 1, "split": "train"},
        {"filepath": "train2014", "filename": file_name("train2014", 2), "cocoid": 2, "split": "val"},
        {"filepath": "train2014", "filename": file_name("train2014", 4), "cocoid": 4, "split": "test"},
        {"filepath": "val2014", "filename": file_name("val2014", 101), "cocoid": 101, "split": "restval"},
    ]
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    return {
        "captions_json": [root / "captions_train2014.json", root / "captions_val2014.json"],
        "images_dir": root / "images",
        "korean_json": root / "korean.json",
        "karpathy_json": root / "dataset_coco.json",
    }


def read_split(shard_dir: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted(shard_dir.glob(f"{split}-*.tar"))]
    return [
        {**json.loads(s["json"]), "key": s["__key__"], "jpg": s["jpg"]}
        for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def build(coco: dict[str, Path], out_dir: Path, **kwargs) -> dict:
    inputs = {k: v for k, v in coco.items() if k != "karpathy_json"}
    return build_coco_shards(out_dir=out_dir, samples_per_shard=3, **{**inputs, **kwargs})


def test_thesis_split_counts_and_captions(coco, tmp_path):
    counts = build(coco, tmp_path)
    splits = {split: counts.pop(split) for split in ("train", "val", "test")}
    assert counts == {
        "images": 15,
        "joined": 13,
        "missing_korean": 2,  # image 3 has no Korean entry, image 4 only empty captions
        "dropped_missing_korean": 0,
        "skipped_not_in_split": 0,
        "skipped_missing_image": 1,
        "skipped_unreadable_image": 1,
    }
    # 10 val2014 images cut 8:2, then the unreadable one is skipped from whichever side it fell on.
    assert splits["train"] == 4 and (splits["val"], splits["test"]) in {(7, 2), (8, 1)}
    shard_dir = tmp_path / "photo"
    assert read_sizes(shard_dir) == splits
    samples = {s["image_id"]: s for split in ("train", "val", "test") for s in read_split(shard_dir, split)}
    assert set(samples) == {1, 2, 3, 4} | set(range(101, 110))
    for image_id, sample in samples.items():
        assert sample["captions_en"] == english(image_id)  # stripped, annotation order, all 7 kept
        assert sample["style"] == "photo"
        assert sample["key"] == Path(file_name("val2014" if image_id > 100 else "train2014", image_id)).stem
    assert len(samples[SEVEN_CAPTIONS]["captions_en"]) == 7
    assert samples[101]["captions_ko"] == ["고양이 한 마리", "소파 위의 고양이", "잠자는 고양이"]
    assert samples[3]["captions_ko"] == [] and samples[4]["captions_ko"] == []
    assert samples[1]["captions_ko"] == korean(1)


def test_val2014_is_cut_8_to_2_deterministically_and_disjointly(coco, tmp_path):
    def splits(out_dir: Path, seed: int) -> dict[str, set[int]]:
        build(coco, out_dir, seed=seed)
        return {
            split: {s["image_id"] for s in read_split(out_dir / "photo", split)}
            for split in ("train", "val", "test")
        }

    first, again, other = splits(tmp_path / "a", 0), splits(tmp_path / "b", 0), splits(tmp_path / "c", 1)
    assert first == again
    assert first["train"] == {1, 2, 3, 4}
    assert not first["val"] & first["test"]
    assert first["val"] | first["test"] == set(range(101, 110))
    assert (len(first["val"]), len(first["test"])) in {(7, 2), (8, 1)}
    assert first["val"] != other["val"] or first["test"] != other["test"]


def test_karpathy_split_with_restval_in_train(coco, tmp_path):
    counts = build(coco, tmp_path, karpathy_json=coco["karpathy_json"])
    ids = {
        split: {s["image_id"] for s in read_split(tmp_path / "photo", split)}
        for split in ("train", "val", "test")
    }
    assert ids == {"train": {1, 101}, "val": {2}, "test": {4}}
    assert counts["skipped_not_in_split"] == 15 - 4


def test_require_korean_drops_english_only_images(coco, tmp_path):
    counts = build(coco, tmp_path, require_korean=True)
    assert counts["dropped_missing_korean"] == 2 and counts["train"] == 2


def test_style_transform_writes_one_shard_set_per_style(coco, tmp_path):
    def gray(image: Image.Image) -> Image.Image:
        return image.convert("L").convert("RGB")

    counts = build(coco, tmp_path, styles={"photo": lambda image: image, "gray": gray}, max_image_side=16)
    for style in ("photo", "gray"):
        assert read_sizes(tmp_path / style)["train"] == counts["train"] == 4
    for sample in read_split(tmp_path / "gray", "train"):
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])), dtype=np.int16)
        assert pixels.shape == (12, 16, 3)  # 32x24 downscaled to a 16-pixel longest side
        assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() <= 3
        assert sample["style"] == "gray"
    photo = np.asarray(
        Image.open(io.BytesIO(read_split(tmp_path / "photo", "train")[0]["jpg"])), dtype=np.int16
    )
    assert np.abs(photo - photo.mean(axis=2, keepdims=True)).max() > 50


@pytest.mark.parametrize(
    ("setting", "override"),
    [
        ("coco.captions_json", {"captions_json": "nowhere/captions_train2014.json"}),
        ("coco.images_dir", {"images_dir": "nowhere/images"}),
        ("coco.korean_json", {"korean_json": "nowhere/korean.json"}),
        ("coco.karpathy_json", {"karpathy_json": "nowhere/dataset_coco.json"}),
    ],
)
def test_missing_input_names_the_setting_and_the_source(coco, tmp_path, setting, override):
    with pytest.raises(FileNotFoundError, match=setting) as error:
        build(coco, tmp_path, **override)
    assert (
        "cocodataset.org" in str(error.value)
        or "AI Hub" in str(error.value)
        or "karpathy" in str(error.value)
    )


def load_prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="prepare_data", overrides=overrides)


def test_prepare_data_coco_config(coco, tmp_path):
    captions = ",".join(str(p) for p in coco["captions_json"])
    cfg = compose(
        [
            "source=coco",
            f"out_dir={tmp_path}",
            f"coco.captions_json=[{captions}]",
            f"coco.images_dir={coco['images_dir']}",
            f"coco.korean_json={coco['korean_json']}",
        ]
    )
    counts = load_prepare_data().main(cfg)
    assert counts["train"] == 4 and read_sizes(tmp_path / "photo")["train"] == 4


def test_prepare_data_default_out_dirs_match_the_data_configs():
    assert compose([]).out_dir == "data/synthetic"
    assert (
        compose(["source=coco"]).out_dir == "data/coco_webtoon"
    )  # configs/data/coco_webtoon.yaml reads /photo


def test_prepare_data_rejects_unknown_source(tmp_path, user_error):
    with user_error("source must be"):
        load_prepare_data().main(compose(["source=imagenet", f"out_dir={tmp_path}"]))


@pytest.mark.slow  # a fresh interpreter: ~5 s of imports (webdataset pulls in torch)
def test_prepare_data_synthetic_subprocess(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prepare_data.py"),
            "source=synthetic",
            "out_dir=shards",
            "num_samples=20",
            "seed=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert read_sizes(tmp_path / "shards") == {"train": 16, "val": 2, "test": 2}
    assert (tmp_path / "shards" / "tokenizer" / "vocab.txt").is_file()
    # Hydra neither changed the working directory nor left an outputs/ or .hydra/ directory behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
