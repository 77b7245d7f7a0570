"""Time and peak memory of `retrieval_metrics` against torchmetrics' retrieval metrics, on CPU.

Run by hand (not in CI):  python bench/bench_retrieval.py [--captions 25000 --images 5000 --dim 512]

Each method runs in its own fresh subprocess, so one method's freed-but-cached memory cannot hide the other's
peak; peak memory is the process' peak RSS (Linux VmHWM, reset just before the call) minus its RSS just
before the call, i.e. what the metric computation itself added on top of the embeddings.

torchmetrics is fed the way an evaluation loop would feed it: query chunks of the flattened caption × image
score matrix with `indexes`, into a `MetricCollection` with compute groups so the six metrics share one copy
of the state. It still has to hold all T × N scores, targets and indexes, which is what this bench shows.
It only computes text→image metrics, while `retrieval_metrics` also computes image→text ones.

At the default size torchmetrics needs ~9.5 GiB and about 10 minutes on a 2-core machine (its `compute`
sorts the 125M-entry state and loops over the 25k queries in Python, once per metric); pass
`--tm-captions 5000` to measure it on the first 5,000 captions and scale time and memory linearly.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torchmetrics import MetricCollection
from torchmetrics.retrieval import RetrievalMRR, RetrievalRecall

from src.metrics.retrieval import retrieval_metrics

KS = (1, 5, 10)


def make_embeddings(
    num_captions: int, num_images: int, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised image embeddings and noisy caption embeddings near their image, captions spread evenly."""
    generator = torch.Generator().manual_seed(seed)
    caption_to_image = torch.arange(num_captions) % num_images
    image_embeds = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=1)
    offsets = noise * torch.randn(num_captions, dim, generator=generator) / dim**0.5
    text_embeds = torch.nn.functional.normalize(image_embeds[caption_to_image] + offsets, dim=1)
    return text_embeds, image_embeds, caption_to_image


def run_ours(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, caption_to_image: torch.Tensor, chunk_size: int
) -> dict[str, float]:
    return retrieval_metrics(text_embeds, image_embeds, caption_to_image, ks=KS, chunk_size=chunk_size)


def run_torchmetrics(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, caption_to_image: torch.Tensor, chunk_size: int
) -> dict[str, float]:
    metrics = MetricCollection(
        {f"mrr@{k}": RetrievalMRR(top_k=k) for k in KS}
        | {f"t2i_r@{k}": RetrievalRecall(top_k=k) for k in KS},
        compute_groups=True,
    )
    image_ids = torch.arange(image_embeds.shape[0])
    for start in range(0, text_embeds.shape[0], chunk_size):
        queries = slice(start, start + chunk_size)
        preds = text_embeds[queries] @ image_embeds.T
        target = caption_to_image[queries, None] == image_ids[None, :]
        indexes = torch.arange(start, start + preds.shape[0])[:, None].expand_as(preds)
        metrics.update(preds.flatten(), target.flatten(), indexes=indexes.flatten())
    return {name: value.item() for name, value in metrics.compute().items()}


def measure(fn: Callable[[], dict[str, float]]) -> dict:
    """Wall time and peak RSS added by `fn`, in this process."""
    process = psutil.Process()
    baseline = process.memory_info().rss
    clear_refs = Path("/proc/self/clear_refs")
    exact = clear_refs.exists() and os.access(clear_refs, os.W_OK)
    if exact:
        clear_refs.write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        sampler = None
    else:
        # Without VmHWM, sample RSS; short spikes between samples can be missed.
        peak_sampled = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                peak_sampled[0] = max(peak_sampled[0], process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

    start = time.perf_counter()
    values = fn()
    seconds = time.perf_counter() - start

    if sampler is None:
        status = Path("/proc/self/status").read_text().splitlines()
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    else:
        done.set()
        sampler.join()
        peak = peak_sampled[0]
    return {"seconds": seconds, "peak_bytes": peak - baseline, "exact_peak": exact, "metrics": values}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    text_embeds, image_embeds, caption_to_image = make_embeddings(
        args.captions, args.images, args.dim, args.noise, args.seed
    )
    if args.worker == "torchmetrics" and args.tm_captions:
        text_embeds, caption_to_image = text_embeds[: args.tm_captions], caption_to_image[: args.tm_captions]
    run = run_ours if args.worker == "ours" else run_torchmetrics
    # A tiny warm-up pays one-off costs (lazy imports, thread pools) outside the measurement.
    run(text_embeds[:50], image_embeds[:10], caption_to_image[:50] % 10, args.chunk_size)
    result = measure(lambda: run(text_embeds, image_embeds, caption_to_image, args.chunk_size))
    result["captions"] = text_embeds.shape[0]
    print(json.dumps(result))


def spawn(method: str, argv: list[str]) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", method],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=25_000)
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024, help="query chunk for both methods")
    parser.add_argument(
        "--tm-captions",
        type=int,
        default=0,
        help="run torchmetrics on only this many captions and scale time and memory linearly (0: all)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--noise", type=float, default=6.0, help="norm of a caption's offset from its image (spreads ranks)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["ours", "torchmetrics"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    argv = list(sys.argv[1:])
    print(
        f"{args.captions} captions x {args.images} images, D={args.dim}, chunk={args.chunk_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {psutil.cpu_count()} CPUs"
    )
    ours = spawn("ours", argv)
    theirs = spawn("torchmetrics", argv)
    scale = args.captions / theirs["captions"]
    if scale != 1:
        print(f"torchmetrics measured on {theirs['captions']} captions, time and memory scaled x{scale:g}")

    gib = 2**30
    rows = [
        ("webtoon-lab retrieval_metrics (t2i + i2t)", ours["seconds"], ours["peak_bytes"]),
        ("torchmetrics MRR+Recall @1/5/10 (t2i)", theirs["seconds"] * scale, theirs["peak_bytes"] * scale),
    ]
    for name, seconds, peak in rows:
        print(f"{name:45s} {seconds:8.2f} s   peak +{peak / gib:7.3f} GiB")
    if not (ours["exact_peak"] and theirs["exact_peak"]):
        print(
            "peak memory sampled every 5 ms (no writable /proc/self/clear_refs); short spikes may be missed"
        )
    if scale != 1:
        print("  (torchmetrics values are for its subsample, so they differ from the full-size ones)")
    for key in (key for key in ours["metrics"] if key in theirs["metrics"]):
        print(
            f"  {key:8s} webtoon-lab {ours['metrics'][key]:.6f}   torchmetrics {theirs['metrics'][key]:.6f}"
        )
    print(
        f"ratio: {rows[1][1] / rows[0][1]:.1f}x faster, "
        f"{rows[1][2] / max(rows[0][2], 1):.1f}x less peak memory than torchmetrics"
    )


if __name__ == "__main__":
    main()
