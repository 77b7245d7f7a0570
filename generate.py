"""Generate webtoon images: captions with a trained model, panels from treatments, strips from stories.

    python generate.py ckpt_path=CKPT captions='["큰 빨간 원", "a large red circle"]' out_dir=DIR   # a GAN
    python generate.py weights=RUN/export captions='["*, fire"]'                                  # fine-tuned SD
    python generate.py mode=panel treatments='["큰 빨간 원", "a small teal heart"]' out_dir=DIR
    python generate.py mode=story story='["s1", "s2", "s3", "s4"]' consistency=shared_attention out_dir=DIR
    python generate.py mode=story stories=OUT/stories.jsonl language=ko num_stories=20 out_dir=DIR
    python generate.py mode=img2img image=PHOTO prompt='a girl, webtoon' weights=LORA_EXPORT \
        controlnets='[{model: CN, detector: openpose, scale: 1.0}, {model: CN2, detector: mlsd, scale: 0.5}]'
    python generate.py manifest=DIR/manifest.json out_dir=DIR2                                    # redraw

File names are chosen by the program (``000_0.png``, ``panel_000_0.png``, ``story_000.png``), never from the
text, and ``manifest.json`` records every setting, input, retrieved image and seed: ``manifest=`` redraws the
same pixels on the same machine. See ``configs/generate.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from src.utils.cli import one_line_errors

MANIFEST = "manifest.json"
MODES = ("images", "panel", "story", "img2img")
# Settings that name files or directories: recorded as absolute paths, so a manifest redraws from anywhere.
PATH_SETTINGS = (
    "ckpt_path",
    "weights",
    "base_model",
    "clip",
    "index",
    "depth_model",
    "korean_text_encoder",
    "stories",
    "image",
)
CONTROLNET_PATHS = ("model", "image", "detector_weights")
IP_ADAPTER_PATHS = ("model", "base_model", "style_image")


def generate_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Draw what ``cfg.mode`` says, write the images and ``manifest.json`` into ``cfg.out_dir``; returns the
    manifest."""
    from hydra.utils import to_absolute_path

    cfg = recorded_config(cfg)
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    out_dir = Path(to_absolute_path(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = {"images": draw_images, "panel": draw_panels, "story": draw_strips, "img2img": draw_photo}[
        cfg.mode
    ]
    manifest = {"mode": cfg.mode, "config": config_record(cfg), **draw(cfg, out_dir)}
    (out_dir / MANIFEST).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {cfg.mode} to {out_dir} ({MANIFEST} beside)")
    return manifest


def recorded_config(cfg: DictConfig) -> DictConfig:
    """The config to draw with: a manifest's own (``manifest=``, with this call's ``out_dir``), else ``cfg``,
    path settings made absolute."""
    from hydra.utils import to_absolute_path

    if cfg.get("manifest"):
        path = Path(to_absolute_path(cfg.manifest))
        if not path.is_file():
            raise FileNotFoundError(f"manifest={cfg.manifest} is not a file: point it at a manifest.json.")
        recorded = json.loads(path.read_text(encoding="utf-8"))["config"]
        cfg = OmegaConf.merge(cfg, recorded, {"out_dir": cfg.out_dir, "manifest": None})
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for name in PATH_SETTINGS:
        if cfg.get(name):
            cfg[name] = local_path(cfg[name])
    for spec, names in [
        *((spec, CONTROLNET_PATHS) for spec in cfg.get("controlnets") or []),
        (cfg.get("ip_adapter") or {}, IP_ADAPTER_PATHS),
    ]:
        for name in names:
            if spec.get(name):
                spec[name] = local_path(spec[name])
    return cfg


def local_path(path: str) -> str:
    """A path as the user typed it, made absolute when it exists (Hydra may run elsewhere); hub ids unchanged."""
    from hydra.utils import to_absolute_path

    return to_absolute_path(path) if Path(to_absolute_path(path)).exists() else str(path)


def config_record(cfg: DictConfig) -> dict[str, Any]:
    record = OmegaConf.to_container(cfg, resolve=True)
    for name in ("out_dir", "manifest"):
        record.pop(name, None)
    return record


def text_list(value: Any, setting: str) -> list[str]:
    """One string or a list of them, each non-empty."""
    texts = [str(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, list) else [str(value)]
    if not texts or not all(t.strip() for t in texts):
        raise ValueError(f"{setting} must be one or more non-empty strings.")
    return texts


# --- mode=images: captions -> images with any text-to-image model --------------------------------------------


def draw_images(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from src.pipelines.loading import load_text_to_image
    from src.utils.device import resolve_device
    from src.utils.image_grid import to_pil

    if cfg.captions is None:
        raise ValueError("mode=images needs captions=[...] (one caption or a list).")
    captions = text_list(cfg.captions, "captions")
    device = resolve_device(cfg.device)
    text_to_image = load_text_to_image(
        ckpt_path=cfg.ckpt_path,
        weights=cfg.weights,
        base_model=cfg.base_model,
        method=cfg.method,
        multiplier=cfg.multiplier,
        device=device,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        negative_prompt=cfg.negative_prompt,
    )
    images = text_to_image(captions, cfg.num_per_caption, cfg.seed)
    files: dict[str, str] = {}
    for index, (caption, row) in enumerate(zip(captions, images, strict=True)):
        for k, image in enumerate(row):
            name = f"{index:03d}_{k}.png"
            to_pil(image).save(out_dir / name)
            files[name] = caption
    settings = {**text_to_image.settings, "num_per_caption": cfg.num_per_caption, "seed": cfg.seed}
    return {"settings": {**settings, "device": str(device)}, "images": files}


# --- mode=panel / mode=story: treatments and stories -> panels and strips ------------------------------------


def panel_maker(cfg: DictConfig):
    from src.pipelines.loading import load_panel_maker

    for setting in ("clip", "index", "depth_model"):
        if not cfg.get(setting):
            raise ValueError(f"mode={cfg.mode} needs {setting}=... (see configs/generate.yaml).")
    return load_panel_maker(
        clip=cfg.clip,
        index=cfg.index,
        depth_model=cfg.depth_model,
        weights=cfg.weights,
        method=cfg.method,
        multiplier=cfg.multiplier,
        device=cfg.device,
        index_backend=cfg.index_backend,
        korean_text_encoder=cfg.get("korean_text_encoder"),
        korean=cfg.get("korean", "retrieved_captions"),
        **OmegaConf.to_container(cfg.panel, resolve=True),
    )


def draw_panels(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from src.utils.image_grid import to_pil

    if cfg.treatments is None:
        raise ValueError("mode=panel needs treatments=[...] (English or Korean sentences).")
    treatments = text_list(cfg.treatments, "treatments")
    translations = list(cfg.translations) if cfg.translations else None
    maker = panel_maker(cfg)
    panels = maker(treatments, cfg.seed, translations, on_step=progress_bar("panels"))
    records = []
    for i, row in enumerate(panels):
        for k, panel in enumerate(row):
            name, retrieved = f"panel_{i:03d}_{k}.png", f"retrieved_{i:03d}_{k}.png"
            to_pil(panel.image).save(out_dir / name)
            maker.index.image(panel.hit.row).save(out_dir / retrieved)
            records.append({"file": name, "retrieved_file": retrieved, **panel.record()})
    return {"settings": {**maker.describe(), "seed": cfg.seed}, "panels": records}


def story_list(cfg: DictConfig) -> list[list[str]]:
    """``story=[4 sentences]`` or ``stories=FILE.jsonl`` (prepare_data.py source=stories output), optionally of
    one ``language`` and at most ``num_stories``."""
    if cfg.story is not None:
        return [text_list(cfg.story, "story")]
    if not cfg.stories:
        raise ValueError("mode=story needs story=[sentences] or stories=<a stories.jsonl file>.")
    from src.data.stories import read_stories

    path = Path(cfg.stories)
    if not path.is_file():
        raise FileNotFoundError(f"stories={cfg.stories} is not a file: give prepare_data.py's stories.jsonl.")
    stories = [s for s in read_stories(path) if not cfg.language or s.language == cfg.language]
    if not stories:
        raise ValueError(f"stories={cfg.stories} holds no story in language={cfg.language}.")
    return [list(story.sentences) for story in stories[: cfg.num_stories or None]]


def draw_strips(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from src.pipelines.loading import load_story_maker
    from src.utils.image_grid import to_pil

    stories = story_list(cfg)
    maker = load_story_maker(
        panel_maker(cfg),
        consistency=cfg.consistency,
        ip_adapter=OmegaConf.to_container(cfg.ip_adapter, resolve=True),
        device=cfg.device,
        **OmegaConf.to_container(cfg.strip, resolve=True),
        shared_blocks=list(cfg.shared_attention.blocks),
        adain=cfg.shared_attention.adain,
    )
    strips = maker(stories, cfg.seed, on_step=progress_bar("stories"))
    records = []
    for i, strip in enumerate(strips):
        name = f"story_{i:03d}.png"
        strip.image.save(out_dir / name)
        panel_files = []
        for p, panel in enumerate(strip.panels):
            panel_files.append(f"story_{i:03d}_panel_{p}.png")
            to_pil(panel.image).save(out_dir / panel_files[-1])
        records.append({"file": name, "panel_files": panel_files, **strip.record()})
    return {"settings": {**maker.describe(), "seed": cfg.seed}, "strips": records}


# --- mode=img2img: a photo -> a webtoon image, steered by ControlNets ---------------------------------------


def draw_photo(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from src.pipelines.loading import load_photo_maker
    from src.utils.image_grid import to_pil
    from src.utils.images import decode_image

    if not cfg.image or not cfg.prompt:
        raise ValueError("mode=img2img needs image=<a photo> and prompt='...'.")
    photo = decode_image(cfg.image, max_pixels=cfg.max_pixels, name="image")
    maker = load_photo_maker(
        controlnets=OmegaConf.to_container(cfg.controlnets, resolve=True),
        base_model=cfg.base_model,
        weights=cfg.weights,
        method=cfg.method,
        multiplier=cfg.multiplier,
        device=cfg.device,
        **OmegaConf.to_container(cfg.img2img, resolve=True),
    )
    images, controls = maker(
        photo, str(cfg.prompt), cfg.num_images, cfg.seed, on_step=progress_bar("img2img")
    )
    maker.prepare(photo).save(out_dir / "input.png")
    control_files = [f"control_{i}.png" for i in range(len(controls))]
    for name, control in zip(control_files, controls, strict=True):
        control.save(out_dir / name)
    files = [f"image_{k}.png" for k in range(len(images))]
    for name, image in zip(files, images, strict=True):
        to_pil(image).save(out_dir / name)
    settings = {**maker.describe(), "prompt": str(cfg.prompt), "seed": cfg.seed, "num_images": cfg.num_images}
    return {"settings": settings, "input": "input.png", "controls": control_files, "images": files}


def progress_bar(unit: str):
    """A step callback drawing a tqdm bar of denoising steps (one bar per diffusion call)."""
    from tqdm.auto import tqdm

    bar = None

    def on_step(done: int, total: int) -> None:
        nonlocal bar
        if bar is None or done == 1:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=f"{unit}: denoising", unit="step", leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return on_step


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
@one_line_errors
def main(cfg: DictConfig) -> dict[str, Any]:
    """Command-line entry point (see the module docstring)."""
    return generate_from_config(cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
