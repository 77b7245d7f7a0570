"""Synthetic 4-sentence stories: deterministic, one change per sentence, every sentence naming its whole scene
in English and Korean, written as ``prepare_data.py source=stories`` writes them."""

from __future__ import annotations

import json
import re
from dataclasses import astuple, fields

import pytest

from src.data.stories import STORY_SENTENCES, import_stories, read_stories
from src.demo.stories import CHANGES, EN_MOVES_TO, synthetic_story, write_synthetic_stories
from src.demo.synthetic import (
    BACKGROUNDS,
    COLOURS,
    EN_POSITION_OF,
    KINDS,
    KO_BACKGROUND,
    KO_COLOUR_ADJ,
    KO_COLOUR_NOUN,
    KO_KIND,
    KO_POSITION,
    KO_SIZE,
    POSITIONS,
    SIZES,
    scene_captions,
    synthetic_sample,
)

STORIES = [synthetic_story(index, seed) for seed in (0, 1) for index in range(12)]
_KO_PLACE = re.compile(r"배경의 (.+?)(?:에서|에|으로|로) ")


def english_scene(sentence: str) -> tuple[set[str], ...]:
    """Every (kind, colour, size, position, background) value the sentence names."""
    backgrounds = {b for b in BACKGROUNDS if f"{b} background" in sentence}
    rest = sentence
    for background in backgrounds:  # "sky blue" must not count as the colour blue
        rest = rest.replace(f"{background} background", "")
    words = set(re.findall(r"\w+", rest))
    # every place phrase ends in "of (the|a) ... background": "to the top of" is not in "to the top right ... of"
    positions = {
        p for p in POSITIONS if any(f"{t[p]} of " in sentence for t in (EN_POSITION_OF, EN_MOVES_TO))
    }
    return set(KINDS) & words, set(COLOURS) & words, set(SIZES) & words, positions, backgrounds


def korean_scene(sentence: str) -> tuple[set[str], ...]:
    place = _KO_PLACE.search(sentence)
    return (
        {k for k in KINDS if KO_KIND[k] in sentence},
        {c for c in COLOURS if KO_COLOUR_ADJ[c] in sentence or KO_COLOUR_NOUN[c] in sentence},
        {s for s in SIZES if f"{KO_SIZE[s]} " in sentence},
        {p for p in POSITIONS if place and KO_POSITION[p] == place.group(1)},
        {b for b in BACKGROUNDS if f"{KO_BACKGROUND[b]} 배경" in sentence},
    )


def test_stories_are_deterministic_and_start_from_their_test_sample():
    assert synthetic_story(3) == synthetic_story(3)
    assert synthetic_story(3, seed=1) == synthetic_story(3, seed=1)
    assert len({story.english for story in STORIES}) == len(STORIES)
    for index in (0, 5):
        story, sample = synthetic_story(index, seed=1), synthetic_sample("test", index, seed=1)
        assert story.image_id == sample.image_id and story.style == sample.style
        assert scene_captions(story.scenes[0], story.style) == (sample.captions_en, sample.captions_ko)


def test_four_sentences_per_language():
    for story in STORIES:
        assert len(story.scenes) == len(story.english) == len(story.korean) == STORY_SENTENCES == 4
        assert all(s.strip() and s.endswith(".") for s in story.english + story.korean)
        assert len(set(story.english)) == len(set(story.korean)) == 4


def test_consecutive_scenes_differ_in_exactly_one_of_position_size_colour():
    for story in STORIES:
        changes = []
        for before, after in zip(story.scenes, story.scenes[1:], strict=False):
            differ = [f.name for f in fields(before) if getattr(before, f.name) != getattr(after, f.name)]
            assert len(differ) == 1 and differ[0] in CHANGES, (before, after)
            changes.append(differ[0])
        assert sorted(changes) == sorted(CHANGES)  # moves, resizes and recolours once each


@pytest.mark.parametrize("language", ["en", "ko"])
def test_each_sentence_names_its_whole_scene_and_nothing_else(language):
    named = english_scene if language == "en" else korean_scene
    for story in STORIES:
        sentences = story.english if language == "en" else story.korean
        for sentence, scene in zip(sentences, story.scenes, strict=True):
            expected = tuple({value} for value in astuple(scene))  # kind, colour, size, position, background
            assert named(sentence) == expected, sentence


def test_korean_particles_follow_the_last_syllable():
    korean = " ".join(sentence for story in STORIES for sentence in story.korean)
    # 이 / 으로 after a final consonant, 가 / 로 after a vowel; both kinds of word occur in these stories
    assert re.search(r"(원|별|형|양|달)이 ", korean) and re.search(r"(하트|마름모)가 ", korean)
    assert re.search(r"(쪽|색)으로 ", korean) and re.search(r"(운데|위|래)로 ", korean)
    assert not re.search(r"(하트|마름모)이 |(원|별|형|양|달)가 ", korean)
    assert not re.search(r"(쪽|색)로 |(운데|위|래)으로 ", korean)


def test_the_file_round_trips_through_the_story_reader(tmp_path):
    path = write_synthetic_stories(tmp_path / "out", num_stories=5, seed=1)
    assert path == tmp_path / "out" / "stories.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 10 and all(set(r) == {"image_id", "language", "sentences"} for r in records)

    stories = read_stories(path)
    expected = [told for index in range(5) for told in synthetic_story(index, seed=1).stories()]
    assert stories == expected
    korean = read_stories(path, language="ko")
    assert [s.sentences for s in korean] == [synthetic_story(i, seed=1).korean for i in range(5)]
    assert import_stories(path, tmp_path / "imported")["languages"] == {"en": 5, "ko": 5}
    assert read_stories(tmp_path / "imported" / "stories.jsonl") == stories


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_stories must be >= 1"):
        write_synthetic_stories(tmp_path, num_stories=0)
    path = write_synthetic_stories(tmp_path, num_stories=1)
    with pytest.raises(ValueError, match="language must be one of en, ko"):
        read_stories(path, language="fr")
