"""Cartoonizing throughput: our stage (shards -> Lightning predict -> shards) vs the published per-image test loop
of CartoonGAN-Test-Pytorch-Torch, on the same images, weights and device.

python bench/bench_cartoonize.py [--images 16] [--load-size 450] [--rounds 3] [--batch-size 8] [--workers 1]

The weights are random with the published key layout (the real Hayao_net_G_float.pth has the same shapes, so
the same cost). The images are COCO-sized (640x480 and 480x640) photo-like pictures: smooth shapes plus
noise, written once as JPEG files (what the published loop reads) and as shards (what the stage reads).
Baselines, each one image at a time as the published ``test.py`` does it: PIL open, bicubic resize of the
longer side, RGB->BGR, ToTensor, x*2-1, the network with the published hand-written instance normalization,
BGR->RGB, x*0.5+0.5, ``torchvision.utils.save_image`` to a JPEG file:
  - as published: no ``torch.no_grad`` (its ``Variable`` wrapper no longer disables autograd, and never did
    without ``volatile=True``), so autograd records every activation;
  - the same loop under ``torch.no_grad()``, the fix a user would make first.
Rounds alternate baselines and stage so that load from other processes hits them alike; the ratio is the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as transforms
import torchvision.utils as vutils
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data.cartoonize import CartoonGAN, cartoonize_shards  # noqa: E402
from src.data.cartoonize.cartoongan import InstanceNormalization  # noqa: E402
from src.data.schema import WebtoonSample  # noqa: E402
from src.data.shards import write_shards  # noqa: E402


class PublishedInstanceNormalization(InstanceNormalization):
    """The published port's normalization, written out: mean and biased variance per image and channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2] * x.shape[3]
        flat = x.view(x.shape[0], x.shape[1], n)
        mean = flat.mean(2)[..., None, None].expand_as(x)
        var = flat.var(2)[..., None, None].expand_as(x) * ((n - 1) / n)
        scale = self.scale[None, :, None, None].expand_as(x)
        shift = self.shift[None, :, None, None].expand_as(x)
        return (x - mean) / torch.sqrt(var + self.eps) * scale + shift


def published_network(weights: dict[str, torch.Tensor]) -> CartoonGAN:
    network = CartoonGAN()
    for name, module in list(network.named_children()):
        if isinstance(module, InstanceNormalization):
            setattr(network, name, PublishedInstanceNormalization(module.scale.numel()))
    network.load_state_dict(weights, strict=True)
    return network.eval()


def published_loop(network: CartoonGAN, image_dir: Path, out_dir: Path, load_size: int, no_grad: bool) -> int:
    """The published test.py's loop, one image at a time; returns the number of images written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(image_dir.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        width, height = image.size
        ratio = width / height
        size = (load_size, int(load_size / ratio)) if ratio > 1 else (int(load_size * ratio), load_size)
        image = np.asarray(image.resize(size, Image.BICUBIC))[:, :, [2, 1, 0]]
        x = -1 + 2 * transforms.ToTensor()(image).unsqueeze(0)
        with torch.no_grad() if no_grad else torch.enable_grad():
            output = network(x)[0]
        output = output[[2, 1, 0], :, :].data.cpu().float() * 0.5 + 0.5
        vutils.save_image(output, out_dir / f"{path.stem}_Hayao.jpg")
        count += 1
    return count


def photo_like(index: int, rng: np.random.Generator) -> Image.Image:
    size = (640, 480) if index % 3 else (480, 640)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        w, h = rng.integers(40, 240, 2)
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noise = rng.normal(0, 8, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--load-size", type=int, default=450)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    weights = CartoonGAN().state_dict()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "weights").mkdir()
        torch.save(weights, tmp / "weights" / "Hayao_net_G_float.pth")
        (tmp / "images").mkdir()
        samples = []
        for i in range(args.images):
            image = photo_like(i, rng)
            image.save(tmp / "images" / f"{i:05d}.jpg", quality=95)
            samples.append(WebtoonSample(key=f"{i:05d}", image=image, captions_en=[f"photo {i}"], image_id=i))
        write_shards(samples, tmp / "photo", "train", samples_per_shard=max(1, args.images // 2))
        network = published_network(weights)
        print(
            f"{args.images} images 640x480/480x640 -> longer side {args.load_size}, CartoonGAN, "
            f"{torch.get_num_threads()} threads, rounds: {args.rounds}"
        )
        rates: dict[str, list[float]] = {"published": [], "published+no_grad": [], "stage": []}
        for round_ in range(args.rounds):
            for name, no_grad in (("published", False), ("published+no_grad", True)):
                start = time.perf_counter()
                n = published_loop(network, tmp / "images", tmp / f"loop{round_}", args.load_size, no_grad)
                rates[name].append(n / (time.perf_counter() - start))
            start = time.perf_counter()
            counts = cartoonize_shards(
                str(tmp / "photo" / "train-*.tar"),
                tmp / f"stage{round_}",
                ["hayao"],
                tmp / "weights",
                load_size=args.load_size,
                batch_size=args.batch_size,
                num_workers=args.workers,
                trainer_options={"accelerator": "cpu", "devices": 1},
            )
            rates["stage"].append(counts["images"] / (time.perf_counter() - start))
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{name} {values[-1]:.3f}" for name, values in rates.items())
                + f" images/s; stage / published {rates['stage'][-1] / rates['published'][-1]:.2f}x"
            )
        # a round's three runs share the machine's load, so the ratio is taken within rounds
        ratio = statistics.median(s / p for s, p in zip(rates["stage"], rates["published"], strict=True))
        ratio_no_grad = statistics.median(
            s / p for s, p in zip(rates["stage"], rates["published+no_grad"], strict=True)
        )
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(f"published per-image loop (as published)  : {median['published']:7.3f} images/s")
        print(f"published per-image loop + torch.no_grad : {median['published+no_grad']:7.3f} images/s")
        print(f"webtoon-lab stage (shards in and out)    : {median['stage']:7.3f} images/s")
        print(
            f"ratio (median of {args.rounds} rounds): {ratio:.2f}x the published loop, "
            f"{ratio_no_grad:.2f}x the loop with no_grad"
        )


if __name__ == "__main__":
    main()
