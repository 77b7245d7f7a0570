"""The vertical strip: exact geometry, panels in their boxes, crisp upscaling, Hangul captions that draw glyphs;
and the consistency of a strip's panels (mean pairwise cosine of their embeddings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.metrics.consistency import mean_pairwise_cosine
from src.pipelines.strip import strip_layout, vertical_strip
from src.utils.image_grid import caption_font

WHITE = (255, 255, 255)


def solid(colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def checkerboard(side: int = 32, cell: int = 4) -> Image.Image:
    """Black and red squares of ``cell`` pixels: any blur between them shows up as new colours."""
    y, x = np.mgrid[:side, :side]
    on = ((x // cell + y // cell) % 2).astype(bool)
    pixels = np.where(on[..., None], np.array([200, 0, 0], np.uint8), np.array([0, 0, 0], np.uint8))
    return Image.fromarray(pixels.astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_height_is_the_sum_of_its_parts_without_captions():
    panels = [solid((200, 0, 0), (32, 32)), solid((0, 150, 0), (64, 32)), solid((0, 0, 200), (100, 200))]
    strip = vertical_strip(panels, width=128, gutter=10, margin=6)
    # panels keep their aspect ratio at 128 px wide: 128, 64 and 256 px high
    assert strip.size == (128 + 2 * 6, 6 + 128 + 10 + 64 + 10 + 256 + 6)
    layout = strip_layout([p.size for p in panels], width=128, gutter=10, margin=6)
    assert layout.caption_boxes == () and layout.caption_lines == ()
    assert layout.panel_boxes == ((6, 6, 134, 134), (6, 144, 134, 208), (6, 218, 134, 474))


def test_captions_add_one_text_area_per_panel_sized_by_its_lines():
    panels = [solid((200, 0, 0), (32, 32))] * 4
    short = ["A red circle.", "그다음 빨간 원이 움직인다.", "Then it grows.", "마지막으로 원이 바뀐다."]
    layout = strip_layout([p.size for p in panels], short, width=256, gutter=20, margin=8, font_size=18)
    ascent, descent = caption_font(18).getmetrics()
    assert layout.line_height == ascent + descent
    assert all(len(lines) == 1 for lines in layout.caption_lines)
    text_area = 8 + layout.line_height
    assert layout.size == (256 + 16, 8 + 4 * 256 + 4 * text_area + 3 * 20 + 8)
    assert vertical_strip(panels, short, width=256, gutter=20, margin=8, font_size=18).size == layout.size

    long = [*short[:3], " ".join(["긴 문장이 이어진다"] * 12)]
    wrapped = strip_layout([p.size for p in panels], long, width=256, gutter=20, margin=8, font_size=18)
    extra_lines = len(wrapped.caption_lines[3]) - 1
    assert extra_lines >= 2
    assert wrapped.size[1] == layout.size[1] + extra_lines * layout.line_height
    font = caption_font(18)
    assert all(font.getlength(line) <= 256 for line in wrapped.caption_lines[3])
    assert " ".join(wrapped.caption_lines[3]) == long[3]  # wrapped, nothing cut


def test_panel_pixels_land_in_their_boxes_and_small_panels_stay_crisp():
    board = checkerboard(32, cell=4)
    panels = [board, solid((0, 150, 0), (600, 300)), solid((0, 0, 200), (64, 64))]
    captions = ["A checkerboard.", "A green field.", "A blue square."]
    strip = vertical_strip(panels, captions, width=128, gutter=12, margin=10)
    layout = strip_layout([p.size for p in panels], captions, width=128, gutter=12, margin=10)
    image = pixels(strip)

    left, top, right, bottom = layout.panel_boxes[0]
    # upscaled 4x by nearest neighbour: exactly the checkerboard with 16-pixel cells, no blended colours
    np.testing.assert_array_equal(image[top:bottom, left:right], pixels(checkerboard(128, cell=16)))
    for (left, top, right, bottom), colour in zip(
        layout.panel_boxes[1:], [(0, 150, 0), (0, 0, 200)], strict=True
    ):
        assert (image[top:bottom, left:right] == colour).all()  # a downscaled solid panel stays solid
        assert tuple(image[top - 1, left]) == WHITE and tuple(image[bottom, left - 1]) == WHITE
    # gutters and margins are background
    gutter_top = layout.caption_boxes[0][3]
    assert (image[gutter_top : layout.panel_boxes[1][1]] == 255).all()
    assert (image[:, : layout.panel_boxes[0][0]] == 255).all()
    assert (image[layout.caption_boxes[-1][3] :] == 255).all() and image.shape[0] == layout.caption_boxes[-1][
        3
    ] + 10


def test_korean_captions_draw_glyphs():
    panels = [solid((200, 0, 0), (32, 32))] * 2
    first = ["빨간 원이 있다.", "파란 별이 있다."]
    second = ["파란 별이 있다.", "빨간 원이 있다."]
    strip = pixels(vertical_strip(panels, first, width=200, margin=8))
    swapped = pixels(vertical_strip(panels, second, width=200, margin=8))
    layout = strip_layout([p.size for p in panels], first, width=200, margin=8)
    left, top, right, bottom = layout.caption_boxes[0]
    text = strip[top:bottom, left:right]
    assert (text < 128).any(axis=-1).sum() > 50  # dark glyph pixels were drawn
    # same number of characters, different pixels: real glyphs, not a missing-glyph box per character
    assert not np.array_equal(text, swapped[top:bottom, left:right])


def test_without_captions_there_is_no_text_area():
    panels = [solid((200, 0, 0), (32, 32))] * 2
    with_text = vertical_strip(panels, ["빨간 원.", "빨간 원."], width=64, gutter=4, margin=4)
    without = vertical_strip(panels, width=64, gutter=4, margin=4)
    assert without.size == (72, 4 + 64 + 4 + 64 + 4)
    assert with_text.size[1] > without.size[1]
    assert (pixels(without)[:, :, 1:] > 0).sum() == (pixels(without)[:, :, 1:] == 255).sum()  # no ink


def test_bad_input_is_a_clear_error():
    panel = solid((200, 0, 0), (32, 32))
    with pytest.raises(ValueError, match="one caption per panel"):
        vertical_strip([panel, panel], ["only one"])
    with pytest.raises(ValueError, match="at least one panel"):
        vertical_strip([])
    with pytest.raises(ValueError, match="width >= 1"):
        vertical_strip([panel], width=0)


def test_consistency_of_identical_panels_is_the_maximum_one():
    torch.manual_seed(0)
    row = torch.randn(1, 16)
    assert mean_pairwise_cosine(row.repeat(4, 1)) == pytest.approx(1.0, abs=1e-12)
    assert mean_pairwise_cosine(torch.cat([row, 3 * row])) == pytest.approx(1.0, abs=1e-12)  # scale-free
    assert mean_pairwise_cosine(torch.randn(4, 16)) < 1.0


def test_consistency_of_orthogonal_panels_is_zero_and_opposite_ones_minus_one():
    assert mean_pairwise_cosine(torch.eye(4, 8)) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])) == pytest.approx(-1.0, abs=1e-12)


def test_consistency_is_the_mean_over_pairs_and_ignores_panel_order():
    torch.manual_seed(0)
    embeddings = torch.randn(5, 32)
    pairs = [
        torch.cosine_similarity(embeddings[i].double(), embeddings[j].double(), dim=0).item()
        for i in range(5)
        for j in range(i + 1, 5)
    ]
    expected = sum(pairs) / len(pairs)
    assert mean_pairwise_cosine(embeddings) == pytest.approx(expected, abs=1e-9)
    assert mean_pairwise_cosine(embeddings[torch.randperm(5)]) == pytest.approx(expected, abs=1e-9)
    # three panels, two alike and one apart: (cos(a, a') + 2 cos(a, b)) / 3
    alike = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mean_pairwise_cosine(alike) == pytest.approx(1 / 3, abs=1e-12)


def test_consistency_needs_two_panels():
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_cosine(torch.randn(1, 8))
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_cosine(torch.randn(8))
