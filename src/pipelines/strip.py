"""A story's panels as one vertical strip, the webtoon scroll format: panels top to bottom, each sentence under
its panel (NanumGothic, so Hangul renders), white gutters between them.

    margin
    panel 1      (scaled to ``width``; its height keeps the panel's aspect ratio)
    margin + caption lines
    gutter
    panel 2 ...
    margin

The strip is ``width + 2 * margin`` wide. :func:`strip_layout` computes where everything goes, so callers and
tests know each panel's box without drawing; :func:`vertical_strip` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageColor, ImageDraw

from src.utils.image_grid import _wrap, caption_font

__all__ = ["StripLayout", "strip_layout", "vertical_strip"]

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive, as PIL crops)


@dataclass(frozen=True)
class StripLayout:
    """Where a strip puts each panel and each caption's lines."""

    size: tuple[int, int]  # the strip's width, height
    panel_boxes: tuple[Box, ...]
    caption_boxes: tuple[Box, ...]  # the text area under each panel (empty when there are no captions)
    caption_lines: tuple[tuple[str, ...], ...]
    line_height: int


def strip_layout(
    panel_sizes: Sequence[tuple[int, int]],
    captions: Sequence[str] | None = None,
    width: int = 512,
    gutter: int = 32,
    margin: int = 16,
    font_size: int = 20,
) -> StripLayout:
    """The layout of :func:`vertical_strip` for panels of these ``(width, height)`` sizes."""
    if not panel_sizes:
        raise ValueError("a strip needs at least one panel")
    if captions is not None and len(captions) != len(panel_sizes):
        raise ValueError(
            f"{len(panel_sizes)} panels but {len(captions)} captions: give one caption per panel"
        )
    if width < 1 or gutter < 0 or margin < 0 or font_size < 1:
        raise ValueError(
            f"strip settings must be width >= 1, gutter >= 0, margin >= 0, font_size >= 1; got width={width}, "
            f"gutter={gutter}, margin={margin}, font_size={font_size}"
        )
    font = caption_font(font_size)
    ascent, descent = font.getmetrics()
    line_height = ascent + descent
    panel_boxes, caption_boxes, caption_lines = [], [], []
    top = margin
    for number, (panel_width, panel_height) in enumerate(panel_sizes):
        height = max(1, round(width * panel_height / panel_width))
        panel_boxes.append((margin, top, margin + width, top + height))
        top += height
        if captions is not None:
            # as many lines as the sentence needs: a strip scrolls, nothing is cut
            lines = tuple(_wrap(captions[number], font, width, max_lines=len(captions[number]) + 1))
            text_height = margin + len(lines) * line_height
            caption_boxes.append((margin, top, margin + width, top + text_height))
            caption_lines.append(lines)
            top += text_height
        if number < len(panel_sizes) - 1:
            top += gutter
    return StripLayout(
        size=(width + 2 * margin, top + margin),
        panel_boxes=tuple(panel_boxes),
        caption_boxes=tuple(caption_boxes),
        caption_lines=tuple(caption_lines),
        line_height=line_height,
    )


def vertical_strip(
    panels: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    width: int = 512,
    gutter: int = 32,
    margin: int = 16,
    font_size: int = 20,
    background: str | tuple[int, int, int] = "white",
) -> Image.Image:
    """The panels stacked top to bottom at ``width`` pixels wide, each ``captions[i]`` printed under panel i."""
    layout = strip_layout([panel.size for panel in panels], captions, width, gutter, margin, font_size)
    strip = Image.new("RGB", layout.size, background)
    for panel, (left, top, right, bottom) in zip(panels, layout.panel_boxes, strict=True):
        size = (right - left, bottom - top)
        # nearest neighbour keeps a small generated panel's pixels crisp; Lanczos shrinks large ones smoothly
        resample = Image.Resampling.NEAREST if panel.width < size[0] else Image.Resampling.LANCZOS
        picture = panel.convert("RGB")
        strip.paste(picture if picture.size == size else picture.resize(size, resample), (left, top))
    draw = ImageDraw.Draw(strip)
    font = caption_font(font_size)
    red, green, blue = ImageColor.getrgb(background)[:3] if isinstance(background, str) else background[:3]
    ink = (
        "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 127 else "white"
    )  # readable on any background
    for lines, (left, top, _, _) in zip(layout.caption_lines, layout.caption_boxes, strict=True):
        for k, line in enumerate(lines):
            draw.text((left, top + margin + k * layout.line_height), line, fill=ink, font=font)
    return strip
