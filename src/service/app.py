"""The FastAPI application: ``create_app(settings)``.

Models load in a thread started by the lifespan (``GET /health`` answers 503 "loading" meanwhile, then "ready"),
one worker per device takes jobs from the bounded queue, and the handlers only validate, queue and read: no
generation on the event loop. Every status code a route can answer is declared in its OpenAPI operation.

    GET  /                         the page                 POST /v1/uploads         a photo -> its id
    GET  /health                   ready or not             POST /v1/jobs            a job -> 202 + its id
    GET  /v1/models                kinds, styles, limits    GET  /v1/jobs[/{id}]     state, progress, manifest
    GET  /v1/jobs/{id}/events      progress (SSE)           DELETE /v1/jobs/{id}     cancel
    GET  /v1/images/{id}           a PNG                    POST /v1/generate        one image, synchronously
"""

import asyncio
import contextlib
import json
import logging
import re
import secrets
import threading
import time
import unicodedata
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Body,
    Depends,
    FastAPI,
    File,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    Security,
    UploadFile,
)
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.sse import EventSourceResponse, ServerSentEvent

from src.service.jobs import TERMINAL, Job, JobConflict, JobQueue, QueueFull
from src.service.models import LoadedKinds, load_kinds
from src.service.schemas import (
    STATES,
    HealthView,
    ImageRef,
    JobView,
    ModelsView,
    Problem,
    Progress,
    UploadView,
    request_models,
)
from src.service.settings import KINDS, ServiceSettings
from src.service.storage import ID_PATTERN, InvalidId, Store
from src.utils.device import resolve_device
from src.utils.images import ImageRejected, decode_image

__all__ = ["Service", "create_app"]

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "page"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a client's X-Request-ID is echoed only when plain
MAIN_ROLES = ("image", "panel", "strip")  # what POST /v1/generate returns: the first of these
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


BAD_BODY = {400: _problem("the body could not be parsed (not UTF-8 JSON, or a broken multipart form)")}
NOT_READY = {503: _problem("models are still loading, or none loaded (see GET /health)")}
TOO_LARGE = {
    413: _problem("the request body is over limits.max_body_bytes (limits.max_upload_bytes for uploads)")
}
FULL = {
    429: {
        **_problem("the queue is full: try again after Retry-After seconds"),
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    }
}
NOT_FOUND = {404: _problem("no such job or image (finished jobs are kept up to limits.keep_jobs)")}
# A route's additional responses take its own media type; the event stream's errors are JSON all the same.
JSON_NOT_FOUND = {
    404: {
        "description": NOT_FOUND[404]["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}


class Service:
    """The running state behind the routes: settings, stored files, loaded models, the queue."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.store = Store(settings.output_root)
        self.devices = [str(resolve_device(device)) for device in settings.devices]
        self.loaded: list[LoadedKinds] = []
        self.status = "loading"
        self.queue = JobQueue(
            self.run,
            workers=len(self.devices),
            capacity=self.limits.queue_size,
            keep=self.limits.keep_jobs,
            on_forget=self.forget,
        )
        self.uploads: deque[str] = deque()
        self.uploads_lock = threading.Lock()
        self.loader: threading.Thread | None = None

    # --- start and stop ---------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the models in a thread (so /health answers meanwhile), then start the workers."""

        def load() -> None:
            started = time.monotonic()
            self.loaded = [load_kinds(self.settings, device) for device in self.devices]
            offered = self.offered_kinds()
            self.status = "ready" if offered else "no models"
            if offered:
                log.info(
                    "ready in %.1f s: %s on %s", time.monotonic() - started, ", ".join(offered), self.devices
                )
            else:
                log.warning("no kind could be offered: %s", self.no_models_detail())
            self.queue.start(loop)

        self.loader = threading.Thread(target=load, name="model-loader", daemon=True)
        self.loader.start()

    def stop(self) -> None:
        """Let a load in progress end (a thread killed inside torch aborts the process), cancel the running and
        waiting jobs, and join the workers."""
        if self.loader is not None:
            self.loader.join()
        self.queue.stop()

    def no_models_detail(self) -> str:
        reasons = {kind: why for loaded in self.loaded for kind, why in loaded.unavailable.items()}
        return "no model loaded. " + " ".join(f"{kind}: {why}" for kind, why in reasons.items())

    # --- what is offered ----------------------------------------------------------------------------------------

    def offered_kinds(self) -> list[str]:
        """Kinds loaded on every device (any worker may take any job)."""
        if not self.loaded:
            return []
        return [kind for kind in KINDS if all(kind in loaded.kinds for loaded in self.loaded)]

    def offered_styles(self, kind: str) -> list[str]:
        return [
            s for s in self.loaded[0].styles(kind) if all(s in loaded.styles(kind) for loaded in self.loaded)
        ]

    def require_ready(self) -> None:
        if self.status == "loading":
            raise HTTPException(
                503, "the models are still loading: try again shortly", headers={"Retry-After": "5"}
            )
        if self.status != "ready":
            raise HTTPException(503, self.no_models_detail())

    def check_offered(self, request: Any) -> None:
        """422 naming the choices when the request's kind, style or photo is not here."""
        offered = self.offered_kinds()
        if request.kind not in offered:
            _reject(
                ("body", "kind"), f"kind {request.kind!r} is not offered here; offered: {', '.join(offered)}"
            )
        styles = self.offered_styles(request.kind)
        if request.style not in styles:
            _reject(
                ("body", "style"),
                f"style {request.style!r} is not offered for {request.kind}; offered: {', '.join(styles)}",
            )
        try:
            self.loaded[0].kinds[request.kind].check(request)
        except ValueError as error:
            _reject(("body",), str(error))
        if request.kind == "img2img" and self.store.existing("uploads", request.photo) is None:
            _reject(("body", "photo"), "no uploaded photo has this id: upload it first (POST /v1/uploads)")

    # --- the worker's side ------------------------------------------------------------------------------------

    def run(self, job: Job, worker: int, on_step: Any) -> dict[str, Any]:
        """Draw ``job`` with worker ``worker``'s models; store its images and manifest."""
        loaded = self.loaded[worker]
        request = job.request
        photo = None
        if request.kind == "img2img":
            photo = self.store.open_upload(request.photo)
            if photo is None:
                raise ValueError(
                    "the uploaded photo is no longer stored (limits.keep_uploads): upload it again"
                )
        drawing = loaded.kinds[request.kind].draw(request, on_step, photo)
        images = []
        for drawn in drawing.images:
            images.append({"id": self.store.save_image(drawn.image), "role": drawn.role, **drawn.record})
        manifest = {
            "job": job.id,
            "kind": request.kind,
            "request": request.model_dump(mode="json"),
            "settings": drawing.settings,
            "device": loaded.device,
            "images": images,
        }
        manifest = json.loads(json.dumps(manifest, default=str, ensure_ascii=False))
        self.store.write_manifest(job.id, manifest)
        return {
            "images": [{"id": image["id"], "role": image["role"]} for image in images],
            "manifest": manifest,
        }

    def forget(self, job: Job) -> None:
        """A job dropped from memory: its files go too."""
        if job.result:
            self.store.delete("images", [image["id"] for image in job.result["images"]])
            self.store.delete("manifests", [job.id])

    def remember_upload(self, upload_id: str) -> None:
        with self.uploads_lock:
            self.uploads.append(upload_id)
            while len(self.uploads) > self.limits.keep_uploads:
                self.store.delete("uploads", [self.uploads.popleft()])

    # --- views --------------------------------------------------------------------------------------------------

    def view(self, job: Job) -> JobView:
        result = job.result or {}
        return JobView(
            id=job.id,
            kind=job.kind,
            state=job.state,
            url=f"/v1/jobs/{job.id}",
            events_url=f"/v1/jobs/{job.id}/events",
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queue_position=self.queue.queue_position(job),
            progress=Progress(done=job.progress[0], total=job.progress[1]),
            cancel_requested=job.cancel_requested,
            images=[ImageRef(url=f"/v1/images/{image['id']}", **image) for image in result.get("images", [])],
            manifest=result.get("manifest"),
            error=job.error,
        )

    def job(self, job_id: str) -> Job:
        job = self.queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} here (finished jobs are kept up to limits.keep_jobs)")
        return job


def _reject(location: tuple[str, ...], message: str) -> None:
    """A 422 in FastAPI's own validation format, so it matches the declared schema."""
    raise RequestValidationError([{"loc": location, "msg": message, "type": "value_error"}])


def _plain_file_name(name: str | None) -> None:
    """An upload's file name is never used, but one that is a path is a mistake or an attack: 422."""
    if not name:
        return
    text = name
    for _ in range(3):  # %2e%2e%2f, and %252f twice over; full-width dots and slashes fold under NFKC
        text = unicodedata.normalize("NFKC", urllib.parse.unquote(text))
    if any(c in text for c in "/\\") or any(ord(c) < 32 for c in text) or text.strip(". ") == "":
        _reject(("body", "file"), "the file name must be a plain name (it is never used: uploads get an id)")


# --- middleware ------------------------------------------------------------------------------------------------


class RequestLog:
    """A request id (the client's ``X-Request-ID`` when it is a plain token, else a new one) on every response,
    and one log line per request with its status and time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else secrets.token_hex(8)
        started, status = time.perf_counter(), 0

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(  # the path as a repr: a decoded %0A must not start a forged log line
                "request %s %s %r -> %s in %.1f ms",
                request_id,
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )


class DeclaredBodyLimit:
    """413 with a message naming the limit when ``Content-Length`` says the body is over it, before reading it.
    The routes that read a body also have FastAPI's ``max_body_size``, which stops a body sent without a length
    (chunked) as it arrives. (Not on the app: its limit answers in plain text, outside every middleware.)"""

    def __init__(self, app: Any, limits: dict[str, tuple[int, str]], default: tuple[int, str]) -> None:
        self.app = app
        self.limits = limits
        self.default = default

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            limit, setting = self.limits.get(scope["path"], self.default)
            if declared.isdigit() and int(declared) > limit:
                detail = f"the request body is {int(declared)} bytes, over the {limit} accepted ({setting})"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the application ------------------------------------------------------------------------------------------


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service for ``settings``; its models load when the app starts (lifespan)."""
    service = Service(settings)
    limits = settings.limits
    controlnets = list((settings.img2img or {}).get("controlnets") or {})
    requests = request_models(limits, list(settings.styles), controlnets)
    JobRequest = Annotated[requests.union, Body(discriminator="kind")]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start(asyncio.get_running_loop())

        async def expire_overdue() -> None:
            while True:
                await asyncio.sleep(0.25)
                service.queue.expire_overdue()

        sweeper = asyncio.create_task(expire_overdue())
        try:
            yield
        finally:
            sweeper.cancel()
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="webtoon-lab",
        summary="Webtoon generation jobs: text to image, photo to webtoon, treatment to panel, story to strip.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service

    async def require_api_key(
        key: Annotated[str | None, Security(APIKeyHeader(name="X-API-Key", auto_error=False))],
    ) -> None:
        if not (key and secrets.compare_digest(key.encode(), settings.api_key.encode())):
            raise HTTPException(
                401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "ApiKey"}
            )

    guarded = bool(settings.api_key)  # an empty WEBTOON_API_KEY means no key
    v1 = APIRouter(
        prefix="/v1",
        dependencies=[Depends(require_api_key)] if guarded else [],
        responses={401: _problem("missing or wrong X-API-Key header")} if guarded else {},
    )

    async def job_from_path(job_id: Annotated[str, PathParam(pattern=ID_PATTERN)]) -> Job:
        return service.job(job_id)

    # --- jobs ---------------------------------------------------------------------------------------------------

    @v1.post(
        "/jobs",
        status_code=202,
        response_model=JobView,
        responses={
            **BAD_BODY,
            **FULL,
            **NOT_READY,
            **TOO_LARGE,
            202: {"headers": {"Location": {"schema": {"type": "string"}}}},
        },
        summary="Queue a job",
        max_body_size=limits.max_body_bytes,
    )
    async def submit_job(request: JobRequest, response: Response) -> JobView:
        service.require_ready()
        service.check_offered(request)
        job = _submit(request, request.deadline_s or limits.queue_deadline_s)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return service.view(job)

    def _submit(request: Any, deadline_s: float) -> Job:
        try:
            return service.queue.submit(request, deadline_s)
        except QueueFull as full:
            raise HTTPException(429, str(full), headers={"Retry-After": str(full.retry_after)}) from None

    @v1.get("/jobs", response_model=list[JobView], summary="The latest jobs, newest first")
    async def list_jobs(
        state: Annotated[str | None, Query(pattern=f"^({'|'.join(STATES)})$")] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> list[JobView]:
        jobs = [job for job in service.queue.snapshot() if state is None or job.state == state]
        return [
            service.view(job) for job in sorted(jobs, key=lambda job: job.created_at, reverse=True)[:limit]
        ]

    @v1.get(
        "/jobs/{job_id}", response_model=JobView, responses=NOT_FOUND, summary="A job's state and results"
    )
    async def get_job(job: Annotated[Job, Depends(job_from_path)]) -> JobView:
        return service.view(job)

    @v1.delete(
        "/jobs/{job_id}",
        status_code=202,
        response_model=JobView,
        responses={**NOT_FOUND, 409: _problem("the job has already ended")},
        summary="Cancel a job (a running one stops at its next denoising step)",
    )
    async def cancel_job(job: Annotated[Job, Depends(job_from_path)]) -> JobView:
        try:
            return service.view(service.queue.cancel(job.id))
        except JobConflict as conflict:
            raise HTTPException(409, str(conflict)) from None
        except KeyError:
            raise HTTPException(404, f"no job {job.id} here") from None

    @v1.get(
        "/jobs/{job_id}/events",
        response_class=EventSourceResponse,
        responses=JSON_NOT_FOUND,
        summary="Progress as server-sent events: state, progress (per step), state ... until the job ends",
    )
    async def job_events(
        job: Annotated[Job, Depends(job_from_path)],
        last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0, le=10**6)] = None,
        after: Annotated[int | None, Query(ge=0, le=10**6, description="resume after this event id")] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        start = max(last_event_id or 0, after or 0)
        async for number, event in service.queue.events(job, start):
            data = dict(event["data"])
            if event["event"] == "state" and data["state"] in TERMINAL:
                data["job"] = service.view(job).model_dump(mode="json")
            yield ServerSentEvent(event=event["event"], data=data, id=str(number))

    # --- synchronous generation -------------------------------------------------------------------------------

    @v1.post(
        "/generate",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the image (X-Job-Id: its job)"},
            409: _problem("the job was cancelled meanwhile"),
            500: _problem("the generation failed inside the server"),
            504: _problem("started but not done within limits.generate_timeout_s (the job is cancelled)"),
            **BAD_BODY,
            **FULL,
            **NOT_READY,
            **TOO_LARGE,
        },
        summary="One image, waiting for it (a job with a deadline)",
        max_body_size=limits.max_body_bytes,
    )
    async def generate(request: JobRequest) -> Response:
        service.require_ready()
        if getattr(request, "num_images", 1) != 1:
            _reject(("body", "num_images"), "POST /v1/generate draws one image: use POST /v1/jobs for more")
        service.check_offered(request)
        timeout = limits.generate_timeout_s
        job = _submit(request, min(request.deadline_s or timeout, timeout))
        if not await service.queue.wait(job, timeout):
            with contextlib.suppress(JobConflict, KeyError):
                service.queue.cancel(job.id)
            raise HTTPException(
                504, f"not done within {timeout} s (limits.generate_timeout_s): use POST /v1/jobs"
            )
        if (
            job.state == "expired"
        ):  # the queue was busy for as long as the client would wait: as when it is full
            detail = "the job did not start before its deadline: the queue is busy, try again later"
            raise HTTPException(429, detail, headers={"Retry-After": str(service.queue.retry_after())})
        if job.state == "cancelled":
            raise HTTPException(409, "the job was cancelled")
        if job.state == "failed":
            if job.error and job.error.startswith("internal error"):
                raise HTTPException(500, job.error)
            _reject(("body",), job.error or "the job failed")
        main = next(image for image in job.result["images"] if image["role"] in MAIN_ROLES)
        data = await run_in_threadpool(service.store.path("images", main["id"]).read_bytes)
        headers = {"X-Job-Id": job.id, "Location": f"/v1/jobs/{job.id}"}
        return Response(data, media_type="image/png", headers=headers)

    # --- images and uploads -------------------------------------------------------------------------------------

    @v1.get(
        "/images/{image_id}",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}, "description": "the PNG"}, **NOT_FOUND},
        summary="A stored image",
    )
    async def get_image(image_id: Annotated[str, PathParam(pattern=ID_PATTERN)]) -> FileResponse:
        path = service.store.existing("images", image_id)
        if path is None:
            raise HTTPException(404, f"no image {image_id} here")
        headers = {"Cache-Control": "private, max-age=86400, immutable", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type="image/png", headers=headers)

    @v1.post(
        "/uploads",
        status_code=201,
        response_model=UploadView,
        responses={**BAD_BODY, **TOO_LARGE},
        max_body_size=limits.max_upload_bytes,
        summary="Upload a photo for img2img (PNG, JPEG or WebP; checked by decoding)",
    )
    async def upload(file: Annotated[UploadFile, File(description="the photo")]) -> UploadView:
        _plain_file_name(file.filename)
        data = await file.read()
        try:
            photo = await run_in_threadpool(decode_image, data, limits.max_upload_pixels, name="file")
        except ImageRejected as rejected:
            _reject(("body", "file"), str(rejected))
        upload_id = await run_in_threadpool(service.store.save_image, photo, "uploads")
        service.remember_upload(upload_id)
        return UploadView(id=upload_id, width=photo.width, height=photo.height)

    # --- what is here -------------------------------------------------------------------------------------------

    @v1.get(
        "/models",
        response_model=ModelsView,
        responses=NOT_READY,
        summary="The kinds, styles and limits offered",
    )
    async def models() -> ModelsView:
        if service.status == "loading":
            service.require_ready()
        kinds = {}
        for kind in service.offered_kinds():
            loaded = service.loaded[0].kinds[kind]
            kinds[kind] = {
                "styles": service.offered_styles(kind),
                "controlnets": controlnets if kind == "img2img" else [],
                "defaults": loaded.defaults(),
            }
        unavailable = {kind: why for loaded in service.loaded for kind, why in loaded.unavailable.items()}
        return ModelsView(
            kinds=kinds, unavailable=unavailable, devices=service.devices, limits=limits.model_dump()
        )

    app.include_router(v1)

    @app.get(
        "/health",
        response_model=HealthView,
        responses={503: {"model": HealthView, "description": "not ready"}},
    )
    async def health(response: Response) -> HealthView:
        if service.status != "ready":
            response.status_code = 503
        detail = service.no_models_detail() if service.status == "no models" else None
        return HealthView(
            status=service.status, detail=detail, kinds=service.offered_kinds(), queue=service.queue.stats()
        )

    # --- the page -----------------------------------------------------------------------------------------------

    page_headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", media_type="text/html", headers=page_headers)

    @app.get("/page/page.js", include_in_schema=False)
    async def page_script() -> FileResponse:
        return FileResponse(PAGE / "page.js", media_type="text/javascript", headers=page_headers)

    @app.get("/page/page.css", include_in_schema=False)
    async def page_style() -> FileResponse:
        return FileResponse(PAGE / "page.css", media_type="text/css", headers=page_headers)

    @app.exception_handler(InvalidId)
    async def invalid_id(request: Request, error: InvalidId) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "X-API-Key", "X-Request-ID", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "X-Job-Id", "X-Request-ID"],
        )
    upload_limit = (limits.max_upload_bytes, "limits.max_upload_bytes")
    app.add_middleware(
        DeclaredBodyLimit,
        limits={"/v1/uploads": upload_limit},
        default=(limits.max_body_bytes, "limits.max_body_bytes"),
    )
    app.add_middleware(RequestLog)
    return app
