"""Generate webtoon images for English / Korean captions with a trained text-to-webtoon GAN checkpoint.

Files are named after the caption's index (``000_0.png``), never its text, and ``captions.json`` maps each file
to its caption. See ``configs/generate.yaml`` for the settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import torch
    from lightning import LightningModule

    from src.data.text_features import TextFeatureEncoder

DEFAULT_MODULE_CLASS = "src.modules.dcgan_module.TextToWebtoonGAN"
NETWORK_KEYS = ("generator", "discriminator")


def load_gan_from_checkpoint(
    path: str | os.PathLike, module_class: str | type = DEFAULT_MODULE_CLASS, map_location: Any = "cpu"
) -> LightningModule:
    """The LightningModule of ``path`` with its networks rebuilt from the ``_target_`` configs in its hyper-parameters."""
    import torch
    from hydra.utils import get_class, instantiate

    cls = get_class(module_class) if isinstance(module_class, str) else module_class
    # Our own training checkpoint: hyper-parameters may hold OmegaConf objects and partials, not only tensors.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    networks: dict[str, Any] = {}
    for key in NETWORK_KEYS:
        config = hparams.get(key)
        if OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=True)
        if isinstance(config, Mapping) and "_target_" in config:
            networks[key] = instantiate(config)
    missing = [k for k in NETWORK_KEYS if k not in networks and k not in hparams]
    if missing:
        raise KeyError(
            f"{path}: hyper_parameters lack the {missing} config(s) (dicts with _target_) needed to rebuild the "
            f"networks; found keys {sorted(hparams)}."
        )
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=False, **networks)


def generate_images(
    module: LightningModule, text_features: torch.Tensor, num_per_caption: int, seed: int = 0
) -> torch.Tensor:
    """Images [n_captions, num_per_caption, 3, H, W] in [-1, 1]; each caption uses the same seeded noise."""
    import torch

    features = text_features.to(module.device)
    out = []
    with torch.no_grad():
        for feature in features:
            generator = torch.Generator().manual_seed(seed)
            batch = feature.unsqueeze(0).expand(num_per_caption, -1)
            out.append(module.generate(batch, generator=generator).float().cpu())
    return torch.stack(out)


def write_images(images: torch.Tensor, captions: list[str], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``{index:03d}_{k}.png`` for images [n, k, 3, H, W] in [-1, 1] and ``captions.json``; returns that map."""
    from torchvision.utils import save_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for index, (caption, row) in enumerate(zip(captions, images, strict=True)):
        for k, image in enumerate(row):
            name = f"{index:03d}_{k}.png"
            save_image((image + 1) / 2, out_dir / name)
            files[name] = caption
    (out_dir / "captions.json").write_text(
        json.dumps(files, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return files


def build_caption_encoder(cfg: DictConfig, device: str) -> TextFeatureEncoder:
    """The encoder of ``features_dir`` when given, else the ``encoder`` block."""
    from hydra.utils import instantiate, to_absolute_path

    from src.data.text_features import load_text_encoder_from_features

    if cfg.features_dir is not None:
        return load_text_encoder_from_features(to_absolute_path(cfg.features_dir), device=device)
    if cfg.encoder.name_or_path is None and cfg.encoder.config is None:
        raise ValueError(
            "Set features_dir=DIR (the precomputed features the GAN trained on; recommended) or "
            "encoder.name_or_path=NAME_OR_PATH to choose the caption encoder."
        )
    name = cfg.encoder.name_or_path
    if name is not None and os.path.exists(to_absolute_path(name)):
        name = to_absolute_path(name)
    return instantiate(cfg.encoder, name_or_path=name, device=device)


def generate_from_config(cfg: DictConfig) -> dict[str, str]:
    """Load the checkpoint, encode the captions, write the images and captions.json; returns file -> caption."""
    import torch
    from hydra.utils import to_absolute_path

    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    captions = [str(c) for c in cfg.captions] if OmegaConf.is_list(cfg.captions) else [str(cfg.captions)]
    if not captions:
        raise ValueError("captions is empty.")
    module = load_gan_from_checkpoint(to_absolute_path(cfg.ckpt_path), cfg.module_class, map_location=device)
    module.eval()
    encoder = build_caption_encoder(cfg, device)
    # Rounded through float16 like the stored training features.
    text_features = encoder.encode(captions).to(torch.float16).float()
    images = generate_images(module, text_features, cfg.num_per_caption, cfg.seed)
    files = write_images(images, captions, to_absolute_path(cfg.out_dir))
    print(f"wrote {len(files)} images for {len(captions)} captions to {to_absolute_path(cfg.out_dir)}")
    return files


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> dict[str, str]:
    """Command-line entry point: ``python generate.py ckpt_path=... captions=[...] features_dir=...``."""
    return generate_from_config(cfg)


if __name__ == "__main__":
    main()
