"""The service's requests and answers, as OpenAPI declares them.

Every request field is bounded by the settings' :class:`~src.service.settings.Limits` (the request classes are
built for them, so ``/openapi.json`` shows the real bounds), unknown fields are refused, and names (kind, style,
ControlNet) are closed lists: a wrong one gets 422 naming the choices. Texts are prose — never part of a path —
checked for length and for control characters, which no prompt needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from src.service.settings import Limits
from src.service.storage import ID_PATTERN

__all__ = [
    "STATES",
    "HealthView",
    "ImageRef",
    "JobView",
    "ModelsView",
    "Problem",
    "Progress",
    "RequestModels",
    "UploadView",
    "request_models",
]

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


def _no_control_characters(text: str) -> str:
    if any(ord(c) < 32 and c not in "\t\n" or ord(c) == 127 for c in text):
        raise ValueError("must not hold control characters (a null byte, an escape, ...)")
    if not text.strip():
        raise ValueError("must not be blank")
    return text


@dataclass(frozen=True)
class RequestModels:
    """The request classes built for one set of limits and names."""

    union: Any  # the kinds' requests, one of which a body is (told apart by `kind`)
    kinds: dict[str, type[BaseModel]]


def request_models(limits: Limits, styles: Sequence[str], controlnets: Sequence[str]) -> RequestModels:
    """Request classes bounded by ``limits``; ``styles`` and ``controlnets`` are the configured names."""
    Text = Annotated[
        str,
        StringConstraints(min_length=1, max_length=limits.max_text_chars),
        AfterValidator(_no_control_characters),
    ]
    Style = Literal[("none", *styles)]  # type: ignore[valid-type]
    ControlNet = (
        Literal[tuple(controlnets)] if controlnets else Annotated[str, StringConstraints(max_length=0)]
    )
    Size = Annotated[int, Field(ge=limits.min_size, le=limits.max_size, multiple_of=8)]
    Count = Annotated[int, Field(ge=1, le=limits.max_images)]

    class Common(BaseModel):
        # strict: a request is valid exactly when its JSON schema says so (lax pydantic took `false` for a number)
        model_config = ConfigDict(extra="forbid", strict=True)

        seed: int = Field(0, ge=0, le=2**32 - 1, description="image j is drawn from the noise of seed + j")
        style: Style = Field(
            "none", description="a configured style (LoRA, embedding, ...); none: the model alone"
        )
        steps: int | None = Field(
            None, ge=1, le=limits.max_steps, description="denoising steps; null: the default"
        )
        guidance_scale: float | None = Field(None, ge=0, le=30)
        negative_prompt: Text | None = None
        deadline_s: float | None = Field(
            None,
            gt=0,
            le=limits.queue_deadline_s,
            description="the job expires unless it starts within this many seconds; null: the server's limit",
        )

    class TextToImageJob(Common):
        """Images from a prompt."""

        kind: Literal["txt2img"]
        prompt: Text
        num_images: Count = 1

    class PhotoJob(Common):
        """A photo (an upload's id) redrawn from a prompt, steered by ControlNets, in a style."""

        kind: Literal["img2img"]
        prompt: Text
        photo: Annotated[str, StringConstraints(pattern=ID_PATTERN)] = Field(
            description="the id POST /v1/uploads returned"
        )
        controlnets: dict[ControlNet, Annotated[float, Field(ge=0, le=2)]] | None = Field(  # type: ignore[valid-type]
            None,
            description="ControlNet name -> scale; the ones not named act at 0; null: the configured scales",
        )
        strength: float | None = Field(None, gt=0, le=1, description="how far the photo is noised")
        size: Size | None = Field(
            None, description="the photo's shorter side when redrawn; null: the model's own"
        )
        num_images: Count = 1

    class PanelJob(Common):
        """Webtoon panels from a treatment (English or Korean): retrieval, then depth-to-image."""

        kind: Literal["panel"]
        treatment: Text
        translation: Text | None = Field(
            None, description="English for a Korean treatment; else its retrieved caption"
        )
        strength: float | None = Field(None, gt=0, le=1)
        size: Size | None = None
        num_images: Count = Field(1, description="panels: one per retrieved image, best first")

    class StoryJob(Common):
        """A story of sentences -> one panel per sentence -> a vertical strip."""

        kind: Literal["story"]
        story: list[Text] = Field(min_length=2, max_length=limits.max_story_sentences)
        translations: list[Text] | None = Field(None, description="English for each sentence, when Korean")
        consistency: Literal["none", "shared_attention"] | None = Field(
            None, description="how the panels keep one look; null: the configured one"
        )
        strength: float | None = Field(None, gt=0, le=1)
        size: Size | None = None

    kinds = {"txt2img": TextToImageJob, "img2img": PhotoJob, "panel": PanelJob, "story": StoryJob}
    return RequestModels(union=TextToImageJob | PhotoJob | PanelJob | StoryJob, kinds=kinds)


# --- answers ----------------------------------------------------------------------------------------------------


class Problem(BaseModel):
    """What went wrong, in a sentence that says what to change."""

    detail: str


class Progress(BaseModel):
    done: int = Field(description="denoising steps done")
    total: int = Field(description="denoising steps in all (0 until the first step)")


class ImageRef(BaseModel):
    id: Id
    url: str
    role: str = Field(description="image, panel, strip, control, input or retrieved")


class JobView(BaseModel):
    """A job as it stands."""

    id: Id
    kind: str
    state: JobState
    url: str
    events_url: str
    created_at: float = Field(description="seconds since the epoch")
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = Field(None, description="1 = next to run; null once it left the queue")
    progress: Progress
    cancel_requested: bool = False
    images: list[ImageRef] = Field(default_factory=list)
    manifest: dict[str, Any] | None = Field(None, description="inputs, settings, seeds and model sources")
    error: str | None = None


class UploadView(BaseModel):
    id: Id
    width: int
    height: int


class QueueView(BaseModel):
    queued: int
    running: int
    capacity: int
    workers: int
    peak_queued: int = Field(description="the most jobs ever waiting at once")


class HealthView(BaseModel):
    status: Literal["loading", "ready", "no models"]
    detail: str | None = None
    kinds: list[str] = Field(default_factory=list)
    queue: QueueView | None = None


class KindView(BaseModel):
    styles: list[str]
    controlnets: list[str] = Field(default_factory=list)
    defaults: dict[str, Any] = Field(description="what a job gets for the fields it leaves out")


class ModelsView(BaseModel):
    kinds: dict[str, KindView] = Field(description="the kinds offered, by name")
    unavailable: dict[str, str] = Field(
        description="kinds not offered, and the setting that would turn each on"
    )
    devices: list[str]
    limits: dict[str, Any]
