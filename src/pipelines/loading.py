"""The one way to get a text-to-image model or a diffusers pipeline: from a module, a checkpoint or an export.

- :func:`text_to_image_for` — a LightningModule in memory (callbacks while training, tests), sharing its weights.
- :func:`load_text_to_image` — a checkpoint of ``train.py`` (``ckpt_path``), a fine-tuning export directory or a
  method's file from elsewhere (``weights``, with ``method`` and ``base_model`` when no ``finetune.json`` names
  them), or a Stable Diffusion model alone (``base_model``: hub id or local directory).
- :func:`load_stable_diffusion` — the diffusers pipeline itself, of any class (text-to-image, depth-to-image,
  ControlNet), with a method's export applied: what panels, img2img and DreamBooth's class images build on.

The argument names are the settings of ``generate.py`` and the service, so an error names the setting to fix.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from src.pipelines.stable_diffusion import (
    METHODS,
    WHOLE_MODEL_METHODS,
    StableDiffusionTextToImage,
    apply_finetune,
    read_export_record,
)
from src.pipelines.text_to_image import TextToImage
from src.utils.device import half_precision_dtype, resolve_device
from src.utils.hub import from_pretrained

__all__ = [
    "diffusers_pipeline_for",
    "diffusers_pipeline_of",
    "load_module",
    "load_panel_maker",
    "load_photo_maker",
    "load_stable_diffusion",
    "load_story_maker",
    "load_text_to_image",
    "text_to_image_for",
]

# A GAN's caption encoder is loaded once per module, not at every validation that draws with it.
_GAN_TEXT_TO_IMAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --- from a module in memory --------------------------------------------------------------------------------


def text_to_image_for(module: Any, **sampling: Any) -> TextToImage:
    """The module's own drawing, sharing its current weights: a text-to-webtoon GAN, or any Stable Diffusion
    module exposing ``diffusion_parts()`` (``sampling``: steps, guidance, negative prompt)."""
    from src.modules.dcgan_module import TextToWebtoonGAN

    if isinstance(module, TextToWebtoonGAN):
        from src.pipelines.gan import GANTextToImage

        if module not in _GAN_TEXT_TO_IMAGE:
            _GAN_TEXT_TO_IMAGE[module] = GANTextToImage.for_module(module)
        return _GAN_TEXT_TO_IMAGE[module]
    if hasattr(module, "diffusion_parts"):
        return StableDiffusionTextToImage(
            diffusers_pipeline_for(module),
            getattr(module, "prompt_aliases", {}),
            source={"module": type(module).__name__},
            **sampling,
        )
    raise TypeError(
        f"{type(module).__name__} does not draw images: it is neither a GAN nor a diffusion model."
    )


def diffusers_pipeline_for(module: Any, pipeline_class: type | None = None) -> Any:
    """A diffusers pipeline (``StableDiffusionPipeline`` by default) on the module's current parts."""
    return diffusers_pipeline_of(module.diffusion_parts(), pipeline_class)


def diffusers_pipeline_of(parts: Mapping[str, Any], pipeline_class: type | None = None) -> Any:
    """A diffusers pipeline (``StableDiffusionPipeline`` by default) on ``parts`` (vae, unet, text encoder, ...)."""
    from diffusers import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    optional = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    diffusers_pipeline = pipeline_class(**parts, **accepted(pipeline_class, optional))
    diffusers_pipeline.set_progress_bar_config(disable=True)
    return diffusers_pipeline


def accepted(pipeline_class: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``pipeline_class`` takes (pipelines without a safety checker take none of its)."""
    parameters = inspect.signature(pipeline_class.__init__).parameters
    return {name: value for name, value in options.items() if name in parameters}


# --- from files -----------------------------------------------------------------------------------------------


def load_module(ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The LightningModule a checkpoint of ``train.py`` rebuilds (its class is recorded in the checkpoint;
    checkpoints from before that record are the GAN's, the only drawing module they could hold)."""
    from hydra.utils import get_class

    from src.utils.checkpoint import MODULE_CLASS_KEY

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file: point it at a checkpoint of train.py.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module_class = get_class(checkpoint.get(MODULE_CLASS_KEY, "src.modules.dcgan_module.TextToWebtoonGAN"))
    module = module_class.load_from_checkpoint(path, map_location=device, weights_only=True)
    return module.eval()


def load_stable_diffusion(
    base_model: str | None = None,
    method: str | None = None,
    weights: str | os.PathLike | None = None,
    multiplier: float = 1.0,
    device: str | torch.device = "auto",
    pipeline_class: type | None = None,
    base_model_setting: str = "base_model",
    **components: Any,
) -> tuple[Any, dict[str, str], dict[str, Any]]:
    """A diffusers pipeline with ``method``'s export applied, the prompt aliases it brings, and a record of
    where it came from (for manifests).

    A run's export directory records its method, base model and aliases (``finetune.json``), so ``weights``
    alone is enough for it; files from elsewhere (a WebUI embedding, a kohya LoRA) need ``method`` and
    ``base_model``. ``components`` replace or add parts (e.g. ``controlnet=...``, ``depth_estimator=...``);
    ``base_model_setting`` is the setting an error names when the base model cannot be loaded.
    """
    from diffusers import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    device = resolve_device(device)
    if weights is not None and not Path(weights).exists():
        raise FileNotFoundError(f"weights={weights} does not exist: point it at a run's export/ directory.")
    record = read_export_record(weights)
    method = method or record.get("method") or ("base" if not weights else None)
    base_model = str(base_model) if base_model else record.get("base_model")
    if method is None:
        raise ValueError(f"weights={weights} has no finetune.json: say which method wrote it (method=...).")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "base" and not weights:
        raise ValueError(f"method={method} needs weights=<its export: a directory or file>")
    whole_model = method in WHOLE_MODEL_METHODS
    if not whole_model and not base_model:
        raise ValueError(
            f"method={method} needs {base_model_setting}=<the hub id or directory it was trained on>"
        )
    source, setting = (str(weights), "weights") if whole_model else (base_model, base_model_setting)
    no_safety_checker = accepted(pipeline_class, {"safety_checker": None, "requires_safety_checker": False})
    diffusers_pipeline = from_pretrained(
        pipeline_class.from_pretrained,
        source,
        setting,
        dtype=half_precision_dtype(device),
        **no_safety_checker,
        **components,
    )
    diffusers_pipeline.set_progress_bar_config(disable=True)
    diffusers_pipeline.to(device)
    aliases = dict(record.get("prompt_aliases") or {})
    aliases.update(apply_finetune(diffusers_pipeline, method, weights or "", multiplier))
    origin = {
        "base_model": base_model,
        "method": method,
        "weights": str(weights) if weights else None,
        "multiplier": multiplier,
    }
    return diffusers_pipeline, aliases, origin


def load_text_to_image(
    ckpt_path: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    base_model: str | None = None,
    method: str | None = None,
    multiplier: float = 1.0,
    device: str | torch.device = "auto",
    prompt_aliases: Mapping[str, str] | None = None,
    **sampling: Any,
) -> TextToImage:
    """A text-to-image model from a checkpoint (``ckpt_path``) or from Stable Diffusion files (``weights`` and /
    or ``base_model``, see :func:`load_stable_diffusion`); ``prompt_aliases`` add to the export's own;
    ``sampling``: ``num_inference_steps``, ``guidance_scale``, ``negative_prompt`` (diffusion only)."""
    device = resolve_device(device)
    if ckpt_path:
        module = load_module(ckpt_path, device)
        text_to_image = text_to_image_for(module, **sampling)
        text_to_image.source = {"ckpt_path": str(ckpt_path), **getattr(text_to_image, "source", {})}
        return text_to_image
    if not (weights or base_model):
        raise ValueError(
            "Say what draws: ckpt_path=<a checkpoint of train.py>, or weights=<a fine-tuning export> "
            "and/or base_model=<a Stable Diffusion hub id or directory>."
        )
    diffusers_pipeline, aliases, origin = load_stable_diffusion(
        base_model, method, weights, multiplier, device
    )
    return StableDiffusionTextToImage(
        diffusers_pipeline, {**aliases, **(prompt_aliases or {})}, source=origin, **sampling
    )


# --- panels and story strips ----------------------------------------------------------------------------------


def load_panel_maker(
    clip: str | os.PathLike,
    index: str | os.PathLike,
    depth_model: str,
    weights: str | os.PathLike | None = None,
    method: str | None = None,
    multiplier: float = 1.0,
    device: str | torch.device = "auto",
    index_backend: str = "exact",
    korean_text_encoder: str | os.PathLike | None = None,
    **settings: Any,
) -> Any:
    """Treatments -> panels (:class:`~src.pipelines.panel.TreatmentToPanel`): the project's CLIP (a train.py
    checkpoint or its export), an image index it built (``prepare_data.py source=index``) and a depth-to-image
    model (hub id or directory), optionally with a style LoRA / textual inversion / hypernetwork (``weights``).
    With ``korean="encoder"`` the depth model reads prompts through the text encoder and tokenizer of
    ``korean_text_encoder`` (an export of ``experiment=korean_text_encoder*`` distilled into its text space)."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    from src.pipelines.panel import PanelSettings, TreatmentToPanel
    from src.retrieval.encoder import CLIPEncoder
    from src.retrieval.index import ImageIndex

    device = resolve_device(device)
    encoder = CLIPEncoder.load(clip, device=str(device), setting="clip")
    image_index = ImageIndex.load(index, backend=index_backend, setting="index")
    reader = korean_reader(korean_text_encoder) if settings.get("korean") == "encoder" else {}
    diffusers_pipeline, aliases, origin = load_stable_diffusion(
        depth_model,
        method,
        weights,
        multiplier,
        device,
        pipeline_class=StableDiffusionDepth2ImgPipeline,
        base_model_setting="depth_model",
        **reader,
    )
    origin = {"clip": str(clip), "index": str(index), "depth_model": str(depth_model), **origin}
    if reader:
        origin["korean_text_encoder"] = str(korean_text_encoder)
    origin.pop("base_model", None)
    return TreatmentToPanel(
        encoder, image_index, diffusers_pipeline, PanelSettings(**settings), aliases, origin
    )


def korean_reader(export: str | os.PathLike | None) -> dict[str, Any]:
    """The text encoder and tokenizer of a Korean text encoder's export, to replace a pipeline's own."""
    from src.modules.diffusion.components import load_text_encoder

    if not export:
        raise ValueError(
            "korean=encoder needs korean_text_encoder=<an export of experiment=korean_text_encoder_demo "
            "(or korean_text_encoder) distilled into the depth model's text space>"
        )
    tokenizer, text_encoder = load_text_encoder(str(export), setting="korean_text_encoder")
    return {"text_encoder": text_encoder, "tokenizer": tokenizer}


def load_story_maker(
    panel_maker: Any,
    consistency: str = "none",
    ip_adapter: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    **strip: Any,
) -> Any:
    """Stories -> strips (:class:`~src.pipelines.story.StoryToStrip`) on a panel maker. ``ip_adapter`` (for
    ``consistency=ip_adapter``): ``model`` (hub id or directory holding the adapter, e.g. ``h94/IP-Adapter``),
    ``subfolder``, ``weight_name``, ``base_model`` (a text-to-image model with IP-Adapter support, since the
    depth-to-image pipeline has none), ``scale``, ``style_image`` (a file; else the first panel)."""
    from src.pipelines.story import StoryToStrip

    if consistency == "lora" and not panel_maker.source.get("weights"):
        raise ValueError("consistency=lora needs weights=<a style LoRA or textual inversion export>")
    adapter = None
    if consistency == "ip_adapter":
        adapter = load_ip_adapter_panels(**dict(ip_adapter or {}), device=device)
    return StoryToStrip(panel_maker, consistency, adapter, **strip)


def load_ip_adapter_panels(
    model: str | None = None,
    base_model: str | None = None,
    subfolder: str = "models",
    weight_name: str = "ip-adapter_sd15.bin",
    image_encoder_folder: str = "image_encoder",
    scale: float | dict = 0.6,
    style_image: str | None = None,
    device: str | torch.device = "auto",
) -> Any:
    """An image-to-image pipeline of ``base_model`` with the IP-Adapter ``model`` loaded by diffusers'
    ``load_ip_adapter`` (hub id or directory; ``subfolder``, ``weight_name``, ``image_encoder_folder`` as there)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from src.pipelines.story import IPAdapterPanels
    from src.utils.hub import missing_weights

    if not model or not base_model:
        raise ValueError(
            "consistency=ip_adapter needs ip_adapter.model=<IP-Adapter hub id or directory, e.g. h94/IP-Adapter> "
            "and ip_adapter.base_model=<the text-to-image model it was trained for>: the depth-to-image pipeline "
            "has no IP-Adapter loader, so these panels are drawn by image-to-image."
        )
    if style_image and not Path(style_image).is_file():
        raise FileNotFoundError(f"ip_adapter.style_image={style_image} is not a file: give an image or null.")
    diffusers_pipeline, _, _ = load_stable_diffusion(
        base_model,
        device=device,
        pipeline_class=StableDiffusionImg2ImgPipeline,
        base_model_setting="ip_adapter.base_model",
    )
    try:
        diffusers_pipeline.load_ip_adapter(
            model, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=image_encoder_folder
        )
    except OSError as error:  # diffusers' and transformers' "no such file here or on the hub"
        raise missing_weights(model, "ip_adapter.model", error) from error
    except (KeyError, ValueError, RuntimeError) as error:  # keys or shapes of another UNet, or not an adapter
        cause = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"ip_adapter.model={model} ({Path(subfolder, weight_name)}) is not an IP-Adapter for "
            f"ip_adapter.base_model={base_model}: give the adapter trained for that model (h94/IP-Adapter: "
            f"models/ for SD 1.5, sdxl_models/ for SDXL) ({type(error).__name__}: {cause})"
        ) from error
    diffusers_pipeline.to(resolve_device(device))
    reference = Image.open(style_image).convert("RGB") if style_image else None
    source = {
        "model": model,
        "base_model": base_model,
        "subfolder": subfolder,
        "weight_name": weight_name,
        "image_encoder_folder": image_encoder_folder,
        "style_image": style_image,
    }
    return IPAdapterPanels(diffusers_pipeline, scale, reference, source)


# --- photo -> webtoon ---------------------------------------------------------------------------------------------


def load_photo_maker(
    controlnets: Sequence[Mapping[str, Any]],
    base_model: str | None = None,
    weights: str | os.PathLike | None = None,
    method: str | None = None,
    multiplier: float = 1.0,
    device: str | torch.device = "auto",
    **settings: Any,
) -> Any:
    """Photo -> webtoon (:class:`~src.pipelines.photo.PhotoToWebtoon`): ``base_model`` with a style export
    (``weights``: a fine-tuning export, or a kohya / WebUI file with ``method``) and one or several ControlNets
    (``controlnets[i]``: ``model``, ``detector`` or ``image``, ``scale``, ``start``, ``end``,
    ``detector_weights``). The style is loaded into a text-to-image pipeline and the ControlNet pipeline is built
    from its components, which share the LoRA, embeddings and hypernetwork (loading a LoRA on a ControlNet
    pipeline directly is the known trap)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from src.pipelines.detectors import load_detector
    from src.pipelines.photo import ControlSpec, PhotoSettings, PhotoToWebtoon

    device = resolve_device(device)
    specs = [ControlSpec(**dict(spec)) for spec in controlnets]
    if not specs:
        raise ValueError("mode=img2img needs controlnets=[{model: ..., detector: ...}, ...] (one or more).")
    base, aliases, origin = load_stable_diffusion(base_model, method, weights, multiplier, device)
    nets = [
        from_pretrained(
            ControlNetModel.from_pretrained,
            spec.model,
            f"controlnets[{i}].model",
            dtype=half_precision_dtype(device),
        ).to(device)
        for i, spec in enumerate(specs)
    ]
    components = {
        k: v
        for k, v in base.components.items()
        if k in inspect.signature(StableDiffusionControlNetImg2ImgPipeline.__init__).parameters
    }
    diffusers_pipeline = StableDiffusionControlNetImg2ImgPipeline(
        **components,
        controlnet=nets[0] if len(nets) == 1 else MultiControlNetModel(nets),
        requires_safety_checker=False,
    )
    diffusers_pipeline.set_progress_bar_config(disable=True)
    detectors = [
        load_detector(
            spec.detector, spec.detector_weights, device, setting=f"controlnets[{i}].detector_weights"
        )
        if spec.detector
        else None
        for i, spec in enumerate(specs)
    ]
    return PhotoToWebtoon(diffusers_pipeline, specs, detectors, PhotoSettings(**settings), aliases, origin)
