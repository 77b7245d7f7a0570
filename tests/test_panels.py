"""Treatments -> panels -> story strips, as users run them, on tiny local models (no hub).

The CLIP, the image index and the depth-to-image model are built tiny from configs and saved as the real ones are
(a transformers CLIP export, ``prepare_data.py source=index`` output, a ``StableDiffusionDepth2ImgPipeline``
directory); the code under test loads them by path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra_runs import compose_plain
from PIL import Image
from test_retrieval_index import tiny_clip
from test_sd_depth import DEPTH_ESTIMATOR
from tiny_sd import build_tiny_stable_diffusion

STEPS = {"num_inference_steps": 3, "guidance_scale": 4.0}
STORY = [
    "A small red circle on the left side of a white background.",
    "Then the small red circle moves to the top right corner of the white background.",
    "Next the red circle grows large in the top right corner of the white background.",
    "Finally the large circle turns blue in the top right corner of the white background.",
]


@pytest.fixture(scope="module")
def models(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    from src.modules.diffusion.depth_to_image import DepthToImageFineTune
    from src.retrieval.encoder import CLIPEncoder
    from src.retrieval.index import build_image_index

    out = tmp_path_factory.mktemp("panel_models")
    tiny_clip(synthetic_dir / "tokenizer", seed=0).export(out / "clip")
    build_image_index(
        str(synthetic_dir / "train-*.tar"), CLIPEncoder.load(out / "clip"), out / "index", progress=False
    )
    base = build_tiny_stable_diffusion(out / "base")
    torch.manual_seed(0)
    depth = DepthToImageFineTune(base, depth_estimator=DEPTH_ESTIMATOR, image_size=32)
    with torch.no_grad():  # a depth channel that matters, so that cutting it changes the panels
        depth.unet.conv_in.weight[:, 4:].normal_(0, 0.3)
    depth.export(out / "depth")
    return {"clip": out / "clip", "index": out / "index", "depth": out / "depth", "base": base}


def panel_maker(models, **settings):
    from src.pipelines.loading import load_panel_maker

    return load_panel_maker(
        models["clip"], models["index"], str(models["depth"]), device="cpu", **{**STEPS, **settings}
    )


def test_a_korean_treatment_is_drawn_from_the_retrieved_images_english_caption(models):
    maker = panel_maker(models, top_k=2)
    treatments = ["큰 빨간 원이 흰색 배경의 가운데에 있다.", "a small teal heart"]
    panels = maker(treatments, seed=3)
    assert [len(row) for row in panels] == [2, 2]
    hits = maker.index.search_texts(maker.encoder, treatments, top_k=2)
    korean, english = panels[0][0], panels[1][1]
    assert [p.hit for p in panels[0]] == hits[0] and [p.seed for p in panels[0]] == [3, 4]
    first_caption = maker.index.rows[korean.hit.row].captions_en[0]
    assert korean.language == "ko" and korean.sd_prompt == f"{first_caption.rstrip(' .')}, webtoon"
    assert (
        "first English caption" in korean.prompt_from
        and korean.record()["retrieved"]["key"] == korean.hit.key
    )
    assert english.language == "en" and english.sd_prompt == "a small teal heart, webtoon"
    assert english.prompt_from == "treatment"
    assert korean.image.shape == (3, 32, 32) and korean.image.min() >= 0 and korean.image.max() <= 1

    joined = panel_maker(models, korean_prompt="all_captions", style_keyword="")
    panel = joined(treatments[:1])[0][0]
    assert panel.sd_prompt == " ".join(joined.index.rows[panel.hit.row].captions_en)
    translated = panel_maker(models, korean_prompt="translation")
    assert translated(treatments[:1], translations=["a big red circle"])[0][0].sd_prompt.startswith(
        "a big red"
    )
    with pytest.raises(ValueError, match="needs a translation"):
        translated(treatments[:1])


def test_without_depth_a_panel_is_image_to_image_of_the_same_model(models):
    """use_depth=false cuts the depth channel: what remains is plain img2img with the model's other weights."""
    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    maker = panel_maker(models, use_depth=False)
    before = maker.diffusers_pipeline.unet.conv_in.weight.detach().clone()
    panel = maker(["a small teal heart"], seed=1)[0][0]
    assert torch.equal(maker.diffusers_pipeline.unet.conv_in.weight, before)  # the cut is undone afterwards

    depth_unet = maker.diffusers_pipeline.unet
    unet = UNet2DConditionModel.from_config({**depth_unet.config, "in_channels": 4})
    state = depth_unet.state_dict()
    state["conv_in.weight"] = state["conv_in.weight"][:, :4]
    unet.load_state_dict(state)
    parts = {
        k: v
        for k, v in maker.diffusers_pipeline.components.items()
        if k in ("vae", "text_encoder", "tokenizer", "scheduler")
    }
    img2img = StableDiffusionImg2ImgPipeline(
        **parts, unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    expected = img2img(
        panel.sd_prompt,
        image=maker.reference(panel.hit),
        strength=maker.settings.strength,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
        **STEPS,
    ).images[0]
    torch.testing.assert_close(panel.image, expected, atol=1e-5, rtol=0)
    with_depth = panel_maker(models)(["a small teal heart"], seed=1)[0][0]
    assert (with_depth.image - panel.image).abs().max() > 1e-3


def test_shared_attention_keeps_the_first_panel_and_draws_the_others_alike(models):
    from src.pipelines.loading import load_story_maker
    from src.pipelines.strip import strip_layout

    maker = panel_maker(models)
    plain = load_story_maker(maker, "none", panel_width=64)([STORY], seed=0)[0]
    shared = load_story_maker(maker, "shared_attention", panel_width=64)([STORY], seed=0)[0]
    torch.testing.assert_close(shared.panels[0].image, plain.panels[0].image, atol=1e-4, rtol=0)
    assert all(
        (s.image - p.image).abs().max() > 1e-4
        for s, p in zip(shared.panels[1:], plain.panels[1:], strict=True)
    )
    # sharing every block with AdaIN (StyleAligned's full setting) draws other panels than the up blocks alone
    everywhere = load_story_maker(
        maker,
        "shared_attention",
        panel_width=64,
        shared_blocks=["down_blocks", "mid_block", "up_blocks"],
        adain=True,
    )
    assert everywhere.describe()["shared_attention"] == {
        "blocks": ["down_blocks", "mid_block", "up_blocks"],
        "adain": True,
    }
    widely = everywhere([STORY], seed=0)[0]
    torch.testing.assert_close(widely.panels[0].image, plain.panels[0].image, atol=1e-4, rtol=0)
    assert (widely.panels[1].image - shared.panels[1].image).abs().max() > 1e-4
    again = load_story_maker(maker, "none", panel_width=64)([STORY], seed=0)[0]
    assert all(torch.equal(a.image, p.image) for a, p in zip(again.panels, plain.panels, strict=True))
    assert [p.seed for p in plain.panels] == [0] * 4  # the thesis' shared seed
    layout = strip_layout([(32, 32)] * 4, STORY, width=64)
    assert plain.image.size == layout.size


def test_style_lora_consistency_needs_weights(models):
    from src.pipelines.loading import load_story_maker

    with pytest.raises(ValueError, match="consistency=lora needs weights"):
        load_story_maker(panel_maker(models), "lora")


def generate(models, out: Path, *overrides: str) -> dict:
    from generate import generate_from_config

    cfg = compose_plain(
        "generate.yaml",
        [
            f"clip={models['clip']}",
            f"index={models['index']}",
            f"depth_model={models['depth']}",
            "panel.num_inference_steps=3",
            "panel.guidance_scale=4.0",
            "strip.panel_width=64",
            "device=cpu",
            f"out_dir={out}",
            *overrides,
        ],
    )
    return generate_from_config(cfg)


def same_pixels(first: Path, second: Path) -> bool:
    return bool((np.asarray(Image.open(first)) == np.asarray(Image.open(second))).all())


def test_generate_panels_and_strips_and_redraw_them_from_the_manifest(models, tmp_path, synthetic_dir):
    from src.demo.stories import write_synthetic_stories

    treatments = json.dumps(["큰 빨간 원", "../../etc/passwd a small teal heart"], ensure_ascii=False)
    manifest = generate(models, tmp_path / "panels", "mode=panel", f"treatments={treatments}")
    files = sorted(p.name for p in (tmp_path / "panels").iterdir())
    assert files == [
        "manifest.json",
        "panel_000_0.png",
        "panel_001_0.png",
        "retrieved_000_0.png",
        "retrieved_001_0.png",
    ]
    first = manifest["panels"][0]
    assert first["language"] == "ko" and first["sd_prompt"].endswith(", webtoon") and "retrieved" in first
    assert manifest["settings"]["depth_model"] == str(models["depth"])
    generate(models, tmp_path / "again", f"manifest={tmp_path / 'panels' / 'manifest.json'}")
    assert same_pixels(tmp_path / "panels" / "panel_001_0.png", tmp_path / "again" / "panel_001_0.png")

    story = json.dumps(STORY)
    manifest = generate(
        models, tmp_path / "strip", "mode=story", f"story={story}", "consistency=shared_attention"
    )
    assert manifest["strips"][0]["panel_files"] == [f"story_000_panel_{p}.png" for p in range(4)]
    assert (tmp_path / "strip" / "story_000.png").is_file()
    generate(models, tmp_path / "strip_again", f"manifest={tmp_path / 'strip' / 'manifest.json'}")
    for name in ("story_000.png", "story_000_panel_3.png"):
        assert same_pixels(tmp_path / "strip" / name, tmp_path / "strip_again" / name)

    # prepare_data.py source=stories output is read as it is: Korean stories of the generated dataset
    stories = write_synthetic_stories(tmp_path / "stories", num_stories=3)
    manifest = generate(
        models, tmp_path / "korean", "mode=story", f"stories={stories}", "language=ko", "num_stories=2"
    )
    assert len(manifest["strips"]) == 2 and all(
        p["language"] == "ko" for p in manifest["strips"][0]["panels"]
    )


def test_missing_models_name_their_setting(models, tmp_path, user_error):
    from generate import main

    base = [
        f"clip={models['clip']}",
        f"index={models['index']}",
        f"depth_model={models['depth']}",
        "device=cpu",
    ]
    cases = {
        "index": ("`index`", [f"index={tmp_path / 'no_index'}"]),
        "depth_model": ("`depth_model`", [f"depth_model={tmp_path / 'no_depth'}"]),
        "clip": ("`clip`", [f"clip={tmp_path / 'no_clip.ckpt'}"]),
    }
    for pattern, wrong in cases.values():
        cfg = compose_plain(
            "generate.yaml",
            [*base, *wrong, "mode=panel", 'treatments=["a red circle"]', f"out_dir={tmp_path}"],
        )
        with user_error(pattern):
            main(cfg)


def test_korean_encoder_gives_the_korean_treatment_itself_to_a_text_encoder_that_reads_it(
    models, tmp_path, tiny_towers, user_error
):
    from transformers import AltCLIPTextModel

    from generate import main
    from src.modules.diffusion.korean_text_encoder import KoreanTextEncoderDistillation

    reader = KoreanTextEncoderDistillation(str(models["base"]), student_name_or_path=str(tiny_towers["bert"]))
    export = reader.export(tmp_path / "korean")
    maker = panel_maker(models, korean="encoder", korean_text_encoder=export)
    assert isinstance(maker.diffusers_pipeline.text_encoder, AltCLIPTextModel)
    assert maker.describe()["korean_text_encoder"] == str(export)

    treatments = json.dumps(["큰 빨간 원", "a small teal heart"], ensure_ascii=False)
    overrides = ["mode=panel", f"treatments={treatments}", "korean=encoder", f"korean_text_encoder={export}"]
    manifest = generate(models, tmp_path / "panels", *overrides)
    korean, english = (row for row in manifest["panels"])
    assert korean["sd_prompt"] == "큰 빨간 원, webtoon" and "Korean text encoder" in korean["prompt_from"]
    assert english["sd_prompt"] == "a small teal heart, webtoon" and english["prompt_from"] == "treatment"
    assert manifest["config"]["korean_text_encoder"] == str(export)
    generate(models, tmp_path / "again", f"manifest={tmp_path / 'panels' / 'manifest.json'}")
    assert same_pixels(tmp_path / "panels" / "panel_000_0.png", tmp_path / "again" / "panel_000_0.png")

    base = [
        f"clip={models['clip']}",
        f"index={models['index']}",
        f"depth_model={models['depth']}",
        "device=cpu",
    ]
    cfg = compose_plain("generate.yaml", [*base, "mode=panel", "treatments='큰 빨간 원'", "korean=encoder"])
    with user_error("korean_text_encoder"):
        main(cfg)
