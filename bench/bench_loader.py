"""Loader throughput: our shard pipeline vs a bare tar -> PIL decode -> resize loop over the same images.

python bench/bench_loader.py [--samples 2000] [--image-size 224] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import io
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


def ours(data_dir: Path, image_size: int, workers: int, batch_size: int, split: str, samples: int) -> int:
    from src.data.datamodule import WebtoonShardDataModule

    datamodule = WebtoonShardDataModule(
        train_shards=str(data_dir / "train-*.tar"),
        val_shards=str(data_dir / "train-*.tar"),
        batch_size=batch_size,
        num_workers=workers,
        preprocess={"image_size": image_size, "tokenizer": str(data_dir / "tokenizer")},
        train_samples=samples,
    )
    # train: one caption per image (what a training step reads); val: every caption of every image tokenized,
    # for retrieval. Both decode each image once per epoch.
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    return sum(len(batch["key"]) for batch in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

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
                start = time.perf_counter()
                n = ours(data_dir, args.image_size, workers, args.batch_size, split, args.samples)
                rate = n / (time.perf_counter() - start)
                print(
                    f"pipeline  {split} loader, {workers} workers: {rate:8.1f} samples/s  ratio {rate / baseline:.2f}x"
                )


if __name__ == "__main__":
    main()
