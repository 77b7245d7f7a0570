"""Image grids with their captions printed on them, in Latin script or Hangul, for people to look at."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=8)
def caption_font(size: int = 14) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """NanumGothic (Hangul and Latin, shipped by the koreanize-matplotlib package), else PIL's default font."""
    spec = importlib.util.find_spec(
        "koreanize_matplotlib"
    )  # located, not imported: importing restyles matplotlib
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "fonts" / "NanumGothic.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def font_path() -> str | None:
    """The TTF behind :func:`caption_font`, for matplotlib (None when only PIL's default exists)."""
    font = caption_font()
    return getattr(font, "path", None)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [3, H, W] float tensor in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def captioned_grid(
    rows: Sequence[Sequence[torch.Tensor | Image.Image]],
    captions: Sequence[str],
    column_titles: Sequence[str] | None = None,
    cell_size: int = 128,
    caption_width: int = 260,
    font_size: int = 14,
    padding: int = 4,
) -> Image.Image:
    """One row of images per caption, the caption printed to the row's left; optional titles above the columns.

    Images are [3, H, W] tensors in [0, 1] or PIL images, each scaled to ``cell_size`` (nearest neighbour for
    small images, so generated pixels stay visible).
    """
    if len(rows) != len(captions):
        raise ValueError(f"{len(rows)} rows but {len(captions)} captions")
    font = caption_font(font_size)
    columns = max((len(r) for r in rows), default=0)
    line_height = font_size + 4
    title_height = line_height * 2 + padding if column_titles else 0
    width = caption_width + columns * (cell_size + padding) + padding
    height = title_height + len(rows) * (cell_size + padding) + padding
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if column_titles:
        for j, title in enumerate(column_titles):
            x = caption_width + padding + j * (cell_size + padding)
            for k, line in enumerate(_wrap(title, font, cell_size, 2)):
                draw.text((x, padding + k * line_height), line, fill="black", font=font)
    for i, (row, caption) in enumerate(zip(rows, captions, strict=True)):
        y = title_height + padding + i * (cell_size + padding)
        lines = _wrap(caption, font, caption_width - 2 * padding, max(1, cell_size // line_height))
        for k, line in enumerate(lines):
            draw.text((padding, y + k * line_height), line, fill="black", font=font)
        for j, image in enumerate(row):
            picture = image if isinstance(image, Image.Image) else to_pil(image)
            resample = Image.Resampling.NEAREST if picture.width < cell_size else Image.Resampling.LANCZOS
            picture = picture.convert("RGB").resize((cell_size, cell_size), resample)
            canvas.paste(picture, (caption_width + padding + j * (cell_size + padding), y))
    return canvas


def _wrap(text: str, font, max_width: float, max_lines: int) -> list[str]:
    """Words wrapped to lines no wider than ``max_width`` pixels in ``font`` (Hangul is wider than Latin);
    a word wider than a line is cut, and text beyond ``max_lines`` ends in an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= max_width:
            lines[-1] = candidate
            continue
        while font.getlength(word) > max_width and len(word) > 1:  # a very long word: split it
            cut = len(word)
            while cut > 1 and font.getlength(word[:cut]) > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    lines = lines or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > max_width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def save_grid(grid: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
