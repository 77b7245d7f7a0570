"""Four-sentence stories of the generated dataset, in English and Korean, for the offline story-strip demo.

A story follows one scene of the test split for 4 sentences. Each later sentence makes one change, and every
story makes each of the three once, in a seeded order: the shape moves, grows or shrinks, or turns another
colour. Every sentence names the whole current scene (shape, colour, size, position, background), so each panel
can be drawn, and judged, from its own sentence:

    A small red circle on the left side of a white background.
    Then the small red circle moves to the top right corner of the white background.
    Next the red circle grows and is now large, in the top right corner of the white background.
    Finally the large circle turns blue in the top right corner of the white background.

The first scene is the scene of test sample ``index`` (``synthetic_sample("test", index, seed)``), whose
``image_id`` the story carries. :func:`write_synthetic_stories` writes ``stories.jsonl`` exactly as
``prepare_data.py source=stories`` does, so the story pipeline reads these stories as it reads real ones.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import cache
from itertools import product
from pathlib import Path

from src.data.schema import WebtoonSample
from src.data.stories import Story, write_stories
from src.demo.synthetic import (
    ALL_KINDS,
    BACKGROUNDS,
    COLOURS,
    EN_POSITION_OF,
    KO_BACKGROUND,
    KO_COLOUR_ADJ,
    KO_COLOUR_NOUN,
    KO_KIND,
    KO_POSITION,
    KO_SIZE,
    POSITIONS,
    SIZES,
    Scene,
    _has_final_consonant,
    _josa,
    caption_scene,
    changed_scene,
    synthetic_sample,
)

__all__ = ["CHANGES", "SyntheticStory", "scene_of", "synthetic_story", "write_synthetic_stories"]

CHANGES = ("position", "size", "colour")  # what a sentence may change; each story changes each once
EN_MOVES_TO = {  # "... moves {phrase} of the white background"
    "center": "to the middle",
    "left": "to the left side",
    "right": "to the right side",
    "top": "to the top",
    "bottom": "to the bottom",
    "top left": "to the top left corner",
    "top right": "to the top right corner",
    "bottom left": "to the bottom left corner",
    "bottom right": "to the bottom right corner",
}
EN_THEN = ("Then", "Next", "Finally")
KO_THEN = ("그다음", "이어서", "마지막으로")
_FIRST_EN_TEMPLATE = 0  # "A small red circle on the left side of a white background."
_FIRST_KO_TEMPLATE = 1  # "작은 빨간 원이 흰색 배경의 왼쪽에 있다."


@dataclass(frozen=True)
class SyntheticStory:
    """A story of 4 scenes, told in English and Korean; ``style`` is the drawing style of its test sample."""

    image_id: int
    style: str
    scenes: tuple[Scene, ...]
    english: tuple[str, ...]
    korean: tuple[str, ...]

    def stories(self) -> list[Story]:
        """The story as ``stories.jsonl`` holds it: one :class:`Story` per language."""
        return [Story(self.image_id, "en", self.english), Story(self.image_id, "ko", self.korean)]


def synthetic_story(index: int, seed: int = 0) -> SyntheticStory:
    """The story that starts from test sample ``index`` of the dataset generated with ``seed`` (deterministic)."""
    sample = synthetic_sample("test", index, seed)
    scenes = [scene_of(sample)]
    rng = random.Random(f"webtoon-lab/stories/{seed}/{index}")
    for change in rng.sample(CHANGES, len(CHANGES)):
        scenes.append(changed_scene(scenes[-1], change, rng))
    english = [caption_scene(scenes[0], "en", _FIRST_EN_TEMPLATE)]
    korean = [caption_scene(scenes[0], "ko", _FIRST_KO_TEMPLATE)]
    for step, (before, after) in enumerate(zip(scenes, scenes[1:], strict=False)):
        english.append(f"{EN_THEN[step]} {english_change(before, after)}")
        korean.append(f"{KO_THEN[step]} {korean_change(before, after)}")
    return SyntheticStory(sample.image_id, sample.style, tuple(scenes), tuple(english), tuple(korean))


def write_synthetic_stories(out_dir: str | os.PathLike, num_stories: int, seed: int = 0) -> Path:
    """``out_dir/stories.jsonl`` with the stories of test samples ``0 .. num_stories - 1``, in both languages."""
    if num_stories < 1:
        raise ValueError(f"num_stories must be >= 1, got {num_stories}")
    stories = [synthetic_story(index, seed) for index in range(num_stories)]
    return write_stories([story for told in stories for story in told.stories()], out_dir)


# ---- the scenes ---------------------------------------------------------------------------------------------
def scene_of(sample: WebtoonSample) -> Scene:
    """The scene a generated sample shows: the one whose caption is the sample's first caption."""
    scene = _scenes_by_caption(sample.style).get(sample.captions_en[0])
    if scene is None:
        raise ValueError(f"sample {sample.key} was not made by the synthetic caption grammar")
    return scene


@cache
def _scenes_by_caption(style: str) -> dict[str, Scene]:
    # Every caption names all attributes, so a caption has one scene; the grammar has ~8k scenes per style.
    scenes = (
        Scene(kind=kind, colour=colour, size=size, position=position, background=background)
        for kind, colour, size, position, background in product(
            ALL_KINDS, COLOURS, SIZES, POSITIONS, BACKGROUNDS
        )
    )
    return {caption_scene(scene, "en", 0, style): scene for scene in scenes}


# ---- the sentences ------------------------------------------------------------------------------------------
def english_change(before: Scene, after: Scene) -> str:
    """What happens between two scenes, naming the whole scene after it (without the connective)."""
    background = f"of the {after.background} background"
    if after.position != before.position:
        shape = f"{after.size} {after.colour} {after.kind}"
        return f"the {shape} moves {EN_MOVES_TO[after.position]} {background}."
    where = f"{EN_POSITION_OF[after.position]} {background}"
    if after.size != before.size:
        grows = "grows" if after.size == "large" else "shrinks"
        return f"the {after.colour} {after.kind} {grows} and is now {after.size}, {where}."
    return f"the {after.size} {after.kind} turns {after.colour} {where}."


def korean_change(before: Scene, after: Scene) -> str:
    """The Korean of :func:`english_change`."""
    kind, position = KO_KIND[after.kind], KO_POSITION[after.position]
    place = f"{KO_BACKGROUND[after.background]} 배경의 {position}"
    if after.position != before.position:
        subject = _josa(f"{KO_SIZE[after.size]} {KO_COLOUR_ADJ[after.colour]} {kind}", "이", "가")
        return f"{subject} {KO_BACKGROUND[after.background]} 배경의 {_towards(position)} 움직인다."
    if after.size != before.size:
        grows = "커져" if after.size == "large" else "작아져"
        subject = _josa(f"{KO_COLOUR_ADJ[after.colour]} {kind}", "이", "가")
        return f"{subject} {place}에서 {grows} {_josa(f'{KO_SIZE[after.size]} {kind}', '이', '가')} 된다."
    subject = _josa(f"{KO_SIZE[after.size]} {kind}", "이", "가")
    return f"{subject} {place}에서 {_towards(KO_COLOUR_NOUN[after.colour])} 바뀐다."


def _towards(word: str) -> str:
    """``word`` with the particle of direction: 으로 after a final consonant other than ㄹ, else 로."""
    final_rieul = _has_final_consonant(word) and (ord(word[-1]) - ord("가")) % 28 == 8
    return word + ("으로" if _has_final_consonant(word) and not final_rieul else "로")
