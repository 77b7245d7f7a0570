"""Panels and story strips measured: does a panel keep its retrieved image's layout and follow its treatment,
and do a story's panels hold one style while each follows its sentence?

Panels (thesis ch. V): every treatment, in English and in Korean, is drawn twice — with the depth map, and with
the depth channel cut (the same model as plain image-to-image) — and judged by a :class:`PanelJudge` that is not
the generator: layout as the IoU of the panel's foreground with the retrieved image's, and each attribute the
treatment names (e.g. colour, background) against the judge's chance level.

Story strips: each consistency option draws the same stories from the same seed and is judged by a CLIP that is
not the generator: consistency as the mean pairwise CLIP-I between a strip's panels (StoryDiffusion,
ConsiStory), faithfulness as the mean CLIP-T of each panel to its sentence (torchmetrics' CLIP score / 100), the
Inception score over all panels (the thesis' metric; any extractor with the Inception interface), and seconds
per strip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from src.metrics.consistency import mean_pairwise_cosine
from src.metrics.image_quality import SeededInceptionScore
from src.utils.image_grid import captioned_grid, save_grid, to_pil

__all__ = [
    "PanelJudge",
    "TreatmentCase",
    "foreground_iou",
    "measure_panels",
    "measure_strips",
]

log = logging.getLogger(__name__)
LANGUAGES = ("en", "ko")


@dataclass(frozen=True)
class TreatmentCase:
    """One treatment in both languages and what a faithful panel shows (attribute -> value)."""

    english: str
    korean: str
    expected: Mapping[str, str]

    def text(self, language: str) -> str:
        return self.english if language == "en" else self.korean


class PanelJudge(Protocol):
    """Judges panels by their pixels (the offline demo's judge knows its backgrounds and colours)."""

    chance: Mapping[str, float]  # attribute -> the share a random drawing would match

    def foreground(self, image: Image.Image) -> np.ndarray: ...  # bool [H, W]

    def attributes(self, image: Image.Image) -> dict[str, str]: ...


def foreground_iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 1.0


# --- panels -----------------------------------------------------------------------------------------------------


def measure_panels(
    panel_maker: Any,
    cases: Sequence[TreatmentCase],
    judge: PanelJudge,
    out_dir: str | os.PathLike,
    seed: int = 0,
    grid_rows: int = 8,
) -> dict[str, Any]:
    """Draw every case in both languages with and without depth; write ``panels.json``, ``panels.md`` and
    ``panels_<language>.png`` into ``out_dir``; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = panel_maker.settings
    summary: dict[str, Any] = {
        "cases": len(cases),
        "chance": dict(judge.chance),
        "settings": settings.__dict__,
    }
    rows: list[dict[str, Any]] = []
    try:
        for language in LANGUAGES:
            texts = [case.text(language) for case in cases]
            drawn = {}
            for use_depth in (True, False):
                panel_maker.settings = dataclasses.replace(settings, use_depth=use_depth, top_k=1)
                started = time.perf_counter()
                drawn[use_depth] = [found[0] for found in panel_maker(texts, seed)]
                seconds = (time.perf_counter() - started) / len(texts)
                scores = [
                    judge_panel(panel, case, judge, panel_maker)
                    for panel, case in zip(drawn[use_depth], cases, strict=True)
                ]
                rows += [{"language": language, "depth": use_depth, **s} for s in scores]
                summary[f"{language}/{'depth' if use_depth else 'no_depth'}"] = {
                    **average(scores),
                    "seconds_per_panel": seconds,
                }
            panel_grid(drawn, cases[:grid_rows], language, panel_maker, out_dir / f"panels_{language}.png")
    finally:
        panel_maker.settings = settings
    (out_dir / "panels.json").write_text(
        json.dumps({"summary": summary, "panels": rows}, indent=1, ensure_ascii=False)
    )
    (out_dir / "panels.md").write_text(panels_markdown(summary))
    return summary


def judge_panel(panel: Any, case: TreatmentCase, judge: PanelJudge, panel_maker: Any) -> dict[str, Any]:
    picture = to_pil(panel.image)
    retrieved = panel_maker.index.image(panel.hit.row).resize(picture.size, Image.Resampling.BILINEAR)
    found = judge.attributes(picture)
    return {
        "treatment": panel.treatment,
        "retrieved": panel.hit.key,
        "sd_prompt": panel.sd_prompt,
        "layout_iou": foreground_iou(judge.foreground(picture), judge.foreground(retrieved)),
        **{f"{name}_match": float(found.get(name) == value) for name, value in case.expected.items()},
    }


def average(scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    names = [k for k, v in scores[0].items() if isinstance(v, float)]
    return {name: float(np.mean([s[name] for s in scores])) for name in names}


def panels_markdown(summary: Mapping[str, Any]) -> str:
    columns = [(language, depth) for language in LANGUAGES for depth in ("depth", "no_depth")]
    metrics = [k for k in summary[f"{LANGUAGES[0]}/depth"] if k != "seconds_per_panel"]
    header = "| metric | " + " | ".join(
        f"{lang} {'with depth' if d == 'depth' else 'without depth'}" for lang, d in columns
    )
    lines = [
        "# Panels: retrieval-guided depth-to-image",
        "",
        f"{summary['cases']} treatments in each language. Layout: IoU of the panel's foreground with the retrieved "
        "image's. Without depth: the same model with its depth channel cut (plain image-to-image).",
        "",
        header + " | chance |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for metric in [*metrics, "seconds_per_panel"]:
        chance = summary["chance"].get(metric.removesuffix("_match"), "")
        cells = [f"{summary[f'{lang}/{d}'][metric]:.3f}" for lang, d in columns]
        lines.append(
            f"| {metric} | " + " | ".join(cells) + f" | {chance if chance == '' else f'{chance:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def panel_grid(
    drawn: Mapping[bool, Sequence[Any]],
    cases: Sequence[TreatmentCase],
    language: str,
    panel_maker: Any,
    path: Path,
) -> Path:
    """Rows = treatments (printed), columns = retrieved image | panel with depth | panel without depth."""
    rows = []
    for i, _ in enumerate(cases):
        with_depth, without = drawn[True][i], drawn[False][i]
        rows.append([panel_maker.index.image(with_depth.hit.row), with_depth.image, without.image])
    captions = [case.text(language) for case in cases]
    grid = captioned_grid(
        rows, captions, ["retrieved", "panel (depth)", "panel (no depth)"], cell_size=128, caption_width=300
    )
    return save_grid(grid, path)


# --- story strips ---------------------------------------------------------------------------------------------


def measure_strips(
    story_makers: Mapping[str, Any],
    stories: Sequence[Sequence[str]],
    clip_judge: Any,
    feature_extractor: torch.nn.Module,
    out_dir: str | os.PathLike,
    seed: int = 0,
    keep_strips: int = 4,
) -> dict[str, Any]:
    """Each option draws every story from ``seed``; ``strips.json`` / ``strips.md`` and the first
    ``keep_strips`` strips of each option (``strip_<option>_<i>.png``) go to ``out_dir``."""
    from src.metrics.image_quality import FeatureOutput

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for option, maker in story_makers.items():
        started = time.perf_counter()
        strips = maker(stories, seed)
        seconds = (time.perf_counter() - started) / len(stories)
        inception = SeededInceptionScore(FeatureOutput(feature_extractor, "logits"), seed=seed)
        consistency, faithfulness = [], []
        for number, strip in enumerate(strips):
            images = torch.stack([panel.image for panel in strip.panels])
            consistency.append(mean_pairwise_cosine(clip_judge.image_embeddings(images)))
            faithfulness.append(float(clip_judge(images, strip.sentences).per_pair.mean()) / 100)
            inception.update((images * 255).round().to(torch.uint8))
            if number < keep_strips:
                strip.image.save(out_dir / f"strip_{option}_{number}.png")
        score, spread = inception.compute()
        summary[option] = {
            "consistency": float(np.mean(consistency)),
            "faithfulness": float(np.mean(faithfulness)),
            "inception_score": float(score),
            "inception_score_std": float(spread),
            "seconds_per_strip": seconds,
            "per_story": {"consistency": consistency, "faithfulness": faithfulness},
        }
        log.info("%s: %s", option, {k: v for k, v in summary[option].items() if k != "per_story"})
    (out_dir / "strips.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "strips.md").write_text(strips_markdown(summary, len(stories), clip_judge.name))
    return summary


def strips_markdown(summary: Mapping[str, Any], num_stories: int, judge: str) -> str:
    lines = [
        "# Story strips: style consistency across panels",
        "",
        f"{num_stories} stories, every panel from the same seed. Consistency: mean pairwise CLIP-I between a "
        f"strip's panels; faithfulness: mean CLIP-T of each panel to its sentence; judged by {judge}.",
        "",
        "| option | consistency | faithfulness | Inception score | seconds per strip |",
        "|---|---|---|---|---|",
    ]
    for option, scores in summary.items():
        lines.append(
            f"| {option} | {scores['consistency']:.3f} | {scores['faithfulness']:.3f} | "
            f"{scores['inception_score']:.2f} ± {scores['inception_score_std']:.2f} | {scores['seconds_per_strip']:.1f} |"
        )
    return "\n".join(lines) + "\n"
