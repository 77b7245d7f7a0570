"""The REST service and its page: generation jobs of four kinds on a bounded queue, one worker per device.

- :mod:`~src.service.settings` — what ``configs/serve.yaml`` holds (models, styles, limits), checked on start.
- :mod:`~src.service.models` — every offered kind loaded through :mod:`src.pipelines.loading`, once per device.
- :mod:`~src.service.schemas` — the requests (every field bounded) and the answers, as OpenAPI declares them.
- :mod:`~src.service.jobs` — the bounded in-memory queue, its workers, progress, cancel and expiry.
- :mod:`~src.service.storage` — the one output root: files named by random ids, never by request text.
- :mod:`~src.service.app` — the FastAPI application (``create_app``) and the page under ``page/``.

``serve.py`` starts it; the queue lives in memory and is lost on restart (stored images and manifests stay).
"""
