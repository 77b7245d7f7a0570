"""BLIP captioning as a data stage (``prepare_data.py source=captions``), with a tiny BLIP saved offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra_runs import ROOT
from PIL import Image

from src.data.captioning import caption_images, replace_phrases
from src.utils.hub import MissingWeightsError

WORDS = ["a", "building", "with", "roof", "house", "tree", "sky", "photo", "of", "the", "red", "and", "on"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A random BLIP captioner and its processor, as ``save_pretrained`` writes Salesforce/blip-*."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]"]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # BLIP starts decoding from [DEC], a special token of its tokenizer, so decoded captions drop it
    tokenizer = BertTokenizer.from_pretrained(out, bos_token="[DEC]")
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "bos_token_id": vocab.index("[DEC]"),
        "eos_token_id": tokenizer.sep_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    }
    torch.manual_seed(0)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
    BlipForConditionalGeneration(config).save_pretrained(out)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture
def images_dir(tmp_path) -> Path:
    """Three good images, one truncated PNG, one image captioned by hand earlier."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        Image.new("RGB", (40, 30), colour).save(folder / f"good_{i}.png")
    Image.new("RGB", (40, 30), (9, 9, 9)).save(folder / "hand.jpg")
    (folder / "hand.txt").write_text("a * drawn by hand\n")
    good = (folder / "good_0.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])
    return folder


def sidecars(folder: Path) -> dict[str, str]:
    return {path.stem: path.read_text().strip() for path in sorted(folder.glob("*.txt"))}


# ---- the replacement, on known captions ------------------------------------------------------------------
def test_replace_phrases_on_known_captions():
    subject = {"a building with a roof": "*"}
    assert replace_phrases("a building with a roof next to a tree", subject) == "* next to a tree"
    assert replace_phrases("A Building With A Roof", subject) == "*"
    assert replace_phrases("a tree in the snow", subject) == "a tree in the snow"
    # the longer phrase wins over the shorter one it contains; a replacement is not replaced again
    assert (
        replace_phrases("a building with a roof and a building", {"a building": "X", **subject}) == "* and X"
    )
    assert replace_phrases("a house", {"a house": "a house of *"}) == "a house of *"
    # whole words only: "a cat" is not inside "a catalogue"
    assert replace_phrases("a catalogue of a cat", {"a cat": "*"}) == "a catalogue of *"
    assert replace_phrases("anything", {}) == "anything"
    with pytest.raises(ValueError, match="empty phrase"):
        replace_phrases("a house", {" ": "*"})


def test_a_json_replace_override_reaches_hydra_as_a_string():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    prepare_data = load_prepare_data()
    argv = ["prepare_data.py", "source=captions", """replace={"a man's ${hat}": "*"}""", "replace={a b: c}"]
    quoted = prepare_data.quote_json_overrides(argv)
    assert quoted[:2] == argv[:2] and quoted[3] == argv[3]  # Hydra's own dict syntax is left alone
    value = OverridesParser.create().parse_override(quoted[2]).value()
    from omegaconf import OmegaConf

    decoded = OmegaConf.create({"replace": value}).replace  # OmegaConf turns "\${" back into "${"
    assert json.loads(decoded) == {"a man's ${hat}": "*"}


# ---- the stage end to end -------------------------------------------------------------------------------
def load_prepare_data():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_prepare_data(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="prepare_data", overrides=["source=captions", *overrides])
    return load_prepare_data().main(cfg)


def test_prepare_data_captions_every_good_image_once(images_dir, tiny_blip):
    counts = run_prepare_data([f"images_dir={images_dir}", f"captioner={tiny_blip}", "batch_size=2"])
    assert counts == {
        "images": 5,
        "captioned": 3,
        "already_captioned": 1,
        "without_replacement": 0,
        "skipped": {"bad_image": 1},
    }
    written = sidecars(images_dir)
    assert sorted(written) == ["good_0", "good_1", "good_2", "hand"]
    assert written["hand"] == "a * drawn by hand"  # kept
    assert all(written[f"good_{i}"] and set(written[f"good_{i}"].split()) <= set(WORDS) for i in range(3))

    # a second run finds them all captioned and loads no model
    counts = run_prepare_data([f"images_dir={images_dir}", "captioner=/no/such/model"])
    assert counts["captioned"] == 0 and counts["already_captioned"] == 4

    # the subject's phrase -> the placeholder: take a phrase the (random) captioner did write
    phrase = " ".join(written["good_0"].split()[:2])
    counts = run_prepare_data(
        [f"images_dir={images_dir}", f"captioner={tiny_blip}", f"replace={{{phrase}: '*'}}", "overwrite=true"]
    )
    assert counts["captioned"] == 4 and counts["already_captioned"] == 0
    rewritten = sidecars(images_dir)
    assert (
        rewritten["good_0"] == replace_phrases(written["good_0"], {phrase: "*"})
        and "*" in rewritten["good_0"]
    )
    assert counts["without_replacement"] == sum("*" not in caption for caption in rewritten.values())


def test_missing_captioner_gives_one_clear_error(images_dir, tmp_path, user_error):
    with pytest.raises(MissingWeightsError, match="Cannot load weights for `captioner`") as error:
        caption_images(images_dir, captioner=str(tmp_path / "no_blip"))
    assert "no_blip" in str(error.value)
    with user_error("needs images_dir"):
        run_prepare_data([])


@pytest.mark.slow  # a fresh interpreter: torch, transformers and lightning imports
def test_the_documented_command_with_a_json_replace(images_dir, tiny_blip):
    caption_images(images_dir, captioner=str(tiny_blip))
    original = sidecars(images_dir)["good_1"]
    phrase = " ".join(original.split()[-2:])
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prepare_data.py"),
            "source=captions",
            "images_dir=images",
            f"captioner={tiny_blip}",
            "replace=" + json.dumps({phrase: "*"}),
            "overwrite=true",
        ],
        cwd=images_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout[result.stdout.index("{\n") :])
    assert printed["images_dir"] == str(images_dir)
    assert printed["captioned"] == 4 and printed["skipped"] == {"bad_image": 1}
    written = sidecars(images_dir)
    assert written["good_1"] == replace_phrases(original, {phrase: "*"}) and written["good_1"].endswith("*")
