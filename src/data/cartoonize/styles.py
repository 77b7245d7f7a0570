"""Which published generator makes which style, where its weight file comes from, and loading it strictly."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from src.data.cartoonize.animegan import AnimeGANv2
from src.data.cartoonize.cartoongan import CartoonGAN
from src.utils.hub import MissingWeightsError

log = logging.getLogger(__name__)

WEIGHTS_SETTING = "cartoonize.weights_dir"
CARTOONGAN_SOURCE = (
    "CartoonGAN-Test-Pytorch-Torch (github.com/Yijunmaverick/CartoonGAN-Test-Pytorch-Torch, "
    "pretrained_model/download_pth.sh; its host http://vllab1.ucmerced.edu/~yli62/CartoonGAN/pytorch_pth/ "
    "is offline, so take the same file from a mirror)"
)
ANIMEGAN_SOURCE = "animegan2-pytorch (https://github.com/bryandlee/animegan2-pytorch/raw/main/weights/{file})"


@dataclass(frozen=True)
class Style:
    """A cartoon style: the generator class and the published weight file that makes it."""

    name: str
    generator: Callable[[], nn.Module]
    weight_file: str
    source: str


def _cartoongan(name: str) -> Style:
    return Style(name.lower(), CartoonGAN, f"{name}_net_G_float.pth", CARTOONGAN_SOURCE)


def _animegan(name: str) -> Style:
    file = f"{name}.pt"
    return Style(f"animegan2_{name}", AnimeGANv2, file, ANIMEGAN_SOURCE.format(file=file))


# The thesis's four CartoonGAN styles, then AnimeGANv2's published generators (prefixed: both have a Paprika).
STYLES: dict[str, Style] = {
    style.name: style
    for style in [
        *(_cartoongan(name) for name in ("Hayao", "Hosoda", "Paprika", "Shinkai")),
        *(
            _animegan(name)
            for name in ("face_paint_512_v2", "face_paint_512_v1", "paprika", "celeba_distill")
        ),
    ]
}
PHOTO = "photo"  # the originals' shard set, beside the styles'


def resolve_styles(names: Iterable[str]) -> list[Style]:
    """The styles asked for, in order, each once; an unknown name fails with the list of known ones."""
    styles: list[Style] = []
    for name in names:
        key = str(name).lower()
        if key not in STYLES:
            raise ValueError(
                f"cartoonize.styles: unknown style {name!r}; known: {', '.join(STYLES)} "
                f"({PHOTO!r} is the originals and needs no generator)"
            )
        if STYLES[key] not in styles:
            styles.append(STYLES[key])
    return styles


def weight_path(style: Style, weights_dir: str | os.PathLike | None) -> Path:
    """``weights_dir/<published file name>``, or one error naming the file and where it is published."""
    if weights_dir in (None, ""):
        raise MissingWeightsError(
            f"Style {style.name!r} needs {style.weight_file}, published by {style.source}. "
            f"Put it in a folder and set {WEIGHTS_SETTING}=DIR."
        )
    path = Path(weights_dir).expanduser() / style.weight_file
    if not path.is_file():
        raise MissingWeightsError(
            f"Style {style.name!r} needs {path} ({WEIGHTS_SETTING}={weights_dir}), which does not exist. "
            f"{style.weight_file} is published by {style.source}."
        )
    return path


def load_generator(style: Style, weights_dir: str | os.PathLike | None) -> nn.Module:
    """The style's generator with its published weights, loaded strictly, in eval mode."""
    path = weight_path(style, weights_dir)
    # Both projects published bare state dicts, so the safe loader reads them (the 2018 .pth files too).
    state = torch.load(path, map_location="cpu", weights_only=True)
    generator = style.generator()
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path} does not hold the {style.generator.__name__} weights of style {style.name!r} "
            f"({str(error).splitlines()[0]}); get {style.weight_file} from {style.source}."
        ) from error
    log.info("Style %s: %s loaded from %s", style.name, style.generator.__name__, path)
    return generator.eval().requires_grad_(False)
