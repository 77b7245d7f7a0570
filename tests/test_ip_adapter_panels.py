"""consistency=ip_adapter: story panels redrawn by image-to-image with an IP-Adapter (the depth-to-image pipeline has
no IP-Adapter loader), on a tiny adapter written in h94/IP-Adapter's layout for the tiny Stable Diffusion and
loaded by path, as a user loads a local copy of the hub files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from test_panels import STEPS, STORY, generate
from test_retrieval_index import tiny_clip
from test_sd_depth import DEPTH_ESTIMATOR
from tiny_sd import build_tiny_stable_diffusion

SUBFOLDER = "models"  # h94/IP-Adapter keeps the SD 1.5 adapters and their image encoder under models/
WEIGHT_NAME = "ip-adapter_sd15.safetensors"
IMAGE_TOKENS = 4  # the plain IP-Adapter projects one image embedding to 4 tokens of the cross-attention width


def write_ip_adapter(
    out_dir: Path, base_model: Path, seed: int = 0, projection_dim: int = 16, width: int | None = None
) -> Path:
    """A random IP-Adapter for ``base_model`` in h94/IP-Adapter's layout: ``models/image_encoder/`` (a
    ``CLIPVisionModelWithProjection``) and ``models/ip-adapter_sd15.safetensors`` with the original repository's
    keys: ``image_proj.{proj,norm}.*`` and ``ip_adapter.{k}.to_{k,v}_ip.weight`` for every cross-attention, ``k``
    its position in ``unet.attn_processors`` (the original trainer's ModuleList, whose self-attentions take the
    even numbers). ``width``: another text width than the base's, as an SDXL adapter has for SD 1.5."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(out_dir) / SUBFOLDER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=projection_dim,
            )
        )
    encoder.save_pretrained(folder / "image_encoder")

    unet = UNet2DConditionModel.from_pretrained(Path(base_model) / "unet")
    width = width or unet.config.cross_attention_dim
    noise = torch.Generator().manual_seed(seed)

    def random(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=noise) * std

    weights = {
        "image_proj.proj.weight": random(IMAGE_TOKENS * width, projection_dim, std=0.3),
        "image_proj.proj.bias": random(IMAGE_TOKENS * width, std=0.1),
        "image_proj.norm.weight": 1 + random(width, std=0.1),
        "image_proj.norm.bias": random(width, std=0.1),
    }
    for position, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            weights[f"ip_adapter.{position}.to_k_ip.weight"] = random(hidden, width, std=0.3)
            weights[f"ip_adapter.{position}.to_v_ip.weight"] = random(hidden, width, std=0.3)
    save_file(weights, folder / WEIGHT_NAME)
    return Path(out_dir)


@pytest.fixture(scope="module")
def models(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    """tests/test_panels.py's CLIP, index and depth-to-image model, with the base they grew from and an
    IP-Adapter for that base."""
    from src.modules.diffusion.depth_to_image import DepthToImageFineTune
    from src.retrieval.encoder import CLIPEncoder
    from src.retrieval.index import build_image_index

    out = tmp_path_factory.mktemp("ip_adapter_models")
    tiny_clip(synthetic_dir / "tokenizer", seed=0).export(out / "clip")
    build_image_index(
        str(synthetic_dir / "train-*.tar"), CLIPEncoder.load(out / "clip"), out / "index", progress=False
    )
    base = build_tiny_stable_diffusion(out / "base")
    torch.manual_seed(0)
    DepthToImageFineTune(base, depth_estimator=DEPTH_ESTIMATOR, image_size=32).export(out / "depth")
    adapter = write_ip_adapter(out / "ip_adapter", base)
    return {
        "clip": out / "clip",
        "index": out / "index",
        "depth": out / "depth",
        "base": base,
        "adapter": adapter,
    }


@pytest.fixture(scope="module")
def panel_maker(models):
    from src.pipelines.loading import load_panel_maker

    return load_panel_maker(models["clip"], models["index"], str(models["depth"]), device="cpu", **STEPS)


@pytest.fixture(scope="module")
def ip_panels(models):
    """The adapter loaded from the folder that holds it (no subfolder), its weight file by name."""
    from src.pipelines.loading import load_ip_adapter_panels

    return load_ip_adapter_panels(
        model=str(models["adapter"] / SUBFOLDER),
        base_model=str(models["base"]),
        subfolder="",
        weight_name=WEIGHT_NAME,
        device="cpu",
    )


@pytest.fixture(scope="module")
def story_inputs(panel_maker) -> tuple[list[str], list[Image.Image], list[int]]:
    """What a story strip hands the IP-Adapter: each sentence's prompt and retrieved image, the shared seed."""
    hits = [found[0] for found in panel_maker.retrieve(STORY, top_k=1)]
    prompts = [panel_maker.sd_prompt(sentence, hit)[0] for sentence, hit in zip(STORY, hits, strict=True)]
    return prompts, [panel_maker.reference(hit) for hit in hits], [0] * len(STORY)


def style_image(colour: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (48, 48), background)
    ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill=colour)
    return image


RED_ON_WHITE = style_image((220, 30, 30), (255, 255, 255))
YELLOW_ON_BLACK = style_image((240, 220, 20), (0, 0, 0))


@pytest.fixture(scope="module")
def red_panels(ip_panels, panel_maker, story_inputs) -> torch.Tensor:
    """The story's 4 panels drawn in one batch with the red style image as reference, at scale 0.6."""
    from src.pipelines.story import IPAdapterPanels

    return IPAdapterPanels(ip_panels.diffusers_pipeline, 0.6, RED_ON_WHITE).draw(*story_inputs, panel_maker)


def test_an_adapter_in_the_hub_layout_loads_by_path(models, ip_panels):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    from src.pipelines.story import IPAdapterPanels

    pipeline = ip_panels.diffusers_pipeline
    assert type(pipeline) is StableDiffusionImg2ImgPipeline
    saved = load_file(models["adapter"] / SUBFOLDER / WEIGHT_NAME)
    projection = pipeline.unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(projection.image_embeds.weight, saved["image_proj.proj.weight"])
    assert torch.equal(projection.norm.bias, saved["image_proj.norm.bias"])
    processors = pipeline.unet.attn_processors
    cross = [name for name in processors if name.endswith("attn2.processor")]
    assert len(cross) == 4 and all(isinstance(processors[name], IPAdapterAttnProcessor2_0) for name in cross)
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for n, p in processors.items() if n not in cross)
    mid_block = processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert torch.equal(mid_block.to_v_ip[0].weight, saved["ip_adapter.7.to_v_ip.weight"])  # mid block last
    assert mid_block.scale == [0.6]
    encoder = CLIPVisionModelWithProjection.from_pretrained(models["adapter"] / SUBFOLDER / "image_encoder")
    assert torch.equal(pipeline.image_encoder.visual_projection.weight, encoder.visual_projection.weight)
    assert pipeline.feature_extractor.crop_size == {"height": 32, "width": 32}  # the encoder's own size
    assert ip_panels.describe() == {
        "model": str(models["adapter"] / SUBFOLDER),
        "base_model": str(models["base"]),
        "subfolder": "",
        "weight_name": WEIGHT_NAME,
        "image_encoder_folder": "image_encoder",
        "style_image": None,
        "scale": 0.6,
        "reference": "first panel",
    }
    # a per-block scale as InstantStyle gives it (from a config: a dict): the reference in one up block only
    IPAdapterPanels(pipeline, {"up": {"block_1": [0.0, 1.0]}})
    scales = {name.split(".transformer_blocks")[0]: processors[name].scale for name in cross}
    assert scales == {
        "down_blocks.0.attentions.0": [0.0],
        "up_blocks.1.attentions.0": [0.0],
        "up_blocks.1.attentions.1": [1.0],
        "mid_block.attentions.0": [0.0],
    }


def test_missing_or_unfitting_adapters_name_their_setting(models, tmp_path):
    from safetensors.torch import save_file

    from src.pipelines.loading import load_ip_adapter_panels
    from src.utils.hub import MissingWeightsError

    with pytest.raises(ValueError, match=r"ip_adapter\.model=.*ip_adapter\.base_model="):
        load_ip_adapter_panels(model=str(models["adapter"]), device="cpu")
    with pytest.raises(ValueError, match=r"ip_adapter\.model=.*ip_adapter\.base_model="):
        load_ip_adapter_panels(base_model=str(models["base"]), device="cpu")
    found = {"base_model": str(models["base"]), "subfolder": SUBFOLDER, "device": "cpu"}
    for wrong in (
        {"model": str(tmp_path / "no_adapter"), "weight_name": WEIGHT_NAME},
        {"model": str(models["adapter"]), "weight_name": "ip-adapter_sd15.bin"},  # the default, not there
    ):
        with pytest.raises(MissingWeightsError, match="`ip_adapter.model`") as missing:
            load_ip_adapter_panels(**found, **wrong)
        assert "\n" not in str(missing.value)
    with pytest.raises(MissingWeightsError, match="`ip_adapter.base_model`"):
        load_ip_adapter_panels(
            model=str(models["adapter"]),
            base_model=str(tmp_path / "no_base"),
            subfolder=SUBFOLDER,
            weight_name=WEIGHT_NAME,
            device="cpu",
        )
    sdxl_like = write_ip_adapter(tmp_path / "wider", models["base"], width=64)
    lora = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}
    save_file(lora, sdxl_like / SUBFOLDER / "style_lora.safetensors")
    for weight_name in (WEIGHT_NAME, "style_lora.safetensors"):
        with pytest.raises(ValueError, match=r"is not an IP-Adapter for ip_adapter\.base_model="):
            load_ip_adapter_panels(**found, model=str(sdxl_like), weight_name=weight_name)
    with pytest.raises(FileNotFoundError, match=r"ip_adapter\.style_image="):
        load_ip_adapter_panels(**found, model=str(models["adapter"]), style_image=str(tmp_path / "no.png"))


def test_every_panel_of_the_batch_sees_the_one_reference_image(
    ip_panels, panel_maker, story_inputs, red_panels
):
    from src.pipelines.story import IPAdapterPanels

    prompts, images, seeds = story_inputs
    pipeline = ip_panels.diffusers_pipeline
    assert red_panels.shape == (4, 3, 32, 32) and red_panels.min() >= 0 and red_panels.max() <= 1
    alone = IPAdapterPanels(pipeline, 0.6, RED_ON_WHITE).draw(
        prompts[2:3], images[2:3], seeds[2:3], panel_maker
    )
    torch.testing.assert_close(alone[0], red_panels[2], atol=1e-5, rtol=0)
    yellow = IPAdapterPanels(pipeline, 0.6, YELLOW_ON_BLACK).draw(prompts, images, seeds, panel_maker)
    assert all((r - y).abs().max() > 1e-2 for r, y in zip(red_panels, yellow, strict=True))


def test_at_scale_zero_the_panels_are_plain_image_to_image(
    models, ip_panels, panel_maker, story_inputs, red_panels
):
    """IP-Adapter's attention processors skip the image tokens at scale 0 and attend to the text as before."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from src.pipelines.story import IPAdapterPanels

    prompts, images, seeds = story_inputs
    at_zero = IPAdapterPanels(ip_panels.diffusers_pipeline, 0.0, RED_ON_WHITE)
    IPAdapterPanels(ip_panels.diffusers_pipeline, 0.6)  # another user of the UNet sets its scale meanwhile
    drawn = at_zero.draw(prompts, images, seeds, panel_maker)
    plain = StableDiffusionImg2ImgPipeline.from_pretrained(
        models["base"], safety_checker=None, requires_safety_checker=False
    )
    plain.set_progress_bar_config(disable=True)
    expected = plain(
        prompt=prompts,
        image=images,
        strength=panel_maker.settings.strength,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
        **STEPS,
    ).images
    torch.testing.assert_close(drawn, expected, atol=1e-5, rtol=0)
    assert (red_panels - expected).abs().max() > 1e-2  # at 0.6 the reference does change the panels


def test_without_a_style_image_the_reference_is_the_first_panel(
    ip_panels, panel_maker, story_inputs, red_panels
):
    from src.pipelines.story import IPAdapterPanels
    from src.utils.image_grid import to_pil

    prompts, images, seeds = story_inputs
    pipeline = ip_panels.diffusers_pipeline
    first_panel = to_pil(panel_maker.draw(prompts[:1], images[:1], seeds[:1])[0])
    from_first = IPAdapterPanels(pipeline, 0.6).draw(prompts, images, seeds, panel_maker)
    given_first = IPAdapterPanels(pipeline, 0.6, first_panel).draw(prompts, images, seeds, panel_maker)
    assert torch.equal(from_first, given_first)
    assert (from_first - red_panels).abs().max() > 1e-2


@pytest.mark.slow
def test_a_story_strip_with_an_ip_adapter(models, panel_maker, tmp_path):
    from src.pipelines.loading import load_story_maker
    from src.pipelines.strip import strip_layout

    RED_ON_WHITE.save(tmp_path / "style.png")
    adapter = {
        "model": str(models["adapter"]),
        "subfolder": SUBFOLDER,
        "weight_name": WEIGHT_NAME,
        "base_model": str(models["base"]),
        "scale": 0.8,
        "style_image": str(tmp_path / "style.png"),
    }
    maker = load_story_maker(panel_maker, "ip_adapter", ip_adapter=adapter, device="cpu", panel_width=64)
    strip = maker([STORY], seed=0)[0]
    hits = [found[0] for found in panel_maker.retrieve(STORY, top_k=1)]
    assert [p.hit for p in strip.panels] == hits and [p.seed for p in strip.panels] == [0] * 4
    assert all(p.image.shape == (3, 32, 32) for p in strip.panels)
    assert strip.image.size == strip_layout([(32, 32)] * 4, STORY, width=64).size
    settings = maker.describe()
    assert settings["consistency"] == "ip_adapter"
    assert settings["ip_adapter"] == {
        "model": str(models["adapter"]),
        "base_model": str(models["base"]),
        "subfolder": SUBFOLDER,
        "weight_name": WEIGHT_NAME,
        "image_encoder_folder": "image_encoder",
        "style_image": str(tmp_path / "style.png"),
        "scale": 0.8,
        "reference": "style image",
    }

    # generate.py as a user runs it, h94/IP-Adapter's subfolder by default: the manifest names the adapter
    manifest = generate(
        models,
        tmp_path / "strip",
        "mode=story",
        f"story={json.dumps(STORY)}",
        "consistency=ip_adapter",
        f"ip_adapter.model={models['adapter']}",
        f"ip_adapter.base_model={models['base']}",
        f"ip_adapter.weight_name={WEIGHT_NAME}",
    )
    recorded = manifest["settings"]["ip_adapter"]
    assert recorded["model"] == str(models["adapter"]) and recorded["subfolder"] == SUBFOLDER
    assert recorded["reference"] == "first panel" and manifest["settings"]["consistency"] == "ip_adapter"
    assert manifest["strips"][0]["panel_files"] == [f"story_000_panel_{p}.png" for p in range(4)]
    assert (tmp_path / "strip" / "story_000.png").is_file()
