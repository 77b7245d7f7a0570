"""A procedurally generated bilingual dataset: coloured shapes with 5 English and 5 Korean captions each.

It is the offline default of the framework: demos and tests train on it without downloading anything.
Every attribute of a scene (shape, colour, size, position, background, drawing style) is named in every
caption, so text-to-image retrieval is learnable, and the shape's colour dominates its non-background
pixels, so a generator's output can be checked against the colour its caption names (``dominant_colour``).
The renderer also knows each shape's silhouette, so it draws true depth maps beside the images
(``render_scene_with_depth``), which the depth-to-image demo trains on (``src/demo/depth.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from src.data.schema import LANGUAGES, SPLITS, WebtoonSample
from src.data.shards import forget_splits, remove_split_shards, write_shards

log = logging.getLogger(__name__)

NUM_TEMPLATES = 5
DATASET_SPEC = "dataset.json"  # the settings a complete generated dataset was made with

# Shape colours are >= 80 apart in RGB and far from every background colour. They are also chosen so that
# edge pixels blending a shape colour into a background seldom land nearer another shape colour (a brown
# was dropped for that: red or orange blended into black looks brown), so ``dominant_colour`` of a
# rendered image is its caption's colour; tests/test_synthetic.py checks it on JPEG round trips.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (245, 135, 0),
    "yellow": (245, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 215),
    "purple": (135, 45, 175),
    "pink": (250, 115, 190),
    "teal": (0, 165, 165),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "sky blue": (165, 210, 245),
    "beige": (235, 220, 180),
    "black": (20, 20, 35),
}
KINDS = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "diamond",
    "cross",
    "pentagon",
    "hexagon",
    "crescent",
)
# Kinds the grammar and renderer know beyond KINDS, left out of the default dataset: the "hanok" (a building
# with a curved, upturned roof) is the concept that paper 000's fine-tuning benchmark teaches a base model that
# never saw it (see src/demo/concept.py); datasets that include it are made with ``kinds=ALL_KINDS``.
HELD_OUT_KINDS = ("hanok",)
ALL_KINDS = (*KINDS, *HELD_OUT_KINDS)
SIZES = ("small", "large")
POSITIONS = (
    "center",
    "left",
    "right",
    "top",
    "bottom",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
STYLES = ("flat", "outline", "sketch", "dotted")

# --- the caption grammar ------------------------------------------------------------------------------
# English and Korean phrase tables; every caption of a scene names all six attributes.

EN_POSITION_OF = {  # "... {phrase} of a white background"
    "center": "in the middle",
    "left": "on the left side",
    "right": "on the right side",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
EN_POSITION = {  # "... placed {phrase}"
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
EN_SIZE_ALT = {"small": "small", "large": "big"}
EN_STYLE_DRAWN = {
    "flat": "painted in flat colour",
    "outline": "drawn as an outline",
    "sketch": "drawn as a pencil sketch",
    "dotted": "drawn with dots",
}
EN_STYLE_NOUN = {
    "flat": "A flat painting",
    "outline": "An outline drawing",
    "sketch": "A pencil sketch",
    "dotted": "A dotted drawing",
}
EN_STYLE_ADJ = {"flat": "flat", "outline": "outlined", "sketch": "sketched", "dotted": "dotted"}
EN_STYLE_TAG = {"flat": "flat", "outline": "outline", "sketch": "sketch", "dotted": "dotted"}

KO_KIND = {
    "circle": "원",
    "square": "정사각형",
    "triangle": "삼각형",
    "star": "별",
    "heart": "하트",
    "diamond": "마름모",
    "cross": "십자 모양",
    "pentagon": "오각형",
    "hexagon": "육각형",
    "crescent": "초승달",
    "hanok": "한옥",
}
KO_COLOUR_ADJ = {  # attributive form: "빨간 원"
    "red": "빨간",
    "orange": "주황색",
    "yellow": "노란",
    "green": "초록색",
    "blue": "파란",
    "purple": "보라색",
    "pink": "분홍색",
    "teal": "청록색",
}
KO_COLOUR_NOUN = {  # noun form: "빨간색 원"
    "red": "빨간색",
    "orange": "주황색",
    "yellow": "노란색",
    "green": "초록색",
    "blue": "파란색",
    "purple": "보라색",
    "pink": "분홍색",
    "teal": "청록색",
}
KO_BACKGROUND = {
    "white": "흰색",
    "gray": "회색",
    "sky blue": "하늘색",
    "beige": "베이지색",
    "black": "검은색",
}
KO_SIZE = {"small": "작은", "large": "큰"}
KO_SIZE_ALT = {"small": "조그만", "large": "커다란"}
KO_POSITION = {
    "center": "가운데",
    "left": "왼쪽",
    "right": "오른쪽",
    "top": "위쪽",
    "bottom": "아래쪽",
    "top left": "왼쪽 위",
    "top right": "오른쪽 위",
    "bottom left": "왼쪽 아래",
    "bottom right": "오른쪽 아래",
}
KO_STYLE_REL = {  # relative clause: "윤곽선으로 그린 원"
    "flat": "단색으로 칠한",
    "outline": "윤곽선으로 그린",
    "sketch": "연필로 스케치한",
    "dotted": "점무늬로 채운",
}
KO_STYLE_SENTENCE = {  # predicate: "..., 윤곽선만 그려져 있다"
    "flat": "단색으로 칠해져 있다",
    "outline": "윤곽선만 그려져 있다",
    "sketch": "연필로 스케치되어 있다",
    "dotted": "점무늬로 채워져 있다",
}
KO_STYLE_TAG = {"flat": "단색", "outline": "윤곽선", "sketch": "스케치", "dotted": "점무늬"}

# Shape half-extent as a fraction of the image side; "large" covers about a quarter of the image.
SIZE_RADIUS = {"small": 0.15, "large": 0.27}
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth edges without ringing around the colours
# Depth maps (near = 1): the shape stands in front of a ground plane that recedes from the bottom to the top.
SHAPE_DEPTH = 1.0
GROUND_DEPTH = (0.1, 0.4)  # at the top row, at the bottom row
_CAPTION_WORD = re.compile(r"\w+|[^\w\s]")  # how BERT's basic tokenizer splits: words and single punctuation


@dataclass(frozen=True)
class Scene:
    """One shape on a plain background; the drawing style is chosen separately (see ``render_scene``)."""

    kind: str
    colour: str
    size: str
    position: str
    background: str


def sample_scene(rng: random.Random, kinds: Sequence[str] = KINDS) -> Scene:
    """Draw every attribute uniformly and independently."""
    return Scene(
        kind=rng.choice(kinds),
        colour=rng.choice(list(COLOURS)),
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        background=rng.choice(list(BACKGROUNDS)),
    )


def changed_scene(scene: Scene, attribute: str, rng: random.Random) -> Scene:
    """``scene`` with ``attribute`` set to another of its values (a kind of ``KINDS``); the size, which has one
    other value, takes it without drawing from ``rng``."""
    values = {
        "kind": KINDS,
        "colour": tuple(COLOURS),
        "size": SIZES,
        "position": POSITIONS,
        "background": tuple(BACKGROUNDS),
    }[attribute]
    others = [value for value in values if value != getattr(scene, attribute)]
    return replace(scene, **{attribute: others[0] if len(others) == 1 else rng.choice(others)})


def captions_with_one_change(
    described: Sequence[tuple[Scene, str | None, int]], attribute: str, language: str, rng: random.Random
) -> list[str]:
    """The caption of each (scene, style, template) with only ``attribute`` changed (``changed_scene``), worded
    with the same template and style: a caption a model that reads ``attribute`` should find wrong."""
    return [
        caption_scene(changed_scene(scene, attribute, rng), language, template, style)
        for scene, style, template in described
    ]


def num_attribute_combinations() -> int:
    """How many distinct (scene, style) pairs, hence distinct captions, the grammar can produce."""
    return len(KINDS) * len(COLOURS) * len(SIZES) * len(POSITIONS) * len(BACKGROUNDS) * len(STYLES)


# --- captions -----------------------------------------------------------------------------------------


def _has_final_consonant(word: str) -> bool:
    """Whether the last Hangul syllable has a final consonant (batchim), which picks 을/를, 이/가."""
    last = word[-1]
    return "가" <= last <= "힣" and (ord(last) - ord("가")) % 28 != 0


def _josa(word: str, after_consonant: str, after_vowel: str) -> str:
    return word + (after_consonant if _has_final_consonant(word) else after_vowel)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def caption_scene(scene: Scene, language: str, template: int, style: str | None = None) -> str:
    """Caption ``scene`` in ``language`` ("en" | "ko") with template 0-4; ``style`` is named when given."""
    if language == "en":
        return _caption_en(scene, template % NUM_TEMPLATES, style)
    if language == "ko":
        return _caption_ko(scene, template % NUM_TEMPLATES, style)
    raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")


def _caption_en(scene: Scene, template: int, style: str | None) -> str:
    size, colour, kind, bg = scene.size, scene.colour, scene.kind, scene.background
    if template == 0:
        drawn = f", {EN_STYLE_DRAWN[style]}" if style else ""
        return f"A {size} {colour} {kind} {EN_POSITION_OF[scene.position]} of a {bg} background{drawn}."
    if template == 1:
        noun = EN_STYLE_NOUN[style] if style else "A picture"
        return (
            f"{noun} of a {size} {colour} {kind} on a {bg} background, placed {EN_POSITION[scene.position]}."
        )
    if template == 2:
        drawn = f", {EN_STYLE_DRAWN[style]}," if style else ""
        return (
            f"There is a {EN_SIZE_ALT[size]} {colour} {kind} {EN_POSITION[scene.position]} of the picture"
            f"{drawn} and the background is {bg}."
        )
    if template == 3:
        adjective = f" {EN_STYLE_ADJ[style]}" if style else ""
        return f"{_capitalise(bg)} background with a {size}{adjective} {colour} {kind} {EN_POSITION[scene.position]}."
    tags = [f"{colour} {kind}", size, scene.position] + ([EN_STYLE_TAG[style]] if style else [])
    return ", ".join([*tags, f"{bg} background"])


def _caption_ko(scene: Scene, template: int, style: str | None) -> str:
    kind, bg, position = KO_KIND[scene.kind], KO_BACKGROUND[scene.background], KO_POSITION[scene.position]
    size, colour = KO_SIZE[scene.size], KO_COLOUR_ADJ[scene.colour]
    relative = f"{KO_STYLE_REL[style]} " if style else ""
    if template == 0:
        drawn = KO_STYLE_REL[style] if style else "그린"
        return f"{bg} 배경의 {position}에 있는 {size} {colour} {_josa(kind, '을', '를')} {drawn} 그림."
    if template == 1:
        return f"{relative}{size} {colour} {_josa(kind, '이', '가')} {bg} 배경의 {position}에 있다."
    if template == 2:
        subject = f"{bg} 바탕의 {position}에 {KO_SIZE_ALT[scene.size]} {KO_COLOUR_NOUN[scene.colour]} {_josa(kind, '이', '가')}"
        return f"{subject} 있고, {KO_STYLE_SENTENCE[style]}." if style else f"{subject} 있다."
    if template == 3:
        tags = [f"{KO_COLOUR_NOUN[scene.colour]} {kind}", f"{size} 크기", position]
        tags += [KO_STYLE_TAG[style]] if style else []
        return ", ".join([*tags, f"{bg} 배경"])
    return f"그림의 {position}에 {relative}{size} {colour} {_josa(kind, '이', '가')} 있고 배경은 {_josa(bg, '이다', '다')}."


def scene_captions(scene: Scene, style: str | None) -> tuple[list[str], list[str]]:
    """The 5 English and 5 Korean captions of a scene, one per template."""
    english = [caption_scene(scene, "en", t, style) for t in range(NUM_TEMPLATES)]
    korean = [caption_scene(scene, "ko", t, style) for t in range(NUM_TEMPLATES)]
    return english, korean


@dataclass(frozen=True)
class CaptionedScene:
    """A scene drawn in one style with an English and a Korean caption of the same meaning."""

    scene: Scene
    style: str
    english: str
    korean: str

    def render(self, count: int, image_size: int = 64, seed: int = 0) -> list[Image.Image]:
        """``count`` real drawings of the scene (position, size, rotation and strokes jittered)."""
        return [
            render_scene(self.scene, self.style, image_size, random.Random(f"{seed}/{i}"))
            for i in range(count)
        ]


def colour_caption_set() -> list[CaptionedScene]:
    """Two captioned scenes per colour (a circle and a square), same meaning in both languages."""
    scenes = []
    for colour in COLOURS:
        for kind, background, template in (("circle", "white", 0), ("square", "gray", 1)):
            scene = Scene(kind=kind, colour=colour, size="large", position="center", background=background)
            english = caption_scene(scene, "en", template, "flat")
            korean = caption_scene(scene, "ko", template, "flat")
            scenes.append(CaptionedScene(scene, "flat", english, korean))
    return scenes


# --- tokenizer ----------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Single characters (and their WordPiece continuations) let free English text outside the grammar
# fall back to characters instead of [UNK]; Korean outside the grammar still maps to [UNK].
_FALLBACK_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_PUNCTUATION = ".,!?;:'\"()-/&*"


def caption_vocabulary(kinds: Sequence[str] = KINDS) -> list[str]:
    """Every word and punctuation token the caption grammar can emit for ``kinds``, sorted."""
    words: set[str] = set()
    base = Scene(KINDS[0], next(iter(COLOURS)), SIZES[0], POSITIONS[0], next(iter(BACKGROUNDS)))
    # Each slot's wording (its particles included) depends only on its own value, so varying one
    # attribute at a time reaches every word without enumerating all combinations.
    variants = [base]
    for field, values in (
        ("kind", kinds),
        ("colour", COLOURS),
        ("size", SIZES),
        ("position", POSITIONS),
        ("background", BACKGROUNDS),
    ):
        variants += [Scene(**{**base.__dict__, field: value}) for value in values]
    for scene in variants:
        for style in (None, *STYLES):
            for language in LANGUAGES:
                for template in range(NUM_TEMPLATES):
                    words.update(_CAPTION_WORD.findall(caption_scene(scene, language, template, style)))
    return sorted(words)


def write_tokenizer(out_dir: str | os.PathLike, kinds: Sequence[str] = KINDS) -> Path:
    """Write a cased word-level BERT tokenizer (vocab.txt + tokenizer_config.json) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = list(SPECIAL_TOKENS)
    for token in [*caption_vocabulary(kinds), *_PUNCTUATION, *_FALLBACK_CHARACTERS]:
        if token not in tokens:
            tokens.append(token)
    tokens += [f"##{c}" for c in _FALLBACK_CHARACTERS]
    (out_dir / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "BertTokenizer",
        # Lower-casing (and the accent stripping that comes with it) NFD-decomposes Hangul into jamo,
        # which would turn every Korean word into [UNK]; the vocabulary is cased instead.
        "do_lower_case": False,
        "strip_accents": False,
        "tokenize_chinese_chars": True,
        "model_max_length": 128,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


# --- rendering ----------------------------------------------------------------------------------------


def _regular_polygon(sides: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (
            math.cos(rotation - math.pi / 2 + 2 * math.pi * i / sides),
            math.sin(rotation - math.pi / 2 + 2 * math.pi * i / sides),
        )
        for i in range(sides)
    ]


def _unit_outline(kind: str, rotation: float) -> list[tuple[float, float]]:
    """The shape's closed outline in unit coordinates (roughly within [-1, 1]^2), y pointing down."""
    if kind == "circle":
        return _regular_polygon(72, 0.0)
    if kind == "square":
        return [
            (0.85 * x * math.sqrt(2), 0.85 * y * math.sqrt(2))
            for x, y in _regular_polygon(4, rotation + math.pi / 4)
        ]
    if kind == "triangle":
        return [(x, y + 0.12) for x, y in _regular_polygon(3, rotation)]
    if kind == "pentagon":
        return _regular_polygon(5, rotation)
    if kind == "hexagon":
        return _regular_polygon(6, rotation + math.pi / 6)
    if kind == "diamond":
        return [(0.72 * x, y) for x, y in _regular_polygon(4, 0.0)]
    if kind == "star":
        points = []
        for i in range(10):
            angle = rotation - math.pi / 2 + math.pi * i / 5
            radius = 1.0 if i % 2 == 0 else 0.45
            points.append((radius * math.cos(angle), radius * math.sin(angle) + 0.06))
        return points
    if kind == "cross":
        a, b = 0.34, 0.95
        corners = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        cos, sin = math.cos(rotation), math.sin(rotation)
        return [(x * cos - y * sin, x * sin + y * cos) for x, y in corners]
    if kind == "heart":
        points = []
        for i in range(72):
            t = 2 * math.pi * i / 72
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((x / 16.5, -y / 16.5 + 0.1))
        return points
    if kind == "hanok":
        # A Korean house's silhouette: a roof whose ridge sags and whose eaves turn up at both ends, over walls.
        # The roof is as tall as the walls and much wider, its slope concave, its ridge ends raised.
        slope = [(-0.32 - 0.78 * t, -0.95 + 0.62 * (2 * t - t**2)) for t in np.linspace(0.0, 1.0, 10)]
        left = [(-1.18, -0.5), *reversed(slope), (-0.3, -1.04)]
        roof = [*left, *((-x, y) for x, y in reversed(left))]
        walls = [(1.0, -0.2), (0.66, -0.2), (0.66, 0.72), (-0.66, 0.72), (-0.66, -0.2), (-1.0, -0.2)]
        cos, sin = math.cos(rotation), math.sin(rotation)
        return [(x * cos - y * sin, x * sin + y * cos) for x, y in roof + walls]
    if kind == "crescent":
        # Outer circle (radius 1 at the origin) minus an inner circle (radius r1 at (d, 0)).
        r1, d = 0.82, 0.5
        x = (1 - r1**2 + d**2) / (2 * d)
        y = math.sqrt(1 - x**2)
        phi, psi = math.atan2(y, x), math.atan2(y, x - d)
        outer = [(math.cos(t), math.sin(t)) for t in np.linspace(phi, 2 * math.pi - phi, 48)]
        inner = [(d + r1 * math.cos(t), r1 * math.sin(t)) for t in np.linspace(2 * math.pi - psi, psi, 48)]
        cos, sin = math.cos(rotation), math.sin(rotation)
        # Shifted right so the crescent's mass, not its circle, sits at the requested position.
        return [(0.3 + px * cos - py * sin, px * sin + py * cos) for px, py in outer + inner]
    raise ValueError(f"unknown shape kind {kind!r}; choose from {ALL_KINDS}")


def _centre(position: str, radius: float, side: float, rng: random.Random) -> tuple[float, float]:
    margin = 0.04 * side
    low, high = margin + radius, side - margin - radius
    coordinate = {"left": low, "top": low, "right": high, "bottom": high}
    x = next((coordinate[w] for w in ("left", "right") if w in position), side / 2)
    y = next((coordinate[w] for w in ("top", "bottom") if w in position), side / 2)
    jitter = 0.03 * side
    x = min(high, max(low, x + rng.uniform(-jitter, jitter)))
    y = min(high, max(low, y + rng.uniform(-jitter, jitter)))
    return x, y


def _stroke(size: int, points: list[tuple[float, float]], width: float) -> Image.Image:
    stroke = Image.new("L", (size, size), 0)
    ImageDraw.Draw(stroke).line([*points, points[0]], fill=255, width=max(1, round(width)), joint="curve")
    return stroke


def _paint_mask(
    style: str, fill: Image.Image, points: list[tuple[float, float]], line: float, rng: random.Random
) -> Image.Image:
    """Where the shape colour goes for ``style``: the filled shape, its rim, hatching or dots."""
    size = fill.size[0]
    if style == "flat":
        return fill
    if style == "outline":
        # A stroke centred on the boundary, cut by the fill, is a rim of ``line`` pixels inside the shape.
        return ImageChops.multiply(_stroke(size, points, 2 * line), fill)
    if style == "sketch":
        hatch = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(hatch)
        angle = math.radians(rng.choice((45.0, 135.0)) + rng.uniform(-12, 12))
        dx, dy = math.cos(angle), math.sin(angle)
        spacing, offset = 1.8 * line, rng.uniform(0, 1.8 * line)
        for k in range(-int(2 * size / spacing), int(2 * size / spacing) + 1):
            # Lines perpendicular to (dy, -dx) at distance k * spacing from the image centre.
            cx, cy = size / 2 + (k * spacing + offset) * dy, size / 2 - (k * spacing + offset) * dx
            draw.line(
                [(cx - 2 * size * dx, cy - 2 * size * dy), (cx + 2 * size * dx, cy + 2 * size * dy)],
                fill=255,
                width=round(line),
            )
        sketch = ImageChops.multiply(hatch, fill)
        for _ in range(2):  # two wobbly pencil passes over the contour
            wobbly = [(x + rng.gauss(0, 0.12 * line), y + rng.gauss(0, 0.12 * line)) for x, y in points]
            sketch = ImageChops.lighter(sketch, _stroke(size, wobbly, 0.8 * line))
        return sketch
    if style == "dotted":
        # A hexagonal grid of dots over the shape's bounding box, clipped to the shape, plus a thin rim.
        dots = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(dots)
        spacing, radius = 2.0 * line, 0.8 * line
        xs, ys = [x for x, _ in points], [y for _, y in points]
        phase_x, phase_y = rng.uniform(0, spacing), rng.uniform(0, spacing)
        for row, y in enumerate(
            np.arange(min(ys) - spacing + phase_y, max(ys) + spacing, spacing * math.sqrt(3) / 2)
        ):
            for x in np.arange(
                min(xs) - spacing + phase_x + (row % 2) * spacing / 2, max(xs) + spacing, spacing
            ):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
        rim = _stroke(size, points, 1.0 * line)
        return ImageChops.multiply(ImageChops.lighter(dots, rim), fill)
    raise ValueError(f"unknown drawing style {style!r}; choose from {STYLES}")


def render_scene(
    scene: Scene, style: str = "flat", image_size: int = 64, rng: random.Random | None = None
) -> Image.Image:
    """Draw ``scene`` in ``style`` as an RGB image; ``rng`` jitters position, size, rotation and strokes."""
    canvas, _ = _draw_supersampled(scene, style, image_size, rng)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def render_scene_with_depth(
    scene: Scene, style: str = "flat", image_size: int = 64, rng: random.Random | None = None
) -> tuple[Image.Image, np.ndarray]:
    """``render_scene``'s image (the same for the same ``rng`` state) and its depth map: float32 [H, W] in
    [0, 1], near = 1. The shape's whole silhouette stands in front, whatever its drawing style; behind it a
    ground plane recedes from ``GROUND_DEPTH[1]`` at the bottom to ``GROUND_DEPTH[0]`` at the top, so every map
    has a range (depth-to-image min-max normalises each map)."""
    canvas, fill = _draw_supersampled(scene, style, image_size, rng)
    side = image_size * SUPERSAMPLE
    near, far = GROUND_DEPTH[1], GROUND_DEPTH[0]
    ground = np.linspace(far, near, side, dtype=np.float32)[:, None].repeat(side, axis=1)
    silhouette = np.asarray(fill, dtype=np.float32) / 255.0
    depth = ground * (1.0 - silhouette) + SHAPE_DEPTH * silhouette
    # The same box filter as the image: edge pixels blend shape and ground as their colours do.
    depth = depth.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return image, depth.astype(np.float32)


def _draw_supersampled(
    scene: Scene, style: str, image_size: int, rng: random.Random | None
) -> tuple[Image.Image, Image.Image]:
    """The drawing at ``SUPERSAMPLE`` times the size, and the shape's filled silhouette (mode L) beside it."""
    rng = rng if rng is not None else random.Random(0)
    side = image_size * SUPERSAMPLE
    radius = SIZE_RADIUS[scene.size] * side * rng.uniform(0.92, 1.08)
    cx, cy = _centre(scene.position, radius, side, rng)
    rotation = math.radians(rng.uniform(-12, 12))
    points = [(cx + radius * x, cy + radius * y) for x, y in _unit_outline(scene.kind, rotation)]
    fill = Image.new("L", (side, side), 0)
    ImageDraw.Draw(fill).polygon(points, fill=255)
    # Strokes, hatching and dots are at least ~2.5 output pixels wide so JPEG's halved colour
    # resolution keeps them in the shape's colour instead of blending them into the background.
    line = max(2.5, 0.28 * radius / SUPERSAMPLE) * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    canvas.paste(COLOURS[scene.colour], (0, 0, side, side), _paint_mask(style, fill, points, line, rng))
    return canvas, fill


def dominant_colour(image: Image.Image) -> str | None:
    """The named shape colour most pixels are nearest to, ignoring pixels nearest a background colour."""
    names = list(COLOURS) + list(BACKGROUNDS)
    palette = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    nearest = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))[: len(COLOURS)]
    return names[int(counts.argmax())] if counts.sum() else None


def dominant_background(image: Image.Image) -> str:
    """The background colour most of the image's border pixels are nearest to (shapes rarely reach the border)."""
    palette = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    nearest = ((border[:, None, :] - palette[None, :, :]) ** 2).sum(-1).argmin(1)
    return list(BACKGROUNDS)[int(np.bincount(nearest, minlength=len(palette)).argmax())]


# --- the dataset --------------------------------------------------------------------------------------


def synthetic_sample(
    split: str, index: int, seed: int = 0, image_size: int = 64, kinds: Sequence[str] = KINDS
) -> WebtoonSample:
    """Sample ``index`` of ``split``; each sample has its own RNG, so it does not depend on the others."""
    scene, style, rng = synthetic_scene(split, index, seed, kinds)
    captions_en, captions_ko = scene_captions(scene, style)
    return WebtoonSample(
        key=f"{split}_{index:07d}",
        image=render_scene(scene, style, image_size, rng),
        captions_en=captions_en,
        captions_ko=captions_ko,
        style=style,
        image_id=SPLITS.index(split) * 10_000_000 + index if split in SPLITS else index,
    )


def synthetic_scene(
    split: str, index: int, seed: int = 0, kinds: Sequence[str] = KINDS
) -> tuple[Scene, str, random.Random]:
    """The scene and style of sample ``index`` of ``split``, and its RNG in the state that renders it."""
    # str seeds are hashed with SHA-512 by random.Random: stable across processes and Python runs.
    rng = random.Random(f"webtoon-lab/synthetic/{seed}/{split}/{index}")
    scene = sample_scene(rng, kinds)
    return scene, rng.choice(STYLES), rng


def split_counts(num_samples: int, split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Samples per split: train and val rounded from their fractions, test takes the rest."""
    if len(split_fractions) != len(SPLITS) or any(f < 0 for f in split_fractions):
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers (train, val, test), got {split_fractions}"
        )
    if not math.isclose(sum(split_fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must sum to 1, got {split_fractions} (sum {sum(split_fractions)})")
    train = round(num_samples * split_fractions[0])
    val = min(num_samples - train, round(num_samples * split_fractions[1]))
    return {"train": train, "val": val, "test": num_samples - train - val}


def auto_samples_per_shard(count: int, max_per_shard: int = 1000) -> int:
    """Aim at 8 shards per split (at least 4 once there are 4 samples) so every node and worker gets some."""
    return max(1, min(max_per_shard, count // 8))


def generate_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    image_size: int = 64,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    samples_per_shard: int | None = None,
    kinds: Sequence[str] = KINDS,
) -> dict[str, int]:
    """Write train/val/test shards, sizes.json and ``out_dir/tokenizer/``; return the split counts.

    ``kinds``: the shapes drawn, e.g. ``ALL_KINDS`` to include the held-out concept."""
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {ALL_KINDS}, got {list(kinds)}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = split_counts(num_samples, split_fractions)
    (out_dir / DATASET_SPEC).unlink(missing_ok=True)
    # Forget every split of an earlier run first: an interrupted run then leaves sizes.json without the
    # unfinished splits rather than with the old, wrong counts of shards that no longer exist.
    for split in counts:
        remove_split_shards(out_dir, split)
    forget_splits(out_dir, counts)
    for split, count in counts.items():
        per_shard = samples_per_shard or auto_samples_per_shard(count)
        write_shards(_samples(split, count, seed, image_size, kinds), out_dir, split, per_shard, "jpg")
        log.info("synthetic %s: %d samples in %d shards", split, count, math.ceil(count / per_shard))
    write_tokenizer(out_dir / "tokenizer", kinds)
    # Written last: its presence (with these settings) means the whole dataset is there.
    (out_dir / DATASET_SPEC).write_text(
        json.dumps(_spec(num_samples, seed, image_size, split_fractions, kinds)) + "\n"
    )
    return counts


def ensure_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_samples: int = 5000,
    seed: int = 0,
    image_size: int = 64,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    kinds: Sequence[str] = KINDS,
) -> Path:
    """Generate the dataset into ``out_dir`` unless a complete one with the same settings is already there."""
    out_dir = Path(out_dir)
    spec_file = out_dir / DATASET_SPEC
    wanted = _spec(num_samples, seed, image_size, split_fractions, kinds)
    if spec_file.is_file() and json.loads(spec_file.read_text()) == wanted:
        return out_dir
    log.info("Generating the synthetic bilingual dataset in %s (%d samples)", out_dir, num_samples)
    generate_synthetic_dataset(out_dir, num_samples, seed, image_size, split_fractions, kinds=kinds)
    return out_dir


def _spec(
    num_samples: int, seed: int, image_size: int, split_fractions: Sequence[float], kinds: Sequence[str]
) -> dict:
    spec = {
        "num_samples": num_samples,
        "seed": seed,
        "image_size": image_size,
        "split_fractions": [float(f) for f in split_fractions],
    }
    # Named only when not the default, so datasets generated before kinds existed stay valid.
    return spec | ({"kinds": list(kinds)} if tuple(kinds) != KINDS else {})


def _samples(
    split: str, count: int, seed: int, image_size: int, kinds: Sequence[str]
) -> Iterator[WebtoonSample]:
    for index in range(count):
        yield synthetic_sample(split, index, seed, image_size, kinds)
