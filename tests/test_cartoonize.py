"""Cartoonized shard sets: published weight layouts, pre/postprocessing, the stage end to end, resume, DDP."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra_runs import ROOT, compose_plain
from PIL import Image
from test_coco import coco  # noqa: F401  (the COCO 2014 + AI Hub files fixture)

from src.data.cartoonize import (
    STYLES,
    AnimeGANv2,
    CartoonGAN,
    cartoonize_shards,
    load_generator,
    resize_longer_side,
)
from src.data.schema import WebtoonSample
from src.data.shards import read_sizes, write_shards
from src.utils.hub import MissingWeightsError

STAGE_STYLES = ["hayao", "animegan2_paprika"]


# ---- the published key layouts, written out from the two projects' model files ---------------------------------
def cartoongan_published_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``{Hayao,Hosoda,Paprika,Shinkai}_net_G_float.pth`` (CartoonGAN-Test-Pytorch-Torch)."""
    layout: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int, transposed: bool = False) -> None:
        layout[f"{name}.weight"] = (cin, cout, k, k) if transposed else (cout, cin, k, k)
        layout[f"{name}.bias"] = (cout,)

    def norm(name: str, channels: int) -> None:
        layout[f"{name}.scale"] = layout[f"{name}.shift"] = (channels,)

    conv("conv01_1", 3, 64, 7), norm("in01_1", 64)
    conv("conv02_1", 64, 128, 3), conv("conv02_2", 128, 128, 3), norm("in02_1", 128)
    conv("conv03_1", 128, 256, 3), conv("conv03_2", 256, 256, 3), norm("in03_1", 256)
    for block in range(4, 12):
        for half in (1, 2):
            conv(f"conv{block:02d}_{half}", 256, 256, 3), norm(f"in{block:02d}_{half}", 256)
    conv("deconv01_1", 256, 128, 3, transposed=True), conv("deconv01_2", 128, 128, 3), norm("in12_1", 128)
    conv("deconv02_1", 128, 64, 3, transposed=True), conv("deconv02_2", 64, 64, 3), norm("in13_1", 64)
    conv("deconv03_1", 64, 3, 7)
    return layout


def animegan_published_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of animegan2-pytorch's ``weights/<name>.pt`` (nested Sequential indices)."""
    layout: dict[str, tuple[int, ...]] = {}

    def conv_norm_lrelu(name: str, cin: int, cout: int, k: int = 3, groups: int = 1, bias: bool = False):
        # 0 pad, 1 conv, 2 GroupNorm, 3 LeakyReLU
        layout[f"{name}.1.weight"] = (cout, cin // groups, k, k)
        if bias:
            layout[f"{name}.1.bias"] = (cout,)
        layout[f"{name}.2.weight"] = layout[f"{name}.2.bias"] = (cout,)

    def inverted_residual(name: str, cin: int, cout: int) -> None:
        hidden = 2 * cin
        conv_norm_lrelu(f"{name}.layers.0", cin, hidden, k=1)
        conv_norm_lrelu(f"{name}.layers.1", hidden, hidden, groups=hidden, bias=True)
        layout[f"{name}.layers.2.weight"] = (cout, hidden, 1, 1)
        layout[f"{name}.layers.3.weight"] = layout[f"{name}.layers.3.bias"] = (cout,)

    conv_norm_lrelu("block_a.0", 3, 32, k=7)
    conv_norm_lrelu("block_a.1", 32, 64), conv_norm_lrelu("block_a.2", 64, 64)
    conv_norm_lrelu("block_b.0", 64, 128), conv_norm_lrelu("block_b.1", 128, 128)
    conv_norm_lrelu("block_c.0", 128, 128)
    inverted_residual("block_c.1", 128, 256)
    for index in (2, 3, 4):
        inverted_residual(f"block_c.{index}", 256, 256)
    conv_norm_lrelu("block_c.5", 256, 128)
    conv_norm_lrelu("block_d.0", 128, 128), conv_norm_lrelu("block_d.1", 128, 128)
    conv_norm_lrelu("block_e.0", 128, 64), conv_norm_lrelu("block_e.1", 64, 64)
    conv_norm_lrelu("block_e.2", 64, 32, k=7)
    layout["out_layer.0.weight"] = (3, 32, 1, 1)
    return layout


def random_published_weights(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in layout.items():
        if name.endswith((".scale", "2.weight", "layers.3.weight")):  # norm gains around 1
            weights[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            weights[name] = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = int(np.prod(shape[1:]))
            weights[name] = torch.randn(shape, generator=generator) / fan_in**0.5
    return weights


def save_published(weights_dir: Path, style: str, seed: int) -> dict[str, torch.Tensor]:
    """A random-weight file for ``style`` with the published name and key layout."""
    spec = STYLES[style]
    if spec.generator is CartoonGAN:
        weights = random_published_weights(cartoongan_published_layout(), seed)
        # the 2018 files predate torch's zip format: write the legacy format, as they are
        torch.save(weights, weights_dir / spec.weight_file, _use_new_zipfile_serialization=False)
    else:
        weights = random_published_weights(animegan_published_layout(), seed)
        torch.save(weights, weights_dir / spec.weight_file)
    return weights


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cartoon_weights")
    for seed, style in enumerate(["hayao", "paprika", "animegan2_paprika", "animegan2_face_paint_512_v2"]):
        save_published(folder, style, seed)
    return folder


# ---- generators and their published weights ----------------------------------------------------------------
@pytest.mark.parametrize("style", ["hayao", "paprika", "animegan2_paprika", "animegan2_face_paint_512_v2"])
def test_published_key_layouts_load_strictly(weights_dir, style):
    generator = load_generator(STYLES[style], weights_dir)
    saved = torch.load(weights_dir / STYLES[style].weight_file, weights_only=True)
    state = generator.state_dict()
    assert list(state) == list(saved)  # same names, same order as the published modules register them
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor)
    assert not generator.training and not any(p.requires_grad for p in generator.parameters())


def test_published_parameter_counts():
    # AnimeGANv2's published .pt files are 8.6 MB of float32: 2.14 M parameters
    assert sum(np.prod(s) for s in animegan_published_layout().values()) == 2_143_552
    assert sum(p.numel() for p in AnimeGANv2().parameters()) == 2_143_552
    assert sum(p.numel() for p in CartoonGAN().parameters()) == sum(
        np.prod(s) for s in cartoongan_published_layout().values()
    )


def test_a_missing_or_wrong_weight_file_names_the_file_and_its_source(weights_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match="Shinkai_net_G_float.pth") as error:
        load_generator(STYLES["shinkai"], weights_dir)
    assert "CartoonGAN-Test-Pytorch-Torch" in str(error.value) and "cartoonize.weights_dir" in str(
        error.value
    )
    with pytest.raises(MissingWeightsError, match="celeba_distill.pt") as error:
        load_generator(STYLES["animegan2_celeba_distill"], None)
    assert "bryandlee/animegan2-pytorch" in str(error.value)
    # a file of the other network under the right name fails strict loading with the same pointers
    torch.save(AnimeGANv2().state_dict(), tmp_path / "Hosoda_net_G_float.pth")
    with pytest.raises(ValueError, match="Hosoda_net_G_float.pth.*CartoonGAN-Test-Pytorch-Torch"):
        load_generator(STYLES["hosoda"], tmp_path)
    with pytest.raises(ValueError, match="unknown style 'ghibli'"):
        cartoonize_shards(str(tmp_path / "*.tar"), tmp_path, ["ghibli"], weights_dir)


# ---- pre- and postprocessing as the published tests do them ------------------------------------------------------
def test_resize_of_the_longer_side_matches_the_published_arithmetic():
    sizes = {(640, 480): (450, 337), (480, 640): (337, 450), (100, 50): (450, 225), (300, 300): (450, 450)}
    for size, expected in sizes.items():
        assert resize_longer_side(Image.new("RGB", size), 450).size == expected
    assert resize_longer_side(Image.new("RGB", (33, 21)), None).size == (33, 21)


def test_cartoongan_reads_bgr_in_minus_one_to_one_and_writes_rgb():
    red_blue = torch.tensor([[[255, 0, 0], [0, 0, 255], [128, 64, 0]]], dtype=torch.uint8)[
        None
    ]  # [1, 1, 3, 3]
    x = CartoonGAN.to_input(red_blue)
    assert x.shape == (1, 3, 1, 3)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # red is B=-1, G=-1, R=1
    torch.testing.assert_close(x[0, :, 0, 1], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[0, :, 0, 2], torch.tensor([-1.0, 64 / 255 * 2 - 1, 128 / 255 * 2 - 1]))
    # output: channel 0 is blue; -1, 0, 1 -> 0, 128, 255 (save_image rounds)
    out = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    assert CartoonGAN.to_image(out).flatten().tolist() == [0, 128, 255]


def test_animegan_reads_rgb_in_minus_one_to_one_and_truncates_like_the_published_test():
    x = AnimeGANv2.to_input(torch.tensor([[[[255, 0, 51]]]], dtype=torch.uint8))
    torch.testing.assert_close(x.flatten(), torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))
    out = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    assert AnimeGANv2.to_image(out).flatten().tolist() == [255, 127, 0]  # (0 + 1) * 127.5 -> 127


def test_known_image_through_a_generator_that_paints_its_first_channel_full():
    """A generator that sets its channel 0 to +1: CartoonGAN's channel 0 is blue, AnimeGAN's red; the rest of the
    image comes back unchanged (to within the published rounding), at the input size."""

    class PaintFirstChannelCartoonGAN(CartoonGAN):
        def forward(self, x):
            return torch.cat([torch.ones_like(x[:, :1]), x[:, 1:]], dim=1)

    class PaintFirstChannelAnimeGAN(AnimeGANv2):
        def forward(self, x):
            return torch.cat([torch.ones_like(x[:, :1]), x[:, 1:]], dim=1)

    photo = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 7, 9, 3), dtype=np.uint8))
    cartoon = PaintFirstChannelCartoonGAN().cartoonize(photo)
    assert cartoon.shape == photo.shape and cartoon.dtype == torch.uint8
    assert (cartoon[..., 2] == 255).all() and torch.equal(cartoon[..., :2], photo[..., :2])
    anime = PaintFirstChannelAnimeGAN().cartoonize(photo)
    assert (anime[..., 0] == 255).all()
    difference = photo[..., 1:].int() - anime[..., 1:].int()
    assert difference.min() >= 0 and difference.max() <= 1  # truncation loses at most one level


@pytest.mark.parametrize("style", ["hayao", "animegan2_paprika"])
def test_a_batch_gives_the_one_image_at_a_time_result_at_any_size(weights_dir, style):
    generator = load_generator(STYLES[style], weights_dir)
    photos = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 30, 37, 3), dtype=np.uint8))
    batched = generator.cartoonize(photos)
    assert batched.shape == photos.shape  # sides that are not multiples of 4 come back at the input size
    one_by_one = torch.cat([generator.cartoonize(photos[i : i + 1]) for i in range(3)])
    assert (batched.int() - one_by_one.int()).abs().max() <= 1
    assert (batched.int() - photos.int()).abs().float().mean() > 10  # it did paint


# ---- the stage: shards in, one mirrored shard set per style out ----------------------------------------------
def textured_samples(n: int, prefix: str = "s", size: tuple[int, int] = (40, 30)) -> list[WebtoonSample]:
    rng = np.random.default_rng(7)
    return [
        WebtoonSample(
            key=f"{prefix}{i:04d}",
            image=Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)),
            captions_en=[f"picture {i}", f"image number {i}"],
            captions_ko=[f"그림 {i}"],
            image_id=i,
        )
        for i in range(n)
    ]


def read_shard_set(shard_dir: Path, split: str) -> list[dict]:
    """Every record of a split, in order; ``pixels`` is None where the image bytes do not decode."""
    urls = [str(p) for p in sorted(shard_dir.glob(f"{split}-*.tar"))]
    return [
        {**json.loads(s["json"]), "key": s["__key__"], "pixels": _pixels(s["jpg"])}
        for s in (wds.WebDataset(urls, shardshuffle=False) if urls else [])
    ]


def _pixels(data: bytes) -> np.ndarray | None:
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except OSError:
        return None


def assert_style_mirrors_photo(photo_dir: Path, style_dir: Path, style: str, image_size: tuple[int, int]):
    """The photo set's readable samples with the same keys, ids, captions and order, split by split; the
    style's name; cartoon pixels at ``image_size`` (width, height)."""
    for split in ("train", "val", "test"):
        photos = [p for p in read_shard_set(photo_dir, split) if p["pixels"] is not None]
        cartoons = read_shard_set(style_dir, split)
        assert read_sizes(style_dir).get(split, 0) == len(photos) == len(cartoons)
        assert [c["key"] for c in cartoons] == [p["key"] for p in photos]
        for photo, cartoon in zip(photos, cartoons, strict=True):
            assert cartoon["image_id"] == photo["image_id"]
            assert (cartoon["captions_en"], cartoon["captions_ko"]) == (
                photo["captions_en"],
                photo["captions_ko"],
            )
            assert cartoon["style"] == style
            assert cartoon["pixels"].shape[:2][::-1] == image_size
            if cartoon["pixels"].shape == photo["pixels"].shape:
                assert np.abs(cartoon["pixels"].astype(int) - photo["pixels"].astype(int)).mean() > 10


def test_photos_are_batched_by_size_within_a_shard(tmp_path):
    from src.data.cartoonize.reading import BUFFERED_BATCHES, shard_batches

    rng = np.random.default_rng(0)
    widths = rng.integers(20, 27, 40)  # 7 sizes, as COCO's many slightly different ones
    samples = [
        WebtoonSample(key=f"k{i:03d}", image=Image.new("RGB", (int(w), 16))) for i, w in enumerate(widths)
    ]
    write_shards(samples, tmp_path, "train", samples_per_shard=100)
    batches = list(shard_batches(str(tmp_path / "train-000000.tar"), ["hayao"], None, batch_size=3))
    assert sorted(i for b in batches for i in b["indices"]) == list(range(40))  # each photo once
    for batch in batches:
        assert 1 <= len(batch["indices"]) <= 3 and batch["pixels"].shape[2] == widths[batch["indices"][0]]
        assert all(widths[i] == widths[batch["indices"][0]] for i in batch["indices"])
    assert [b["shard_done"] for b in batches] == [False] * (len(batches) - 1) + [True]
    assert batches[-1]["shard_samples"] == 40 and batches[-1]["skipped"] == {}
    assert sum(len(b["indices"]) == 3 for b in batches) >= 40 // 3 - BUFFERED_BATCHES  # mostly full batches


def prepare_data(overrides: list[str]) -> dict:
    from test_captioning import load_prepare_data

    module = load_prepare_data()
    return module.main(
        compose_plain("prepare_data.yaml", module.hydra_overrides(["prepare_data.py", *overrides])[1:])
    )


def test_coco_command_writes_photo_and_every_style_with_the_same_samples(coco, weights_dir, tmp_path):  # noqa: F811
    """python prepare_data.py source=coco ... cartoonize.styles=[...] cartoonize.weights_dir=W"""
    captions = ",".join(str(p) for p in coco["captions_json"])
    overrides = [
        "source=coco",
        f"out_dir={tmp_path}",
        f"coco.captions_json=[{captions}]",
        f"coco.images_dir={coco['images_dir']}",
        f"coco.korean_json={coco['korean_json']}",
        "samples_per_shard=3",
        f"cartoonize.styles=[{','.join(STAGE_STYLES)}]",
        f"cartoonize.weights_dir={weights_dir}",
        "cartoonize.load_size=32",
        "cartoonize.num_workers=0",
    ]
    counts = prepare_data(overrides)
    assert counts["skipped_unreadable_image"] == 1 and counts["skipped_missing_image"] == 1  # the photo pass
    cartoonized = counts["cartoonize"]
    photo_sizes = {k: v for k, v in read_sizes(tmp_path / "photo").items() if v}
    assert cartoonized["styles"] == {style: photo_sizes for style in STAGE_STYLES}
    assert cartoonized["images"] == sum(photo_sizes.values()) and cartoonized["images_per_s"] > 0
    for style in STAGE_STYLES:  # COCO's 32x24 images, longer side to 32
        assert_style_mirrors_photo(tmp_path / "photo", tmp_path / style, style, (32, 24))
    hayao, paprika = (read_shard_set(tmp_path / style, "train") for style in STAGE_STYLES)
    assert np.abs(hayao[0]["pixels"].astype(int) - paprika[0]["pixels"].astype(int)).mean() > 10

    # the same command again: the photo set is reused and every style shard is already done
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.tar")}
    again = prepare_data([*overrides, "cartoonize.styles=[hayao,paprika]"])["cartoonize"]
    assert again["shards_cartoonized"] == again["shards"] and again["images"] == sum(photo_sizes.values())
    assert {p: p.stat().st_mtime_ns for p in before} == before  # paprika added, nothing else rewritten
    assert_style_mirrors_photo(tmp_path / "photo", tmp_path / "paprika", "paprika", (32, 24))


def test_processes_started_together_refuse_to_build_the_photo_set(tmp_path, monkeypatch):
    from src.data.cartoonize import photo_shards_for_styles

    monkeypatch.setenv("SLURM_NTASKS", "8")
    with pytest.raises(RuntimeError, match="must not all build it.*source=shards"):
        photo_shards_for_styles(tmp_path, {"seed": 0}, build=lambda: pytest.fail("built"))


@pytest.fixture
def source_shards(tmp_path) -> Path:
    """Photo shards of 40x30 images: 7 train samples in 3 shards (one record's image corrupt), 3 val."""
    photo = tmp_path / "photo"
    samples = textured_samples(10)
    write_shards(samples[:7], photo, "train", samples_per_shard=3)
    write_shards(samples[7:], photo, "val", samples_per_shard=3)
    # replace the image of s0004 (train-000001.tar) by bytes that do not decode
    shard = photo / "train-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = data[:50] if member.name == "s0004.jpg" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return photo


def shards_command(source: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "source=shards",
        f"shards={source}/{{train,val}}-*.tar",
        f"out_dir={out}",
        f"cartoonize.styles=[{','.join(STAGE_STYLES)}]",
        f"cartoonize.weights_dir={weights}",
        "cartoonize.load_size=32",
        "cartoonize.batch_size=2",
        "cartoonize.num_workers=0",
        *extra,
    ]


def test_shards_command_skips_corrupt_images_and_resumes_per_shard(source_shards, weights_dir, tmp_path):
    """python prepare_data.py source=shards shards='DIR/{train,val,test}-*.tar' out_dir=OUT cartoonize.styles=[...]
    cartoonize.weights_dir=W"""
    out = tmp_path / "out"
    counts = prepare_data(shards_command(source_shards, out, weights_dir))
    assert counts["styles"] == {style: {"train": 6, "val": 3} for style in STAGE_STYLES}
    assert counts["skipped"] == {"bad_image": 1} and counts["images"] == 9
    for style in STAGE_STYLES:
        assert sorted(p.name for p in (out / style).glob("*.tar")) == sorted(
            p.name for p in source_shards.glob("*.tar")
        )
        keys = [s["key"] for split in ("train", "val") for s in read_shard_set(out / style, split)]
        assert keys == [f"s{i:04d}" for i in range(10) if i != 4]
        assert [s["pixels"].shape for s in read_shard_set(out / style, "val")] == [(24, 32, 3)] * 3

    # interrupted: one shard half written (a .partial file, no done record), another shard's record lost;
    # and a source shard rebuilt since (newer modification time)
    hayao = out / "hayao"
    (hayao / "train-000002.tar").rename(hayao / "train-000002.tar.partial")
    (hayao / ".done" / "train-000002.tar.json").unlink()
    (out / "animegan2_paprika" / ".done" / "val-000000.tar.json").unlink()
    os.utime(source_shards / "train-000000.tar")
    untouched = hayao / "val-000000.tar"
    before = untouched.stat().st_mtime_ns
    again = prepare_data(shards_command(source_shards, out, weights_dir))
    assert again["shards_cartoonized"] == 3 and again["shards_already_done"] == 1
    assert again["images"] == 3 + 1 + 3  # train-000000, train-000002 (one image), val-000000
    assert again["styles"] == counts["styles"] and untouched.stat().st_mtime_ns == before
    assert not list(out.rglob("*.partial"))
    assert_style_mirrors_photo(source_shards, hayao, "hayao", (32, 24))


def test_a_run_that_yields_no_image_stops_with_a_clear_message(weights_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "train-000000.tar", "w") as tar:
        for name, data in (("a.jpg", b"not a jpeg"), ("a.json", b'{"captions_en": ["x"]}')):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(RuntimeError, match=r"no image of 1 shards could be read \(skipped: bad_image=1\)"):
        cartoonize_shards(str(bad / "*.tar"), tmp_path / "out", ["hayao"], weights_dir, num_workers=0)


def test_missing_weights_fail_before_any_shard_is_read(source_shards, tmp_path, user_error):
    with user_error("Hayao_net_G_float.pth"):
        # cartoonize.styles=hayao, a single name, means [hayao]
        prepare_data(
            shards_command(
                source_shards, tmp_path / "out", tmp_path / "no_weights", "cartoonize.styles=hayao"
            )
        )
    assert not (tmp_path / "out").exists()


def test_shard_patterns_typed_in_a_shell_reach_hydra_quoted():
    from test_captioning import load_prepare_data

    argv = ["prepare_data.py", "shards=D/{train,val}-*.tar", "shards='D/{a,b}.tar'", "shards=[a.tar,b.tar]"]
    assert load_prepare_data().hydra_overrides(argv) == [
        "prepare_data.py",
        "shards='D/{train,val}-*.tar'",
        "shards='D/{a,b}.tar'",
        "shards=[a.tar,b.tar]",
    ]


@pytest.mark.slow  # two ranks launched from the command: ~20 s of interpreter start-up
def test_ddp_over_two_cpu_ranks_writes_every_image_exactly_once(source_shards, weights_dir, tmp_path):
    """The cluster form (trainer=ddp [trainer.num_nodes=N]) on 2 gloo ranks: the shards are split between the
    ranks, each image is written once per style, and the summary is printed once."""
    out = tmp_path / "out"
    # shards=DIR/{train,val}-*.tar as a shell hands it on, its quotes removed
    command = shards_command(source_shards, out, weights_dir, "trainer=ddp_cpu")
    result = subprocess.run(
        [sys.executable, str(ROOT / "prepare_data.py"), *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"source": "shards"') == 1
    printed, _ = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index("{\n") :])
    assert printed["styles"] == {style: {"train": 6, "val": 3} for style in STAGE_STYLES}
    assert printed["images"] == 9  # summed over both ranks
    for style in STAGE_STYLES:
        keys = [s["key"] for split in ("train", "val") for s in read_shard_set(out / style, split)]
        assert sorted(keys) == [f"s{i:04d}" for i in range(10) if i != 4]  # each once, none lost
        ranks = [json.loads(p.read_text())["rank"] for p in (out / style / ".done").glob("*.json")]
        assert sorted(set(ranks)) == [0, 1]  # both ranks wrote shards
