"""The service as users run it: ``python serve.py`` under uvicorn on 127.0.0.1, loaded by 20 clients at once,
sent raw traversal paths over a socket, and its page driven in headless Chromium.

The server draws with the tiny Stable Diffusion of tests/tiny_sd.py (one denoising step, one thread), so 200
submissions take seconds; every request stays on this machine's loopback and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_service import service_models  # noqa: F401  (the fixture: the tiny models, built once per run)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
QUEUE_SIZE = 4
CLIENTS, JOBS_PER_CLIENT = 20, 10
# Chromium as root in a sandbox-less container, with none of its background calls to the network
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(service_models, tmp_path_factory):  # noqa: F811
    """``python serve.py`` with the tiny model, on a free port; stopped with SIGINT (uvicorn's graceful stop)."""
    import httpx

    tmp = tmp_path_factory.mktemp("served")
    base = service_models["base"]
    port = free_port()
    command = [
        sys.executable,
        "serve.py",
        f"port={port}",
        "devices=[cpu]",
        f"output_root={tmp / 'root'}",
        f"txt2img.base_model={base}",
        "txt2img.num_inference_steps=1",
        "txt2img.guidance_scale=1.0",
        "img2img=null",
        "panel=null",
        "story=null",
        f"limits.queue_size={QUEUE_SIZE}",
        "log_level=warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WEBTOON_API_KEY": ""}
    env.pop("WEBTOON_API_KEY")
    log = open(tmp / "server.log", "w")  # noqa: SIM115  (closed below, after the process)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, (tmp / "server.log").read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve.py did not get ready in 180 s"
        time.sleep(0.2)
    yield {"url": url, "port": port, "process": process, "base": base, "root": tmp / "root", "tmp": tmp}
    process.send_signal(signal.SIGINT)
    try:
        status = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        status = process.wait()
    log.close()
    assert status == 0, f"serve.py did not stop cleanly: {(tmp / 'server.log').read_text()[-2000:]}"


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def one_client(http, number: int, outcomes: list) -> None:
    """Submit JOBS_PER_CLIENT jobs one after another, waiting for each accepted one (by polling, or by the
    event stream for odd clients); a refused one is recorded and the next submitted after a short pause."""
    for j in range(JOBS_PER_CLIENT):
        request = {"kind": "txt2img", "prompt": f"a red house {number}", "seed": number * JOBS_PER_CLIENT + j}
        response = await http.post("/v1/jobs", json=request)
        if response.status_code == 429:
            outcomes.append((request, 429, response.headers.get("retry-after")))
            await asyncio.sleep(0.1)
            continue
        if response.status_code != 202:
            outcomes.append((request, response.status_code, response.text))
            continue
        job = response.json()
        if number % 2:
            async with http.stream("GET", job["events_url"]) as stream:
                async for _ in stream.aiter_lines():
                    pass
        while job["state"] in ("queued", "running"):
            await asyncio.sleep(0.05)
            job = (await http.get(job["url"])).json()
        outcomes.append((request, 202, job))


async def load(url: str, pid: int) -> tuple[list, list[float]]:
    import httpx

    outcomes: list = []
    memory = [rss_mib(pid)]

    async def watch_memory() -> None:
        while True:
            await asyncio.sleep(0.5)
            memory.append(rss_mib(pid))

    watcher = asyncio.create_task(watch_memory())
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.wait_for(asyncio.gather(*(one_client(http, n, outcomes) for n in range(CLIENTS))), 300)
    watcher.cancel()
    memory.append(rss_mib(pid))
    return outcomes, memory


def test_200_jobs_from_20_clients_each_accepted_one_drawn_right_and_the_rest_refused_with_429(server):
    import httpx

    from src.pipelines.loading import load_text_to_image
    from src.utils.image_grid import to_pil

    started = time.monotonic()
    outcomes, memory = asyncio.run(load(server["url"], server["process"].pid))
    seconds = time.monotonic() - started
    accepted = [job for _, status, job in outcomes if status == 202]
    refused = [retry for _, status, retry in outcomes if status == 429]
    assert len(outcomes) == CLIENTS * JOBS_PER_CLIENT == len(accepted) + len(refused), outcomes
    assert accepted and refused and all(int(retry) >= 1 for retry in refused)
    assert all(job["state"] == "succeeded" for job in accepted), [
        j for j in accepted if j["state"] != "succeeded"
    ]
    assert len({job["id"] for job in accepted}) == len(accepted)  # none lost, none twice
    image_ids = [image["id"] for job in accepted for image in job["images"]]
    assert len(image_ids) == len(set(image_ids)) == len(accepted)

    with httpx.Client(base_url=server["url"]) as http:
        health = http.get("/health")
        assert health.status_code == 200 and server["process"].poll() is None
        assert health.json()["queue"]["peak_queued"] <= QUEUE_SIZE
        drawn = {
            job["manifest"]["request"]["seed"]: np.asarray(
                Image.open(io.BytesIO(http.get(job["images"][0]["url"]).content))
            )
            for job in accepted
        }
    # Each job's own image: the prompt and seed of its manifest redraw exactly its pixels (seeds differ, so an
    # image swapped between jobs or drawn twice would not match). One thread, as the server: float sums split
    # over another number of threads round differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = accepted[0]["manifest"]["settings"]
    text_to_image = load_text_to_image(
        base_model=settings["base_model"],
        device="cpu",
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
    )
    for job in accepted:
        request = job["manifest"]["request"]
        assert request["prompt"] == f"a red house {request['seed'] // JOBS_PER_CLIENT}"
        again = text_to_image([request["prompt"]], 1, request["seed"])[0, 0]
        assert np.array_equal(drawn[request["seed"]], np.asarray(to_pil(again))), request
    torch.set_num_threads(threads)
    assert len({image.tobytes() for image in drawn.values()}) == len(drawn)

    growth = max(memory) - memory[0]
    print(
        f"{len(accepted)} accepted, {len(refused)} refused in {seconds:.1f} s; RSS {memory[0]:.0f} MiB, +{growth:.0f}"
    )
    assert growth < 300, memory  # MiB: a queue of 4 tiny jobs and 1000 job records at most


RAW_PATHS = [
    "/v1/images/../../secret.png",
    "/v1/images/..%2F..%2Fsecret.png",
    "/v1/images/%2e%2e%2f%2e%2e%2fsecret.png",
    "/v1/images/..%252F..%252Fsecret.png",
    "/v1/images//etc/passwd",
    "/v1/images/..\\..\\secret.png",
    "/v1/images/secret%00.png",
    "/v1/images/%EF%BC%8E%EF%BC%8E%EF%BC%8Fsecret.png",
    "/v1/jobs/../../../etc/passwd",
    "/v1/jobs/0123456789abcdef0123456789abcdef%0A/events",
    "/../../secret.png",
]


def test_raw_traversal_paths_get_4xx_from_uvicorn_and_serve_no_file(server):
    """Sent byte for byte over a socket (HTTP clients would clean the path first)."""
    Image.new("RGB", (4, 4), (1, 2, 3)).save(server["tmp"] / "secret.png")
    for path in RAW_PATHS:
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as connection:
            connection.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, (path, answer[:200])
        assert b"\x89PNG" not in answer and b"root:" not in answer, path


def test_the_page_in_chromium_draws_a_korean_prompt_and_shows_the_image(server, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: apt-get install chromium (the page test drives Debian's browser)"
        )
    from playwright.sync_api import sync_playwright

    screenshot = tmp_path_factory.getbasetemp() / "service_page.png"
    prompt = "큰 빨간 원, a red house"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server["url"] + "/")
            page.wait_for_selector("#job-form:not([hidden])", timeout=30_000)
            assert page.locator("#kind option").all_inner_texts() == ["txt2img"]
            page.fill("#text", prompt)
            page.fill("#seed", "11")
            page.click("#submit")
            page.wait_for_selector("#images img", timeout=60_000)
            page.wait_for_function("document.querySelector('#images img').naturalWidth > 0", timeout=30_000)
            assert page.locator("#job-state").inner_text().startswith("succeeded")
            manifest = page.locator("#manifest").text_content()
            assert f'"prompt": "{prompt}"' in manifest and '"seed": 11' in manifest
            page.locator("#manifest-box summary").click()
            page.screenshot(path=str(screenshot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    print(f"screenshot: {screenshot}")
    assert Image.open(screenshot).size[0] == 900
