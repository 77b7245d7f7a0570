"""A photo -> a webtoon image: img2img + ControlNets + a style LoRA, on tiny local models (no hub).

The ControlNets are built from the tiny UNet with ``ControlNetModel.from_unet`` and saved with
``save_pretrained``, the style LoRA is an export of the project's LoRA module, the detectors' weights are files
written in their published layout: the code under test loads all of them by path, as a user with local copies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra_runs import compose_plain
from PIL import Image, ImageDraw
from tiny_sd import build_tiny_stable_diffusion

STEPS = {"num_inference_steps": 3, "guidance_scale": 4.0}
PROMPT = "a red house in the fire"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from src.modules.diffusion.lora import LoRAFineTune

    out = tmp_path_factory.mktemp("photo_models")
    base = build_tiny_stable_diffusion(out / "base")
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.manual_seed(0)
    fresh = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    fresh.save_pretrained(out / "controlnet_fresh")
    for name, seed in (("controlnet_a", 1), ("controlnet_b", 2)):  # trained nets: zero convs no longer zero
        net = ControlNetModel.from_pretrained(out / "controlnet_fresh")
        torch.manual_seed(seed)
        with torch.no_grad():
            for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                block.weight.normal_(0, 0.5)
        net.save_pretrained(out / name)
    lora = LoRAFineTune(pretrained_model_name_or_path=str(base), rank=4)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in lora.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    lora.export(out / "lora")
    return {
        "base": base,
        "fresh": out / "controlnet_fresh",
        "a": out / "controlnet_a",
        "b": out / "controlnet_b",
        "lora": out / "lora",
    }


def photo(size: int = 40) -> Image.Image:
    """A 'photo': a red house on a sky, not square, so resizing keeps its aspect ratio."""
    image = Image.new("RGB", (size + 8, size), (150, 200, 240))
    draw = ImageDraw.Draw(image)
    draw.polygon([(8, 20), (24, 6), (40, 20)], fill=(200, 30, 30))
    draw.rectangle([12, 20, 36, 36], fill=(140, 90, 40))
    return image


def maker(tiny, controlnets, **settings):
    from src.pipelines.loading import load_photo_maker

    return load_photo_maker(controlnets, base_model=str(tiny["base"]), device="cpu", **{**STEPS, **settings})


def canny(net: Path, scale: float = 1.0) -> dict:
    return {"model": str(net), "detector": "canny", "scale": scale}


def draw(photo_maker, seed: int = 0) -> torch.Tensor:
    return photo_maker(photo(), PROMPT, num_images=2, seed=seed)[0]


def test_a_fresh_controlnet_changes_nothing_and_a_trained_one_steers(tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    fresh = maker(tiny, [canny(tiny["fresh"])])
    images = draw(fresh)
    assert images.shape == (2, 3, 32, 40)  # shorter side at the model's 32 px, aspect ratio kept
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(tiny["base"], safety_checker=None)
    expected = img2img(
        [PROMPT] * 2,
        image=fresh.prepare(photo()),
        strength=0.75,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="pt",
        **STEPS,
    ).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)

    steered = draw(maker(tiny, [canny(tiny["a"])]))
    stronger = draw(maker(tiny, [canny(tiny["a"], scale=2.0)]))
    assert (steered - images).abs().max() > 1e-3
    assert (stronger - images).abs().mean() > (steered - images).abs().mean()


def test_two_controlnets_with_scales_one_and_zero_draw_as_the_first_alone(tiny):
    first = draw(maker(tiny, [canny(tiny["a"])]))
    both = draw(maker(tiny, [canny(tiny["a"], 1.0), canny(tiny["b"], 0.0)]))
    torch.testing.assert_close(both, first, atol=1e-5, rtol=0)
    mixed = draw(maker(tiny, [canny(tiny["a"], 1.0), canny(tiny["b"], 1.0)]))
    assert (mixed - first).abs().max() > 1e-3


def test_a_style_lora_changes_the_image_and_unloads_cleanly(tiny):
    plain = maker(tiny, [canny(tiny["a"])])
    styled = maker(tiny, [canny(tiny["a"])], weights=tiny["lora"])
    assert styled.source["method"] == "lora"
    without, with_lora = draw(plain), draw(styled)
    assert (with_lora - without).abs().max() > 1e-3
    styled.diffusers_pipeline.unload_lora_weights()  # the LoRA lives in the shared UNet: unloading restores it
    torch.testing.assert_close(draw(styled), without, atol=1e-5, rtol=0)


def test_detectors_make_control_images_of_the_photos_size(tiny, tmp_path):
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    from src.pipelines.detectors import load_detector
    from src.utils.hub import MissingWeightsError

    edges = np.asarray(load_detector("canny")(photo(160)))
    assert edges.shape == (160, 168, 3) and edges.max() == 255 and (edges > 128).mean() < 0.2  # outlines only
    torch.manual_seed(0)
    torch.save(MobileV2_MLSD_Large().state_dict(), tmp_path / "mlsd_large_512_fp32.pth")
    lines = load_detector("mlsd", tmp_path)(photo(64))
    assert lines.size == (72, 64) and lines.mode == "RGB"
    with pytest.raises(
        MissingWeightsError, match="body_pose_model.pth.*`controlnets\\[0\\].detector_weights`"
    ):
        load_detector("openpose", tmp_path, setting="controlnets[0].detector_weights")
    with pytest.raises(ValueError, match="detector must be one of"):
        load_detector("segmentation")


def hydra_list(specs: list[dict]) -> str:
    """ControlNet specs in Hydra's override grammar, as a user types them: [{model: X, detector: canny}, ...]."""
    return (
        "[" + ", ".join("{" + ", ".join(f"{k}: '{v}'" for k, v in spec.items()) + "}" for spec in specs) + "]"
    )


def generate(tiny, out: Path, *overrides: str):
    from generate import generate_from_config

    nets = hydra_list(
        [
            canny(tiny["a"], 1.0),
            {"model": str(tiny["b"]), "image": str(out.parent / "edges.png"), "scale": 0.5},
        ]
    )
    cfg = compose_plain(
        "generate.yaml",
        [
            "mode=img2img",
            f"base_model={tiny['base']}",
            f"controlnets={nets}",
            f"prompt='{PROMPT}'",
            "img2img.num_inference_steps=3",
            "img2img.guidance_scale=4.0",
            "num_images=2",
            "device=cpu",
            f"out_dir={out}",
            *overrides,
        ],
    )
    return generate_from_config(cfg)


def test_generate_img2img_writes_the_controls_beside_the_images_and_redraws_from_the_manifest(tiny, tmp_path):
    photo().save(tmp_path / "photo.jpg")
    Image.new("RGB", (48, 40), "black").save(tmp_path / "edges.png")
    manifest = generate(tiny, tmp_path / "out", f"image={tmp_path / 'photo.jpg'}", f"weights={tiny['lora']}")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [
        "control_0.png",
        "control_1.png",
        "image_0.png",
        "image_1.png",
        "input.png",
        "manifest.json",
    ]
    assert [c["scale"] for c in manifest["settings"]["controlnets"]] == [1.0, 0.5]
    assert manifest["settings"]["method"] == "lora" and manifest["settings"]["seed"] == 0
    from generate import generate_from_config

    again = compose_plain(
        "generate.yaml", [f"manifest={tmp_path / 'out' / 'manifest.json'}", f"out_dir={tmp_path / 'again'}"]
    )
    generate_from_config(again)
    for name in ("image_1.png", "control_0.png"):
        assert (
            np.asarray(Image.open(tmp_path / "out" / name))
            == np.asarray(Image.open(tmp_path / "again" / name))
        ).all()


def test_an_unreadable_or_oversized_photo_is_refused_with_one_line(tiny, tmp_path, user_error):
    from generate import main

    (tmp_path / "photo.png").write_bytes(b"not an image at all")
    Image.new("RGB", (48, 40), "black").save(tmp_path / "edges.png")
    photo().save(tmp_path / "big.png")
    for name, pattern, extra in (
        ("photo.png", "image could not be decoded", []),
        ("big.png", "1920 pixels, more than the 1000 accepted", ["max_pixels=1000"]),
    ):
        nets = hydra_list([canny(tiny["a"])])
        cfg = compose_plain(
            "generate.yaml",
            [
                "mode=img2img",
                f"base_model={tiny['base']}",
                f"controlnets={nets}",
                f"prompt='{PROMPT}'",
                f"image={tmp_path / name}",
                f"out_dir={tmp_path / 'out'}",
                "device=cpu",
                *extra,
            ],
        )
        with user_error(pattern):
            main(cfg)
