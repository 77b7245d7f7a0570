"""The REST service (src/service/) through FastAPI's test client, every kind loaded from tiny local models.

The models are those of tests/test_panels.py (a CLIP export, its image index, a depth-to-image model grown from
the tiny base) plus a Canny ControlNet made from the base's UNet and a style LoRA export, all loaded by path as a
user's local copies. One app per module (per worker): ``TestClient(app)`` runs its lifespan, which loads them.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

TERMINAL = ("succeeded", "failed", "cancelled", "expired")
LONG = 40  # denoising steps of a job that must still be running when the test acts on it
STORY = [
    "A small red circle on the left side of a white background.",
    "작은 빨간 원이 흰색 배경의 오른쪽 위에 있다.",
    "Next the red circle grows large in the top right corner of the white background.",
    "Finally the large circle turns blue in the top right corner of the white background.",
]
# Traversal attempts, each as a client would send it (a path segment, a query value, a JSON string, a file name)
TRAVERSALS = [
    "../../secret",
    "..%2F..%2Fsecret",
    "%2e%2e%2f%2e%2e%2fsecret",
    "..%252F..%252Fsecret",
    "/etc/passwd",
    "..\\..\\secret",
    "secret%00.png",
    "secret\x00.png",
    "．．／．．／secret",
    "0123456789abcdef0123456789abcdef\n",
]


# --- the models, the app, and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def service_models(synthetic_dir, tmp_path_factory, worker_id) -> dict[str, Path]:
    """Built once per test run, whichever worker asks first (a module's tests may be split between workers)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if worker_id != "master" else shared
    out = shared / "service_models"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").is_file():
            build_service_models(out, synthetic_dir)
            (out / "done").touch()
    return {name: out / name for name in ("base", "clip", "index", "depth", "controlnet", "lora")}


def build_service_models(out: Path, synthetic_dir: Path) -> None:
    """A tiny base, its depth-to-image model, a CLIP export and its index (as tests/test_panels.py builds them),
    a Canny ControlNet whose zero convolutions are trained (so it steers) and a style LoRA on the same base."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from test_retrieval_index import tiny_clip
    from test_sd_depth import DEPTH_ESTIMATOR
    from tiny_sd import build_tiny_stable_diffusion

    from src.modules.diffusion.depth_to_image import DepthToImageFineTune
    from src.modules.diffusion.lora import LoRAFineTune
    from src.retrieval.encoder import CLIPEncoder
    from src.retrieval.index import build_image_index

    tiny_clip(synthetic_dir / "tokenizer", seed=0).export(out / "clip")
    encoder = CLIPEncoder.load(out / "clip")
    build_image_index(str(synthetic_dir / "train-*.tar"), encoder, out / "index", progress=False)
    base = build_tiny_stable_diffusion(out / "base")
    torch.manual_seed(0)
    depth = DepthToImageFineTune(base, depth_estimator=DEPTH_ESTIMATOR, image_size=32)
    with torch.no_grad():  # a depth channel that matters
        depth.unet.conv_in.weight[:, 4:].normal_(0, 0.3)
    depth.export(out / "depth")
    net = ControlNetModel.from_unet(
        UNet2DConditionModel.from_pretrained(base / "unet"), conditioning_embedding_out_channels=(16, 32)
    )
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    net.save_pretrained(out / "controlnet")
    lora = LoRAFineTune(pretrained_model_name_or_path=str(base), rank=4)
    with torch.no_grad():
        for name, parameter in lora.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    lora.export(out / "lora")


def settings_for(paths: dict[str, Path], root: Path, **limits) -> dict:
    """A serve config on the tiny models: 2 denoising steps, no guidance (one UNet pass a step), small limits."""
    sampling = {"num_inference_steps": 2, "guidance_scale": 1.0}
    return {
        "devices": ["cpu"],
        "output_root": str(root),
        "limits": {
            "min_size": 16,
            "max_size": 64,
            "max_steps": LONG,
            "queue_size": 3,
            "queue_deadline_s": 60,
            **limits,
        },
        "styles": {"ink": {"weights": str(paths["lora"])}},
        "txt2img": {"base_model": str(paths["base"]), **sampling},
        "img2img": {
            "base_model": str(paths["base"]),
            "controlnets": {"canny": {"model": str(paths["controlnet"]), "detector": "canny", "scale": 1.0}},
            **sampling,
        },
        "panel": {
            "clip": str(paths["clip"]),
            "index": str(paths["index"]),
            "depth_model": str(paths["depth"]),
            "style_keyword": "flat",
            **sampling,
        },
        "story": {"consistency": "none", "panel_width": 64, "gutter": 8},
    }


def started(app):
    """A TestClient whose lifespan has run and whose models have loaded."""
    from fastapi.testclient import TestClient

    client = TestClient(app)
    client.__enter__()
    deadline = time.monotonic() + 120
    while client.get("/health").json()["status"] == "loading":
        assert time.monotonic() < deadline, "the models did not load in 120 s"
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def client(service_models, tmp_path_factory):
    from src.service.app import create_app
    from src.service.settings import service_settings

    root = tmp_path_factory.mktemp("service") / "root"
    client = started(create_app(service_settings(settings_for(service_models, root))))
    yield client
    client.__exit__(None, None, None)


def root_of(client) -> Path:
    return client.app.state.service.store.root


def submit(client, **request) -> dict:
    response = client.post("/v1/jobs", json=request)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == job["url"] == f"/v1/jobs/{job['id']}"
    return job


def wait_for(client, job_id: str, states=TERMINAL, done: int = 0, timeout: float = 90.0) -> dict:
    """Poll until the job is in one of ``states`` (and has done ``done`` steps)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states and job["progress"]["done"] >= done:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def pixels(client, image_id: str) -> np.ndarray:
    response = client.get(f"/v1/images/{image_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def photo_bytes(size: tuple[int, int] = (48, 40), image_format: str = "PNG") -> bytes:
    """A 'photo': a red house on a sky."""
    image = Image.new("RGB", size, (150, 200, 240))
    draw = ImageDraw.Draw(image)
    draw.polygon([(8, 20), (24, 6), (40, 20)], fill=(200, 30, 30))
    draw.rectangle([12, 20, 36, 36], fill=(140, 90, 40))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def read_events(client, url: str, headers: dict | None = None) -> list[tuple[int, str, dict]]:
    """Every server-sent event of ``url`` until the stream ends: (id, event, data)."""
    events, fields = [], {}
    with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "data" in fields:
                events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
    return events


def files_outside(tmp: Path, root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in tmp.rglob("*") if p.is_file() and not p.is_relative_to(root)}


# --- health, models, txt2img, the manifest ------------------------------------------------------------------


def test_a_txt2img_job_is_stored_under_ids_and_its_manifest_redraws_the_same_pixels(client, service_models):
    from src.pipelines.loading import load_text_to_image
    from src.utils.image_grid import to_pil

    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert health.json()["kinds"] == ["txt2img", "img2img", "panel", "story"]
    offered = client.get("/v1/models").json()
    assert {kind: view["styles"] for kind, view in offered["kinds"].items()} == {
        kind: ["none", "ink"] for kind in ("txt2img", "img2img", "panel", "story")
    }
    assert offered["kinds"]["img2img"]["controlnets"] == ["canny"] and offered["unavailable"] == {}
    assert offered["kinds"]["txt2img"]["defaults"]["steps"] == 2

    job = submit(client, kind="txt2img", prompt="a red house", seed=7, num_images=2, steps=3)
    assert job["state"] in ("queued", "running") and job["images"] == []
    job = wait_for(client, job["id"])
    assert job["state"] == "succeeded" and job["progress"] == {"done": 3, "total": 3}
    manifest = job["manifest"]
    assert manifest["request"]["prompt"] == "a red house" and manifest["settings"]["num_inference_steps"] == 3
    assert [image["seed"] for image in manifest["images"]] == [7, 8]
    root = root_of(client)
    assert json.loads((root / "manifests" / f"{job['id']}.json").read_text()) == manifest
    for image in job["images"]:
        assert (root / "images" / f"{image['id']}.png").is_file() and image[
            "url"
        ] == f"/v1/images/{image['id']}"

    settings = manifest["settings"]
    redrawn = load_text_to_image(
        base_model=settings["base_model"],
        device="cpu",
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
    )([manifest["request"]["prompt"]], manifest["request"]["num_images"], manifest["request"]["seed"])[0]
    for image, again in zip(job["images"], redrawn, strict=True):
        assert np.array_equal(pixels(client, image["id"]), np.asarray(to_pil(again)))
    assert not np.array_equal(pixels(client, job["images"][0]["id"]), pixels(client, job["images"][1]["id"]))

    listed = client.get("/v1/jobs", params={"state": "succeeded", "limit": 1}).json()
    assert [j["id"] for j in listed] == [job["id"]]


def test_progress_streams_as_server_sent_events_in_order_and_resumes(client):
    job = submit(client, kind="txt2img", prompt="a blue pentagon", steps=3)
    events = read_events(client, job["events_url"])
    assert [number for number, _, _ in events] == list(range(1, len(events) + 1))
    assert [(event, data.get("state"), data.get("done")) for _, event, data in events] == [
        ("state", "queued", None),
        ("state", "running", None),
        ("progress", None, 1),
        ("progress", None, 2),
        ("progress", None, 3),
        ("state", "succeeded", None),
    ]
    assert events[-1][2]["job"]["images"] and all(data.get("total", 3) == 3 for _, _, data in events)
    resumed = read_events(client, job["events_url"], headers={"Last-Event-ID": "4"})
    assert resumed == events[4:]


def test_a_korean_panel_and_a_story_strip_with_shared_attention(client):
    from src.pipelines.strip import strip_layout

    treatment = "큰 빨간 원이 흰색 배경의 가운데에 있다."
    panel = submit(client, kind="panel", treatment=treatment, num_images=2, seed=3)
    story = submit(client, kind="story", story=STORY, consistency="shared_attention", size=32)
    panel, story = wait_for(client, panel["id"]), wait_for(client, story["id"])
    assert panel["state"] == story["state"] == "succeeded", (panel["error"], story["error"])

    assert [image["role"] for image in panel["images"]] == ["panel", "retrieved", "panel", "retrieved"]
    records = [image for image in panel["manifest"]["images"] if image["role"] == "panel"]
    assert [record["seed"] for record in records] == [3, 4]
    assert all(r["treatment"] == treatment and r["language"] == "ko" for r in records)
    assert all(
        "first English caption" in r["prompt_from"] and r["sd_prompt"].endswith(", flat") for r in records
    )
    assert pixels(client, panel["images"][0]["id"]).shape == (32, 32, 3)

    roles = [image["role"] for image in story["images"]]
    assert roles == ["strip", "panel", "panel", "panel", "panel"]
    assert story["manifest"]["settings"]["consistency"] == "shared_attention"
    assert story["manifest"]["images"][2]["language"] == "ko"
    layout = strip_layout([(32, 32)] * 4, STORY, width=64, gutter=8)
    assert pixels(client, story["images"][0]["id"]).shape == (layout.size[1], layout.size[0], 3)


def test_img2img_redraws_an_upload_with_the_controlnet_scale_and_the_style_a_job_asks(client):
    upload = client.post("/v1/uploads", files={"file": ("house.png", photo_bytes(), "image/png")})
    assert upload.status_code == 201, upload.text
    assert upload.json()["width"] == 48 and upload.json()["height"] == 40
    assert (root_of(client) / "uploads" / f"{upload.json()['id']}.png").is_file()

    common = {
        "kind": "img2img",
        "prompt": "a red house in the fire",
        "photo": upload.json()["id"],
        "size": 16,
    }
    jobs = [
        submit(client, **common, controlnets={"canny": 1.0}),
        submit(client, **common, controlnets={"canny": 0.0}),
        submit(client, **common, controlnets={"canny": 1.0}, style="ink"),
    ]
    steered, free, styled = (wait_for(client, job["id"]) for job in jobs)
    assert [image["role"] for image in steered["images"]] == ["input", "control", "image"]
    assert steered["manifest"]["settings"]["controlnets"][0]["scale"] == 1.0
    assert free["manifest"]["settings"]["controlnets"][0]["scale"] == 0.0
    assert styled["manifest"]["settings"]["method"] == "lora"
    first, second, third = (pixels(client, job["images"][2]["id"]) for job in (steered, free, styled))
    assert first.shape == (16, 16, 3)  # the 48 x 40 photo at shorter side 16 (both sides multiples of 8)
    assert np.abs(first.astype(int) - second).max() > 0 and np.abs(first.astype(int) - third).max() > 0


def test_generate_answers_one_png_and_refuses_more(client):
    response = client.post("/v1/generate", json={"kind": "txt2img", "prompt": "a red house", "seed": 5})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    job = client.get(response.headers["location"]).json()
    assert job["id"] == response.headers["x-job-id"] and job["state"] == "succeeded"
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(response.content))), pixels(client, job["images"][0]["id"])
    )
    refused = client.post("/v1/generate", json={"kind": "txt2img", "prompt": "a red house", "num_images": 2})
    assert refused.status_code == 422 and "POST /v1/jobs" in refused.text


# --- queue: cancel, bound, expiry -------------------------------------------------------------------------------


def test_cancel_stops_a_queued_job_at_once_and_a_running_one_at_its_next_step(client):
    running = submit(client, kind="txt2img", prompt="a red house", steps=LONG)
    wait_for(client, running["id"], states=("running",), done=1)
    queued = submit(client, kind="txt2img", prompt="a blue house", steps=LONG)
    assert client.get(queued["url"]).json()["queue_position"] == 1

    cancelled = client.delete(queued["url"])
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["started_at"] is None
    stopping = client.delete(running["url"])
    assert stopping.status_code == 202 and stopping.json()["cancel_requested"] is True
    stopped = wait_for(client, running["id"])
    assert stopped["state"] == "cancelled" and stopped["images"] == [] and stopped["manifest"] is None
    assert 1 <= stopped["progress"]["done"] < stopped["progress"]["total"] == LONG

    again = client.delete(running["url"])
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert client.delete(f"/v1/jobs/{'0' * 32}").status_code == 404


def test_a_full_queue_answers_429_with_retry_after_and_an_overdue_job_expires(client):
    running = submit(client, kind="txt2img", prompt="a red house", steps=LONG)
    wait_for(client, running["id"], states=("running",), done=1)
    overdue = submit(client, kind="txt2img", prompt="a red house", deadline_s=0.3)
    waiting = [submit(client, kind="txt2img", prompt="a red house", steps=LONG) for _ in range(2)]
    full = client.post("/v1/jobs", json={"kind": "txt2img", "prompt": "one too many"})
    assert full.status_code == 429 and "queue is full" in full.json()["detail"]
    assert int(full.headers["retry-after"]) >= 1

    expired = wait_for(client, overdue["id"], timeout=5)
    assert expired["state"] == "expired" and expired["started_at"] is None and "deadline" in expired["error"]
    for job in [*waiting, running]:
        client.delete(job["url"])
    assert all(wait_for(client, job["id"])["state"] == "cancelled" for job in [*waiting, running])
    assert client.get("/health").json()["queue"]["peak_queued"] <= 3


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"kind": "txt2img", "prompt": "x", "steps": LONG + 1}, "less than or equal to 40"),
        ({"kind": "txt2img", "prompt": "x", "num_images": 9}, "less than or equal to 4"),
        ({"kind": "txt2img", "prompt": "x", "guidance_scale": False}, "Input should be a valid number"),
        ({"kind": "txt2img", "prompt": "x", "num_images": True}, "Input should be a valid integer"),
        ({"kind": "txt2img", "prompt": "x" * 501}, "at most 500 characters"),
        ({"kind": "txt2img", "prompt": "   "}, "must not be blank"),
        ({"kind": "txt2img", "prompt": "a\x1b[31m red"}, "control characters"),
        ({"kind": "txt2img", "prompt": "x", "size": 32}, "Extra inputs are not permitted"),
        ({"kind": "panel", "treatment": "x", "size": 20}, "multiple of 8"),
        ({"kind": "panel", "treatment": "x", "size": 128}, "less than or equal to 64"),
        ({"kind": "panel", "treatment": "x", "strength": 1.5}, "less than or equal to 1"),
        ({"kind": "story", "story": ["one", "two", "three", "four", "five"]}, "at most 4 items"),
        ({"kind": "txt2img", "prompt": "x", "style": "oil"}, "Input should be 'none' or 'ink'"),
        (
            {"kind": "img2img", "prompt": "x", "photo": "0" * 32, "controlnets": {"pose": 1}},
            "Input should be 'canny'",
        ),
        ({"kind": "img2img", "prompt": "x", "photo": "0" * 32}, "no uploaded photo has this id"),
        ({"kind": "video", "prompt": "x"}, "'txt2img', 'img2img', 'panel', 'story'"),
        ({"prompt": "x"}, "Unable to extract tag using discriminator 'kind'"),
    ],
)
def test_a_bad_field_gets_422_naming_what_to_change(client, request_body, message):
    response = client.post("/v1/jobs", json=request_body)
    assert response.status_code == 422
    assert message in " ".join(problem["msg"] for problem in response.json()["detail"]), response.text


def test_oversize_and_malformed_bodies_get_413_and_422_with_a_message(client):
    big = {"kind": "txt2img", "prompt": "x", "negative_prompt": "y" * 70_000}
    response = client.post("/v1/jobs", json=big)
    assert (
        response.status_code == 413 and "65536 accepted (limits.max_body_bytes)" in response.json()["detail"]
    )

    def chunks():  # no Content-Length: FastAPI's own limit stops it while it arrives
        yield b'{"kind": "txt2img", "prompt": "'
        for _ in range(80):
            yield b"y" * 1000
        yield b'"}'

    chunked = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["detail"]

    malformed = client.post(
        "/v1/jobs", content=b'{"kind": "txt2img", "prompt": ', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422 and "JSON decode error" in malformed.text
    assert client.post("/v1/jobs", json=["txt2img"]).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422

    def upload(data: bytes, name: str = "photo.png"):
        return client.post("/v1/uploads", files={"file": (name, data, "image/png")})

    assert (
        upload(b"not an image")
        .json()["detail"][0]["msg"]
        .endswith("could not be decoded as an image (UnidentifiedImageError).")
    )
    assert "accepted: PNG, JPEG, WEBP" in upload(photo_bytes(image_format="GIF")).text
    assert "more than the 4194304 accepted" in upload(photo_bytes((4096, 1025))).text
    assert upload(photo_bytes(image_format="JPEG"), name="photo.gif").status_code == 201  # decoded, not named
    too_large = upload(b"\0" * (11 * 2**20))
    assert too_large.status_code == 413 and "limits.max_upload_bytes" in too_large.json()["detail"]


def test_traversal_in_every_field_gets_4xx_and_nothing_outside_the_root_is_read_or_written(client):
    root = root_of(client)
    tmp = root.parent
    (tmp / "secret.png").write_bytes(photo_bytes())
    (tmp / "secret").write_text("do not serve")
    before = files_outside(tmp, root)
    served = []

    job = submit(client, kind="txt2img", prompt="a red house")
    wait_for(client, job["id"])
    for attempt in TRAVERSALS:
        segment = attempt.replace("\x00", "%00").replace("\n", "%0A")
        for url in (f"/v1/images/{segment}", f"/v1/jobs/{segment}", f"/v1/jobs/{segment}/events"):
            response = client.get(url)
            assert 400 <= response.status_code < 500, (url, response.status_code)
            served.append(response.content)
        assert 400 <= client.delete(f"/v1/jobs/{segment}").status_code < 500
        for params in ({"state": attempt}, {"limit": attempt}):
            assert client.get("/v1/jobs", params=params).status_code == 422
        assert client.get(job["events_url"], params={"after": attempt}).status_code == 422
        for field, value in [
            ("style", attempt),
            ("photo", attempt),
            ("kind", attempt),
            ("controlnets", {attempt: 1}),
        ]:
            body = {"kind": "img2img", "prompt": "x", "photo": "0" * 32, field: value}
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422, (field, attempt, response.text)
        upload = client.post("/v1/uploads", files={"file": (attempt, photo_bytes(), "image/png")})
        assert upload.status_code == 422 and "plain name" in upload.text, (attempt, upload.text)

    # A prompt is prose: path-like words are drawn as words and never become part of a path.
    words = " ".join(t for t in TRAVERSALS if "\x00" not in t and "\n" not in t)
    drawn = wait_for(client, submit(client, kind="txt2img", prompt=words, negative_prompt=words)["id"])
    assert drawn["state"] == "succeeded" and drawn["manifest"]["request"]["prompt"] == words
    assert all(not content.startswith(b"\x89PNG") for content in served)  # no image was served by those paths
    assert files_outside(tmp, root) == before
    stored = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    assert all(len(p.parts) == 2 and p.parts[0] in ("images", "uploads", "manifests") for p in stored)
    assert all(len(p.stem) == 32 and int(p.stem, 16) >= 0 for p in stored)


# --- settings: api key, request ids, missing models, schema ----------------------------------------------------


def test_an_api_key_guards_v1_and_requests_carry_ids(service_models, tmp_path):
    from src.service.app import create_app
    from src.service.settings import service_settings

    config = {
        **settings_for(service_models, tmp_path / "root"),
        "api_key": "s3cret",
        "img2img": None,
        "panel": None,
    }
    client = started(create_app(service_settings(config)))
    try:
        assert client.get("/health").status_code == 200  # open: load balancers probe it
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
        offered = client.get("/v1/models", headers={"X-API-Key": "s3cret"}).json()
        assert list(offered["kinds"]) == ["txt2img"]
        assert offered["unavailable"]["story"].startswith("a story is drawn by the panel models")
        assert client.get("/", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
        replaced = client.get("/", headers={"X-Request-ID": "../../etc"}).headers["x-request-id"]
        assert replaced != "../../etc" and len(replaced) == 16
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    finally:
        client.__exit__(None, None, None)


def test_without_models_the_server_starts_and_says_what_to_make(tmp_path, caplog, user_error):
    from hydra_runs import compose_plain

    import serve

    missing = tmp_path / "missing"
    overrides = [
        f"output_root={tmp_path / 'root'}",
        f"txt2img.base_model={missing}/sd_demo_base",
        f"img2img.base_model={missing}/sd_demo_base",
        f"panel.clip={missing}/clip_demo",
    ]
    app = serve.service_app(compose_plain("serve.yaml", overrides))
    with caplog.at_level("WARNING"):
        client = started(app)
        try:
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "no models"
            assert "python train.py experiment=sd_demo_base" in health.json()["detail"]
            refused = client.post("/v1/jobs", json={"kind": "txt2img", "prompt": "x"})
            assert (
                refused.status_code == 503 and "txt2img: Cannot load weights for `base_model`" in refused.text
            )
            assert client.get("/").status_code == 200
        finally:
            client.__exit__(None, None, None)
    messages = [record.getMessage() for record in caplog.records]
    assert any("txt2img not offered" in m and "experiment=sd_demo_base" in m for m in messages)
    assert any("panel not offered" in m and "benchmark=panels_demo" in m for m in messages)
    assert not any(record.exc_info for record in caplog.records)  # a missing model is a line, not a traceback

    with user_error(r"limits\.queue_size: Input should be greater than or equal to 1"):
        serve.main(compose_plain("serve.yaml", ["limits.queue_size=0"]))


def fuzz(operation, mode, calls: list[tuple[str, int]], max_examples: int = 5) -> None:
    """Call ``operation`` with ``max_examples`` generated cases; every check but positive-data acceptance
    (a schema-valid body may name an upload that does not exist: 422), and never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case):
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        calls.append((operation.label, response.status_code))
        assert response.status_code < 500

    try:
        check()
    except Unsatisfiable:  # no invalid request exists for an operation without parameters
        assert mode == GenerationMode.NEGATIVE, operation.label


def test_schemathesis_finds_no_server_error_and_no_undeclared_response(service_models, tmp_path):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.python import asgi

    from src.service.app import create_app
    from src.service.settings import service_settings

    config = settings_for(service_models, tmp_path / "root", max_steps=3, max_images=2, generate_timeout_s=60)
    app = create_app(service_settings({**config, "styles": {}}))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with asgi.get_client(
        app
    ) as client:  # the lifespan schemathesis started: wait for the models (503 until then)
        deadline = time.monotonic() + 120
        while client.get("/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    calls: list[tuple[str, int]] = []
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode, calls)
    labels = {label for label, _ in calls}
    assert {"POST /v1/jobs", "GET /v1/images/{image_id}", "POST /v1/uploads", "GET /health"} <= labels
    assert any(label == "POST /v1/jobs" and status == 202 for label, status in calls)
