"""The REST service against the pipeline called directly: throughput and latency at 1, 4 and 16 concurrent
clients of a real ``python serve.py`` (uvicorn on 127.0.0.1), and the service's overhead at 1 client.

    python bench/bench_service.py [--jobs 16] [--steps 10] [--rounds 3] [--base-model DIR]

Model: a small Stable Diffusion (the tests' tokenizer, text encoder and VAE, a UNet of 8.6 M parameters at 64 px,
as bench_finetune.py builds it), or ``--base-model``. Baseline: ``load_text_to_image(...)([prompt], 1, seed)`` in
this process, one image at a time, same steps and threads: what a script calling the pipeline pays. Service: a
client submits ``POST /v1/jobs``, follows ``/events`` until the job ends and fetches the PNG; latency is
submit -> PNG received, so it holds the HTTP calls, the queue, PNG encoding and the manifest. The overhead is
measured in alternating rounds (direct, then 1 client, ...) and is the median of the per-round ratios; the
concurrency rows show that one worker per device serialises jobs (jobs/s stays at the 1-client rate, latency
grows with the clients waiting). Every request stays on 127.0.0.1; the loops are bounded by ``--jobs``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
# The tests' tiny SD builder (tokenizer, text encoder, VAE); the UNet below is wider.
sys.path.insert(0, str(ROOT / "tests"))
import tiny_sd  # noqa: E402

from src.pipelines.loading import load_text_to_image  # noqa: E402

PROMPT = "a red house in the fire"


def build_model(out: Path, resolution: int) -> Path:
    """A small SD whose UNet dominates a step, as in SD (bench_finetune.py's model)."""
    from diffusers import UNet2DConditionModel

    tiny_sd.build_tiny_stable_diffusion(out)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=tiny_sd.CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(out / "unet")
    return out


def start_server(model: Path, steps: int, guidance: float, root: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "serve.py",
        f"port={port}",
        "devices=[cpu]",
        f"output_root={root}",
        f"txt2img.base_model={model}",
        f"txt2img.num_inference_steps={steps}",
        f"txt2img.guidance_scale={guidance}",
        "img2img=null",
        "panel=null",
        "story=null",
        "limits.queue_size=64",
        "log_level=warning",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("WEBTOON_API_KEY", None)
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py exited with status {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("serve.py did not get ready in 300 s")
        time.sleep(0.2)


def time_direct(text_to_image, jobs: int, first_seed: int) -> list[float]:
    """Seconds of each of ``jobs`` direct calls, one image each."""
    seconds = []
    for seed in range(first_seed, first_seed + jobs):
        started = time.perf_counter()
        text_to_image([PROMPT], 1, seed)
        seconds.append(time.perf_counter() - started)
    return seconds


async def one_job(http: httpx.AsyncClient, seed: int) -> float:
    started = time.perf_counter()
    response = await http.post("/v1/jobs", json={"kind": "txt2img", "prompt": PROMPT, "seed": seed})
    response.raise_for_status()
    job = response.json()
    async with http.stream("GET", job["events_url"]) as events:
        async for _ in events.aiter_lines():
            pass
    job = (await http.get(job["url"])).json()
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['state']}: {job['error']}")
    (await http.get(job["images"][0]["url"])).raise_for_status()
    return time.perf_counter() - started


async def clients(url: str, count: int, jobs: int, first_seed: int) -> tuple[list[float], float]:
    """``count`` clients sharing ``jobs`` jobs, each submitting its next one when the last is back."""
    seeds = iter(range(first_seed, first_seed + jobs))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        for seed in seeds:
            latencies.append(await one_job(http, seed))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(count)))
    return latencies, time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=16, help="jobs per measurement (at least 2 per client)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct / 1-client rounds")
    parser.add_argument("--base-model", type=Path, default=None, help="a Stable Diffusion directory instead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.base_model or build_model(Path(tmp) / "model", args.resolution)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, args.steps, args.guidance, Path(tmp) / "root", port)
        try:
            text_to_image = load_text_to_image(
                base_model=str(model),
                device="cpu",
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
            )
            time_direct(text_to_image, 2, 10_000)  # warm-up, both sides
            asyncio.run(clients(url, 1, 2, 10_000))
            print(
                f"model {model.name}, {args.steps} steps, guidance {args.guidance}, torch threads "
                f"{torch.get_num_threads()}, {args.jobs} jobs per measurement"
            )

            ratios, directs = [], []
            for number in range(args.rounds):
                direct = statistics.mean(time_direct(text_to_image, args.jobs, number * args.jobs))
                directs.append(direct)
                served, _ = asyncio.run(clients(url, 1, args.jobs, number * args.jobs))
                ratios.append(statistics.mean(served) / direct)
                print(
                    f"round {number}: direct {direct * 1000:7.1f} ms/job, service (1 client) "
                    f"{statistics.mean(served) * 1000:7.1f} ms/job, ratio {ratios[-1]:.3f}"
                )
            direct = statistics.mean(directs)
            direct_rate = 1 / direct

            print(f"\n{'clients':>8} {'jobs/s':>8} {'vs direct':>10} {'p50 s':>8} {'p95 s':>8}")
            print(f"{'direct':>8} {direct_rate:8.3f} {1.0:10.3f} {direct:8.3f} {direct:8.3f}")
            for count in (1, 4, 16):
                jobs = max(args.jobs, 2 * count)
                latencies, wall = asyncio.run(clients(url, count, jobs, 50_000 + count * 1000))
                rate = len(latencies) / wall
                print(
                    f"{count:>8} {rate:8.3f} {rate / direct_rate:10.3f} "
                    f"{percentile(latencies, 0.5):8.3f} {percentile(latencies, 0.95):8.3f}"
                )
            import psutil

            print(f"\nserver RSS {psutil.Process(server.pid).memory_info().rss / 2**20:.0f} MiB")
            overhead = statistics.median(ratios) - 1
            print(
                f"service overhead at 1 client (median of {args.rounds} rounds): {overhead * 100:+.1f} % "
                f"(target <= 5 %)"
            )
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
