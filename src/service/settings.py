"""The service's settings (``configs/serve.yaml``), checked once at start so that a mistake names its key.

Each kind's section holds the keyword arguments of its loader in :mod:`src.pipelines.loading` as they are
(``txt2img``: :func:`load_text_to_image`, ``img2img``: :func:`load_photo_maker` with ControlNets by name,
``panel``: :func:`load_panel_maker`, ``story``: :func:`load_story_maker` on the panel models), plus ``hint``:
what to run when its models are missing. A section set to null is a kind not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["KINDS", "Limits", "ServiceSettings", "StyleSettings", "service_settings"]

KINDS = ("txt2img", "img2img", "panel", "story")


class Limits(BaseModel):
    """Bounds on requests, the queue and what is kept; every request field is checked against them."""

    model_config = ConfigDict(extra="forbid")

    queue_size: int = Field(16, ge=1)  # jobs waiting (running ones not counted); past it: 429
    queue_deadline_s: float = Field(600.0, gt=0)  # a job not started by then expires
    generate_timeout_s: float = Field(60.0, gt=0)  # POST /v1/generate gives up (504) after this
    max_body_bytes: int = Field(65536, ge=1024)  # JSON requests; past it: 413
    max_upload_bytes: int = Field(10 * 2**20, ge=1024)  # a photo upload (multipart)
    max_upload_pixels: int = Field(2048 * 2048, ge=64)  # decoded size of an upload
    max_text_chars: int = Field(500, ge=1)  # a prompt, a treatment, one sentence of a story
    max_story_sentences: int = Field(4, ge=2)
    max_steps: int = Field(50, ge=1)
    max_images: int = Field(4, ge=1)  # images (or panels) per job
    min_size: int = Field(64, ge=8, multiple_of=8)  # a job's `size`: the shorter side, in pixels
    max_size: int = Field(1024, ge=8, multiple_of=8)
    keep_jobs: int = Field(1000, ge=1)  # finished jobs remembered; older ones are forgotten with their files
    keep_uploads: int = Field(200, ge=1)  # uploaded photos kept; older ones are deleted

    @model_validator(mode="after")
    def _sizes_in_order(self) -> Limits:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size={self.min_size} is above max_size={self.max_size}")
        return self


class StyleSettings(BaseModel):
    """A style: a fine-tuning export (LoRA, textual inversion, hypernetwork, ...) loaded into a kind's model."""

    model_config = ConfigDict(extra="forbid")

    weights: str
    method: str | None = None  # for files without finetune.json (a kohya LoRA, a WebUI embedding)
    multiplier: float = 1.0


class ServiceSettings(BaseModel):
    """Everything ``serve.py`` reads; see ``configs/serve.yaml`` for each key."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    devices: list[str] = Field(default_factory=lambda: ["auto"], min_length=1)
    output_root: str = "outputs/service"
    api_key: str | None = None
    cors_origins: list[str] = Field(default_factory=list)
    log_level: str = "info"
    limits: Limits = Field(default_factory=Limits)
    styles: dict[str, StyleSettings] = Field(default_factory=dict)
    txt2img: dict[str, Any] | None = None
    img2img: dict[str, Any] | None = None
    panel: dict[str, Any] | None = None
    story: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _names_are_plain(self) -> ServiceSettings:
        names = {
            "styles": list(self.styles),
            "img2img.controlnets": list((self.img2img or {}).get("controlnets") or {}),
        }
        for setting, values in names.items():
            for name in values:  # names travel in requests and URLs of the page: keep them plain words
                if not (
                    name.replace("_", "").replace("-", "").isalnum() and name.isascii() and len(name) <= 40
                ):
                    raise ValueError(
                        f"{setting}: name {name!r} must be letters, digits, '_' or '-' (40 at most)"
                    )
        if "none" in self.styles:
            raise ValueError("styles: 'none' is the model without a style; give the style another name")
        return self

    def kind(self, name: str) -> dict[str, Any] | None:
        """A kind's section without its hint (null: the kind is not offered)."""
        section = getattr(self, name)
        return None if section is None else {k: v for k, v in section.items() if k != "hint"}

    def hint(self, name: str) -> str | None:
        return (getattr(self, name) or {}).get("hint")


def service_settings(config: Mapping[str, Any]) -> ServiceSettings:
    """Settings from a plain mapping (a resolved Hydra config); a ValueError naming each wrong key otherwise."""
    try:
        return ServiceSettings.model_validate(dict(config))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'config'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise ValueError(f"configs/serve.yaml: {problems}") from None
