"""benchmark.py's panel and story-strip benchmarks as users run them, in miniature: the demo's, and the thesis'
on COCO with its models swapped for tiny local copies (the way a user with local weights points at them)."""

from __future__ import annotations

import json

import pytest
from hydra_runs import compose_plain, execute_notebook
from test_panels import models  # noqa: F401  (the tiny CLIP, index and depth model, a module fixture)

# the Inception's settings replaced, not merged into
SMALL_EXTRACTOR = (
    "~feature_extractor",
    "+feature_extractor={_target_: src.demo.feature_extractor.SmallFeatureExtractor, image_size: 32}",
)


def miniature(name: str, models, tmp_path, *extra: str):  # noqa: F811
    return compose_plain(
        "benchmark.yaml",
        [
            f"benchmark={name}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"clip={models['clip']}",
            f"index={models['index']}",
            f"depth_model={models['depth']}",
            "device=cpu",
            "panel.num_inference_steps=2",
            *extra,
        ],
    )


def test_panels_demo_measures_layout_and_attributes_in_both_languages(models, tmp_path):  # noqa: F811
    from benchmark import benchmark

    out = benchmark(miniature("panels_demo", models, tmp_path, "cases.num_cases=3", "builders.dataset=null"))
    summary = json.loads((out / "panels.json").read_text())["summary"]
    for column in ("en/depth", "en/no_depth", "ko/depth", "ko/no_depth"):
        scores = summary[column]
        assert 0 <= scores["layout_iou"] <= 1 and 0 <= scores["colour_match"] <= 1
        assert {"background_match", "seconds_per_panel"} <= set(scores)
    assert summary["chance"] == {"colour": 1 / 8, "background": 1 / 5}
    table = (out / "panels.md").read_text()
    assert "ko without depth" in table and "| layout_iou |" in table
    assert (out / "panels_ko.png").is_file() and (out / "panels_en.png").is_file()


@pytest.mark.parametrize("name", ["stories_demo", "stories_coco"])
def test_story_benchmarks_compare_the_consistency_options(name, models, tmp_path):  # noqa: F811
    from benchmark import benchmark
    from src.demo.stories import write_synthetic_stories

    extra = [f"judge={models['clip']}", "num_stories=2", "strip.panel_width=64"]
    if name == "stories_coco":  # its stories file, judge and Inception swapped for local tiny ones
        stories = write_synthetic_stories(tmp_path / "coco", num_stories=2)
        extra += [f"stories={stories}", *SMALL_EXTRACTOR]
    else:
        extra += ["builders.dataset=null", "builders.judge=null"]
    out = benchmark(miniature(name, models, tmp_path, *extra))
    summary = json.loads((out / "strips.json").read_text())
    assert set(summary) == {"none", "shared_attention"}
    for scores in summary.values():
        assert -1 <= scores["consistency"] <= 1 and 0 <= scores["faithfulness"] <= 1
        assert scores["inception_score"] >= 1 and scores["seconds_per_strip"] > 0
        assert len(scores["per_story"]["consistency"]) == 2
    table = (out / "strips.md").read_text()
    assert ("7.14" in table) == (name == "stories_coco")  # the thesis' IS only beside its own setting
    assert (out / "strip_shared_attention_0.png").is_file()
    if name == "stories_demo":
        execute_notebook("story_strips", out)
