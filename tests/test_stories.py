"""4-sentence stories: a tiny random causal LM saved offline continues captions; JSONL import is validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_samples
from hydra_runs import compose_plain

from src.data.shards import write_shards
from src.data.stories import (
    STORIES_FILE,
    DegenerateContinuation,
    continuation_sentences,
    generate_stories,
    import_stories,
    read_stories,
)
from src.utils.hub import MissingWeightsError

# Few words and two full stops: a random model ends a sentence every few tokens.
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "red",
    "mat",
    "tree",
    "sky",
    "picture",
    "그림",
    "고양이",
    "나무",
    ".",
    "!",
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A random GPT-2 and a word-level tokenizer, saved as ``save_pretrained`` writes a hub model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_lm")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.decoder = decoders.WordPiece(cleanup=True)  # "a tree ." -> "a tree."
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    # no end-of-sequence id: the random model would stop at [EOS] after a dozen tokens
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=None,
        pad_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    """12 samples with captions "picture i" / "그림 i", image ids 0..11, in two splits."""
    out = tmp_path_factory.mktemp("caption_shards")
    samples = make_samples(12)
    write_shards(samples[:8], out, "train", samples_per_shard=5)
    write_shards(samples[8:], out, "test", samples_per_shard=5)
    return out


def prepare_data(overrides: list[str]) -> dict:
    from test_captioning import load_prepare_data

    module = load_prepare_data()
    argv = module.hydra_overrides(["prepare_data.py", *overrides])
    return module.main(compose_plain("prepare_data.yaml", argv[1:]))


def stories_command(caption_shards: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "source=stories",
        f"shards={caption_shards}/{{train,test}}-*.tar",
        f"out_dir={out}",
        f"model={model}",  # the documented short form of stories.model
        "num_captions=10",
        "stories.batch_size=4",
        "stories.max_new_tokens=48",
        *extra,
    ]


def story_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / STORIES_FILE).read_text(encoding="utf-8").splitlines()]


def test_stories_command_continues_each_caption_with_three_sentences(caption_shards, tiny_lm, tmp_path):
    """python prepare_data.py source=stories shards=PATTERN out_dir=OUT model=LM num_captions=N"""
    counts = prepare_data(stories_command(caption_shards, tmp_path, tiny_lm))
    lines = story_lines(tmp_path)
    assert counts["captions"] == 10 and counts["stories"] == len(lines) > 0
    assert counts["stories"] + sum(counts["dropped"].values()) == 10
    assert set(counts["dropped"]) <= {"empty", "too_few_sentences", "repeated_sentence"}
    for line in lines:
        assert set(line) == {"image_id", "language", "sentences"} and line["language"] == "en"
        assert line["image_id"] in range(12) and len(line["sentences"]) == 4
        assert line["sentences"][0] == f"picture {line['image_id']}."  # the caption opens the story
        for sentence in line["sentences"][1:]:
            assert sentence[-1] in ".!" and set(sentence.rstrip(".!").split()) <= set(WORDS)
    assert [line["image_id"] for line in lines] == sorted(line["image_id"] for line in lines)

    # deterministic for a seed; another seed writes other stories
    first = (tmp_path / STORIES_FILE).read_bytes()
    prepare_data(stories_command(caption_shards, tmp_path, tiny_lm))
    assert (tmp_path / STORIES_FILE).read_bytes() == first
    prepare_data(stories_command(caption_shards, tmp_path, tiny_lm, "seed=1"))
    assert (tmp_path / STORIES_FILE).read_bytes() != first


def test_korean_stories_join_the_english_ones(caption_shards, tiny_lm, tmp_path):
    prepare_data(stories_command(caption_shards, tmp_path, tiny_lm, "num_captions=4"))
    english = story_lines(tmp_path)
    counts = prepare_data(stories_command(caption_shards, tmp_path, tiny_lm, "stories.language=ko"))
    lines = story_lines(tmp_path)
    korean = [line for line in lines if line["language"] == "ko"]
    assert [line for line in lines if line["language"] == "en"] == english  # kept
    assert len(korean) == counts["stories"] > 0
    assert all(line["sentences"][0] == f"그림 {line['image_id']}." for line in korean)


def test_sentences_are_cut_from_the_continuation_and_degenerate_ones_dropped():
    first = "A cat sits on a mat."
    assert continuation_sentences(first, " It purrs. The sun sets!  Night falls? And then") == [
        "It purrs.",
        "The sun sets!",
        "Night falls?",
    ]
    # punctuation-only fragments are not sentences; line breaks are spaces
    assert continuation_sentences(first, "It\npurrs. . ! The sun sets... Night falls.") == [
        "It purrs.",
        "The sun sets...",
        "Night falls.",
    ]
    assert continuation_sentences("고양이가 앉아 있다.", " 고양이는 잠이 든다. 해가 진다. 밤이 온다.") == [
        "고양이는 잠이 든다.",
        "해가 진다.",
        "밤이 온다.",
    ]
    for continuation, reason in [
        ("   ", "empty"),
        ("It purrs. The sun sets", "too_few_sentences"),
        ("It purrs. It purrs! Night falls.", "repeated_sentence"),
        ("A cat sits on a mat! It purrs. Night falls.", "repeated_sentence"),
    ]:
        with pytest.raises(DegenerateContinuation) as error:
            continuation_sentences(first, continuation)
        assert error.value.reason == reason


def test_a_run_where_every_continuation_is_dropped_stops_with_a_clear_message(
    caption_shards, tiny_lm, tmp_path
):
    with pytest.raises(RuntimeError, match=r"Every one of 3 continuations was dropped.*too_few_sentences"):
        generate_stories(
            str(caption_shards / "*.tar"), tmp_path, str(tiny_lm), num_captions=3, max_new_tokens=1
        )
    assert not (tmp_path / STORIES_FILE).exists()


def test_model_on_the_command_line_means_the_stories_model():
    from test_captioning import load_prepare_data

    argv = ["prepare_data.py", "source=stories", "model=skt/kogpt2-base-v2", "+model=gpt2"]
    assert load_prepare_data().hydra_overrides(argv)[2:] == [
        "stories.model=skt/kogpt2-base-v2",
        "stories.model=gpt2",
    ]


def test_a_missing_model_names_the_setting(caption_shards, tmp_path, user_error):
    with pytest.raises(MissingWeightsError, match="Cannot load weights for `model`"):
        generate_stories(str(caption_shards / "*.tar"), tmp_path, str(tmp_path / "no_lm"), num_captions=2)
    with user_error("needs model="):
        prepare_data(["source=stories", f"shards={caption_shards}/*.tar", f"out_dir={tmp_path}"])


# ---- stories written elsewhere (the thesis used ChatGPT) -----------------------------------------------------
def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a byte-order mark
    return path


GOOD = [
    json.dumps(
        {"image_id": 9, "language": "en", "sentences": ["A cat.", "It naps.", "It wakes.", "It eats."]}
    ),
    "",
    json.dumps(
        {
            "image_id": 9,
            "language": "ko",
            "sentences": ["고양이.", "잔다.", "깬다.", "먹는다."],
            "source": "chatgpt",
        },
        ensure_ascii=False,
    ),
    json.dumps(
        {"image_id": "COCO_val2014_000000000042", "language": "en", "sentences": ["a", "b", "c", "d"]}
    ),
]


def test_stories_import_command_validates_and_writes_the_stories(tmp_path):
    """python prepare_data.py source=stories stories.import_jsonl=FILE out_dir=OUT"""
    source = write_jsonl(tmp_path / "chatgpt.jsonl", GOOD)
    counts = prepare_data(["source=stories", f"stories.import_jsonl={source}", f"out_dir={tmp_path / 'out'}"])
    assert counts["stories"] == 3 and counts["languages"] == {"en": 2, "ko": 1}
    lines = story_lines(tmp_path / "out")
    assert lines[1] == {
        "image_id": 9,
        "language": "ko",
        "sentences": ["고양이.", "잔다.", "깬다.", "먹는다."],
    }
    assert read_stories(tmp_path / "out" / STORIES_FILE)[2].image_id == "COCO_val2014_000000000042"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"image_id": 1, "language": "en", "sentences": ["a", "b", "c"', "Expecting"),
        ('{"image_id": 1, "language": "en", "sentences": ["a", "b", "c"]}', "list of 4 strings"),
        ('{"image_id": 1, "language": "fr", "sentences": ["a", "b", "c", "d"]}', "language must be one of"),
        ('{"image_id": 1, "language": "en", "sentences": ["a", " ", "c", "d"]}', "non-empty string"),
        ('{"language": "en", "sentences": ["a", "b", "c", "d"]}', "missing image_id"),
        ('["a", "b", "c", "d"]', "expected an object"),
        (GOOD[0], "a second en story for image 9 \\(the first is on line 1\\)"),
    ],
)
def test_a_malformed_import_fails_with_the_line_number(tmp_path, bad_line, message):
    source = write_jsonl(tmp_path / "stories.jsonl", [*GOOD, bad_line, GOOD[3]])
    with pytest.raises(ValueError, match=rf"stories.jsonl, line 5: .*{message}"):
        import_stories(source, tmp_path / "out")
    assert not (tmp_path / "out" / STORIES_FILE).exists()
