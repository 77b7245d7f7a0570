"""Loader throughput: our shard pipeline vs a bare tar -> PIL decode -> resize loop over the same images.

python bench/bench_loader.py [--samples 2000] [--image-size 224] [--workers 0 2]
python bench/bench_loader.py --photos --samples 1000 --workers 1 2   # 640x480 photo-like JPEGs, as COCO's

With --photos the baseline runs in as many processes as the loader has workers (each its share of the shards),
and the loader is measured with and without reduced-size JPEG decoding (data.reduced_decode), over its first epoch
(worker start-up included) and its later ones (the same persistent workers, as in a training run).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2


def bare_decode(shards: list[Path], image_size: int) -> int:
    """The baseline: read every tar member, decode the JPEG, resize, to a float tensor; nothing else."""
    to_tensor = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    count = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    to_tensor(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    count += 1
    return count


def timed_bare_decode(shards: list[Path], image_size: int) -> tuple[int, float]:
    torch.set_num_threads(1)  # as in DataLoader workers: no oversubscription of the cores
    start = time.perf_counter()
    return bare_decode(shards, image_size), time.perf_counter() - start


def bare_decode_rate(shards: list[Path], image_size: int, processes: int) -> float:
    """Samples/s of the baseline in ``processes`` processes, each decoding its share of the shards (timed inside
    the processes: spawning them, which a fork after torch's threads start cannot replace, is not counted)."""
    shares = [shards[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.starmap(timed_bare_decode, [(share, image_size) for share in shares])
    return sum(count for count, _ in results) / max(seconds for _, seconds in results)


def write_photo_shards(data_dir: Path, samples: int, per_shard: int = 100) -> list[Path]:
    """640x480 JPEGs (quality 90) with photo-like detail (smooth fields plus grain, ~70-110 kB as COCO's) and
    bilingual captions, in the project's shard schema."""
    import numpy as np

    rng = np.random.default_rng(0)
    shards = []
    for start in range(0, samples, per_shard):
        path = data_dir / f"train-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(start, min(start + per_shard, samples)):
                coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
                smooth = np.asarray(
                    Image.fromarray(coarse).resize((640, 480), Image.Resampling.BICUBIC), float
                )
                pixels = np.clip(smooth + rng.normal(0, 18, smooth.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                meta = {"captions_en": [f"photo {index}"], "captions_ko": [f"사진 {index}"]}
                for suffix, data in ((".jpg", buffer.getvalue()), (".json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{index:08d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def loader(
    data_dir: Path,
    image_size: int,
    workers: int,
    batch_size: int,
    split: str,
    samples: int,
    reduced_decode: bool = True,
):
    """The DataLoader a training run reads from: model-ready batches, workers kept between epochs."""
    from src.data.datamodule import WebtoonShardDataModule

    tokenizer = data_dir / "tokenizer"
    datamodule = WebtoonShardDataModule(
        train_shards=str(data_dir / "train-*.tar"),
        val_shards=str(data_dir / "train-*.tar"),
        batch_size=batch_size,
        num_workers=workers,
        preprocess={"image_size": image_size, "tokenizer": str(tokenizer) if tokenizer.exists() else None},
        train_samples=samples,
        reduced_decode=reduced_decode,
    )
    # train: one caption per image (what a training step reads); val: every caption of every image tokenized,
    # for retrieval. Both decode each image once per epoch.
    return datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()


def epoch_rates(batches, epochs: int) -> list[float]:
    """Samples/s of each of ``epochs`` passes over one loader: the first starts its workers, the others run on
    the same persistent workers, as every later epoch of a training run does."""
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = sum(len(batch["key"]) for batch in batches)
        rates.append(count / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--photos", action="store_true", help="640x480 photo-like JPEGs instead of the demo's"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="with --photos: epochs timed after the first (the best is shown)",
    )
    args = parser.parse_args()
    if args.photos:
        photos(args)
        return

    from src.demo.synthetic import generate_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        generate_synthetic_dataset(
            data_dir, num_samples=args.samples, seed=0, image_size=256, split_fractions=(1.0, 0.0, 0.0)
        )
        shards = sorted(data_dir.glob("train-*.tar"))
        start = time.perf_counter()
        n = bare_decode(shards, args.image_size)
        baseline = n / (time.perf_counter() - start)
        print(f"baseline  tar+PIL decode+resize, 1 process : {baseline:8.1f} samples/s ({n} samples)")
        for split in ("train", "val"):
            for workers in args.workers:
                batches = loader(data_dir, args.image_size, workers, args.batch_size, split, args.samples)
                (rate,) = epoch_rates(batches, 1)
                print(
                    f"pipeline  {split} loader, {workers} workers: {rate:8.1f} samples/s  ratio {rate / baseline:.2f}x"
                )


def photos(args: argparse.Namespace) -> None:
    """COCO-sized photos: the training loader's batches against the bare loop in as many processes. The baseline's
    rate is the better of two passes (the first pass over fresh files runs up to 2x slower here: page cache,
    allocator), the loader's later epochs the best of ``--epochs``; its processes' start-up is in neither."""
    torch.set_num_threads(1)  # the main process only collates; a training run's threads go to the model
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        shards = write_photo_shards(data_dir, args.samples)
        size_kb = sum(p.stat().st_size for p in shards) / args.samples / 1024
        print(f"{args.samples} photo-like 640x480 JPEGs, {size_kb:.0f} kB each, -> {args.image_size} px")
        for workers in args.workers:
            processes = max(workers, 1)
            baseline = max(bare_decode_rate(shards, args.image_size, processes) for _ in range(2))
            print(f"baseline  tar+PIL decode+resize, {processes} processes: {baseline:8.1f} samples/s")
            for reduced in (False, True):
                batches = loader(
                    data_dir, args.image_size, workers, args.batch_size, "train", args.samples, reduced
                )
                first, *later = epoch_rates(batches, 1 + args.epochs)
                label = "reduced decode" if reduced else "full decode   "
                print(
                    f"pipeline  train loader, {workers} workers, {label}: first epoch {first:8.1f} samples/s  "
                    f"ratio {first / baseline:.2f}x; later epochs {max(later):8.1f} samples/s  "
                    f"ratio {max(later) / baseline:.2f}x"
                )


if __name__ == "__main__":
    main()
