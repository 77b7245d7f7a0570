"""Four-sentence stories (thesis chapter II): a caption, continued by a language model with the 3 sentences
that follow it, for the one-panel-per-sentence webtoons of chapter V.

    shards --(captions of one language; a seeded choice of num_captions images)--> prompts from a template
      --> causal LM ``generate`` (seeded sampling) --> the first 3 complete sentences of each continuation
      --> empty and degenerate continuations dropped and counted --> out_dir/stories.jsonl

The thesis had ChatGPT write its stories; stories written by any other tool import from JSON lines with the
same fields (:func:`import_stories`), validated line by line. ``stories.jsonl`` holds one
``{"image_id", "language", "sentences": [4 strings]}`` per line; writing one language keeps the others' lines.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from src.data.pipeline import expand_shards, read_captions
from src.data.schema import LANGUAGES
from src.utils.device import resolve_device
from src.utils.hub import from_pretrained

log = logging.getLogger(__name__)

STORIES_FILE = "stories.jsonl"
STORY_SENTENCES = 4  # the caption and the 3 sentences that continue it
MODEL_SETTING = "model"
# A sentence: text with at least one letter or digit, up to a run of terminal punctuation (and closing quotes).
# Punctuation-only fragments ("tree. . Then") are not sentences and are passed over.
_SENTENCE = re.compile(r"[^.!?。]*\w[^.!?。]*[.!?。]+[\"'”’)\]]*")
_TERMINAL = (".", "!", "?", "。", '"', "'", "”", "’")


@dataclass(frozen=True)
class Story:
    """One story: ``sentences[0]`` is the image's caption, the rest continue it."""

    image_id: int | str
    language: str
    sentences: tuple[str, ...]

    def to_json(self) -> str:
        record = {"image_id": self.image_id, "language": self.language, "sentences": list(self.sentences)}
        return json.dumps(record, ensure_ascii=False)


class DegenerateContinuation(ValueError):
    """A continuation that does not make a story; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- generating -------------------------------------------------------------------------------------------
def generate_stories(
    shards: str | list[str],
    out_dir: str | os.PathLike,
    model: str,
    num_captions: int = 5000,
    language: str = "en",
    prompt: str = "{caption}",
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 96,
    do_sample: bool = True,
    temperature: float = 0.8,
    top_p: float = 0.9,
    device: str | None = None,
) -> dict[str, Any]:
    """Continue ``num_captions`` captions of ``shards`` into 4-sentence stories in ``out_dir/stories.jsonl``.

    The same seed, model, batch size and device give the same stories. Returns the counts: captions, stories
    written, and dropped continuations by reason.
    """
    if language not in LANGUAGES:
        raise ValueError(f"stories.language must be one of {LANGUAGES}, got {language!r}")
    if "{caption}" not in prompt:
        raise ValueError(f"stories.prompt must contain {{caption}}, got {prompt!r}")
    captions = choose_captions(read_first_captions(shards, language), num_captions, seed)
    if not captions:
        raise ValueError(f"No image in {shards!r} has a caption in {language!r}; nothing to continue.")
    if len(captions) < num_captions:
        log.warning(
            "Only %d images have a %s caption (num_captions=%d)", len(captions), language, num_captions
        )
    tokenizer, lm = load_language_model(model, device)

    stories: list[Story] = []
    dropped: Counter[str] = Counter()
    with torch.random.fork_rng(devices=_cuda_devices(lm.device)):
        torch.manual_seed(seed)
        for start in range(0, len(captions), batch_size):
            batch = captions[start : start + batch_size]
            firsts = [as_sentence(caption) for _, caption in batch]
            texts = continue_texts(
                tokenizer,
                lm,
                [prompt.format(caption=first) for first in firsts],
                max_new_tokens=max_new_tokens,
                sampling={"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {},
            )
            for (image_id, _), first, text in zip(batch, firsts, texts, strict=True):
                try:
                    stories.append(Story(image_id, language, (first, *continuation_sentences(first, text))))
                except DegenerateContinuation as error:
                    dropped[error.reason] += 1
            log.info("stories: %d of %d captions continued", start + len(batch), len(captions))
    if not stories:
        raise RuntimeError(
            f"Every one of {len(captions)} continuations was dropped ({dict(dropped)}): check that `model` "
            f"writes {language} text and that stories.max_new_tokens leaves room for 3 sentences."
        )
    path = write_stories(stories, out_dir)
    counts = {"captions": len(captions), "stories": len(stories), "dropped": dict(dropped), "file": str(path)}
    log.info("stories: %s", counts)
    return counts


def read_first_captions(shards: str | list[str], language: str) -> list[tuple[int | str, str]]:
    """``(image_id, first caption in language)`` of every record of ``shards``; images without one are left out."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples())
    found: dict[int | str, str] = {}
    for record in pipeline:  # only the json is read: no image is decoded
        try:
            meta = json.loads(record["json"])
            captions_en, captions_ko = read_captions(meta)
        except (KeyError, ValueError) as error:
            log.warning("stories: skipping record %s (%s)", record.get("__key__"), error)
            continue
        caption = next(
            (c.strip() for c in (captions_en if language == "en" else captions_ko) if c.strip()), None
        )
        image_id = meta.get("image_id")
        if caption is not None:
            found.setdefault(image_id if image_id is not None else record["__key__"], caption)
    return list(found.items())


def choose_captions(
    captions: list[tuple[int | str, str]], num_captions: int, seed: int
) -> list[tuple[int | str, str]]:
    """A seeded choice of ``num_captions`` (all when fewer), in image id order."""
    ordered = sorted(captions, key=_by_image_id)
    chosen = random.Random(seed).sample(ordered, min(num_captions, len(ordered)))
    return sorted(chosen, key=_by_image_id)


def _by_image_id(item: tuple[int | str, str]) -> tuple[bool, int | str]:
    return isinstance(item[0], str), item[0]  # COCO's integer ids in numeric order, string keys after them


def load_language_model(model: str, device: str | None = None) -> tuple[Any, Any]:
    """A causal LM and its tokenizer (hub id or local dir), set up for batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, str(model), MODEL_SETTING)
    # decoder-only models continue from the last token: pad on the left so every prompt ends at the edge
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2 and most causal LMs ship without one
        tokenizer.pad_token = tokenizer.eos_token
    lm = from_pretrained(AutoModelForCausalLM.from_pretrained, str(model), MODEL_SETTING)
    return tokenizer, lm.to(device).eval()


def continue_texts(
    tokenizer: Any, lm: Any, prompts: list[str], max_new_tokens: int, sampling: dict[str, Any]
) -> list[str]:
    """What the model writes after each prompt (special tokens removed)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(lm.device)
    with torch.inference_mode():
        tokens = lm.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    new_tokens = tokens[:, inputs["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def as_sentence(caption: str) -> str:
    """The caption as a story's first sentence: COCO captions often end without a full stop."""
    caption = " ".join(caption.split())
    return caption if caption.endswith(_TERMINAL) else caption + "."


def continuation_sentences(first: str, continuation: str) -> list[str]:
    """The first 3 complete sentences of ``continuation``; a story that would be empty, short or repeat
    itself raises :class:`DegenerateContinuation`."""
    if not continuation.strip():
        raise DegenerateContinuation("empty")
    sentences = [" ".join(s.split()) for s in _SENTENCE.findall(continuation)][: STORY_SENTENCES - 1]
    if len(sentences) < STORY_SENTENCES - 1:
        raise DegenerateContinuation("too_few_sentences")
    if len({_normalized(s) for s in [first, *sentences]}) < STORY_SENTENCES:
        raise DegenerateContinuation("repeated_sentence")
    return sentences


def _normalized(sentence: str) -> str:
    return re.sub(r"\W+", " ", sentence).strip().lower()


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


# ---- importing and writing ----------------------------------------------------------------------------------
def import_stories(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate stories written elsewhere (JSON lines ``{image_id, language, sentences: [4]}``) and write them
    to ``out_dir/stories.jsonl``; a malformed line fails with its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stories.import_jsonl: {path} does not exist")
    stories = read_stories(path)
    if not stories:
        raise ValueError(f"stories.import_jsonl: {path} holds no story")
    written = write_stories(stories, out_dir)
    languages = Counter(story.language for story in stories)
    return {
        "stories": len(stories),
        "languages": dict(languages),
        "imported": str(path),
        "file": str(written),
    }


def read_stories(path: str | os.PathLike, language: str | None = None) -> list[Story]:
    """Every story of a JSON-lines file (only those in ``language`` when given), validated;
    ``ValueError("<file>, line N: ...")`` on the first bad one."""
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"stories language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    stories: list[Story] = []
    seen: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8-sig") as lines:  # files saved on Windows may start with a byte-order mark
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                story = parse_story(json.loads(line))
            except ValueError as error:  # JSONDecodeError is a ValueError
                raise ValueError(f"{path}, line {number}: {error}") from error
            key = (str(story.image_id), story.language)
            if key in seen:
                raise ValueError(
                    f"{path}, line {number}: a second {story.language} story for image {story.image_id} "
                    f"(the first is on line {seen[key]})"
                )
            seen[key] = number
            stories.append(story)
    return [story for story in stories if language is None or story.language == language]


def parse_story(record: Any) -> Story:
    """A story from one decoded JSON line, or ``ValueError`` saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object {{image_id, language, sentences}}, got {type(record).__name__}")
    missing = [name for name in ("image_id", "language", "sentences") if name not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    image_id, language, sentences = record["image_id"], record["language"], record["sentences"]
    if isinstance(image_id, bool) or not isinstance(image_id, int | str) or str(image_id).strip() == "":
        raise ValueError(f"image_id must be an integer or a non-empty string, got {image_id!r}")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    if not isinstance(sentences, list) or len(sentences) != STORY_SENTENCES:
        raise ValueError(f"sentences must be a list of {STORY_SENTENCES} strings, got {sentences!r}")
    if not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ValueError(f"every sentence must be a non-empty string, got {sentences!r}")
    return Story(image_id, language, tuple(s.strip() for s in sentences))


def write_stories(stories: Iterable[Story], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/stories.jsonl``: these stories, and the earlier file's stories in other languages."""
    stories = list(stories)
    path = Path(out_dir) / STORIES_FILE
    languages = {story.language for story in stories}
    kept = [story for story in _existing(path) if story.language not in languages]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(story.to_json() + "\n" for story in [*kept, *stories]), encoding="utf-8")
    os.replace(partial, path)  # a reader never sees half a file
    return path


def _existing(path: Path) -> Iterator[Story]:
    if path.is_file():
        yield from read_stories(path)
