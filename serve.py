"""Serve webtoon generation over HTTP: the REST API and its page (src/service/, configs/serve.yaml).

    python serve.py                                   # the offline demo models under data/ (the kinds that exist)
    python serve.py port=8080 api_key=SECRET limits.queue_size=32
    python serve.py devices='[cuda]' txt2img.base_model=stable-diffusion-v1-5/stable-diffusion-v1-5
    SERVE_OVERRIDES="port=8080" uvicorn --factory serve:app_factory --port 8080   # uvicorn's own options

Then http://127.0.0.1:8000/ (the page) and /docs (the API). Run one process: the queue lives in its memory and is
lost on restart (``uvicorn --workers`` would split it into queues that know nothing of each other).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from src.utils.cli import one_line_errors

if TYPE_CHECKING:
    from fastapi import FastAPI

CONFIGS = Path(__file__).resolve().parent / "configs"


def service_app(cfg: DictConfig) -> FastAPI:
    """The application for a composed ``serve`` config; its models load when it starts."""
    from src.service.app import create_app
    from src.service.settings import service_settings

    return create_app(service_settings(OmegaConf.to_container(cfg, resolve=True)))


def serve(cfg: DictConfig) -> None:
    """Build the app and run it under uvicorn until interrupted."""
    import uvicorn

    app = service_app(cfg)
    # access_log off: the service logs every request itself, with its request id and time
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


def app_factory() -> FastAPI:
    """For ``uvicorn --factory serve:app_factory``: configs/serve.yaml with the Hydra overrides in
    ``$SERVE_OVERRIDES`` (host and port are uvicorn's own options then)."""
    from hydra import compose, initialize_config_dir

    overrides = shlex.split(os.environ.get("SERVE_OVERRIDES", ""))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=overrides)
    return service_app(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="serve")
@one_line_errors
def main(cfg: DictConfig) -> None:
    """Command-line entry point (see the module docstring)."""
    serve(cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
