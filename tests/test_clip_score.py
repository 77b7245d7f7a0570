"""CLIP score judges loaded from local directories, pinned to torchmetrics' definition computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import write_clip_tokenizer

from src.metrics.clip_score import load_clip_judge
from src.utils.hub import MissingWeightsError

PROMPTS = [
    "a photo of the red house",
    "blue fire",
    "hanok painting",
    "a house in fire",
    "red",
    "the blue house",
]


def write_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """A random ``CLIPModel`` for 32 px images with its ``CLIPProcessor``, as ``save_pretrained`` writes them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_clip_tokenizer(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def write_tiny_dual_encoder(out_dir: Path) -> Path:
    """A random ``VisionTextDualEncoderModel`` (BERT + ViT) with a bilingual WordPiece vocabulary, saved as
    ``DualEncoder.export`` saves the project's CLIP."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
        ViTConfig,
        ViTImageProcessor,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    words = ["a", "photo", "of", "the", "red", "house", "빨간", "집", "사진"]
    (out_dir / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    tokenizer = BertTokenizer.from_pretrained(out_dir, do_lower_case=False)  # lower-casing splits Hangul
    vision = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    )
    model.save_pretrained(out_dir)
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32})
    VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        out_dir
    )
    return out_dir


def reference_scores(
    model, processor, images: torch.Tensor, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics' formula by hand, per pair: max(100 * cos(E_image, E_prompt), 0), and the raw 100 * cos."""
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
        text_features = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    return (100 * cosine).clamp(min=0), 100 * cosine


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(PROMPTS), 3, 32, 32), generator=generator, dtype=torch.uint8)
    images[0] = 0
    images[1, 0] = 255
    images[2] = 255
    return images


def test_score_is_100_cosine_floored_per_pair_then_averaged(clip_dir, images):
    from transformers import CLIPModel, CLIPProcessor

    expected, raw = reference_scores(
        CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir), images, PROMPTS
    )
    assert (raw < 0).any() and (raw > 0).any()  # the floor has work to do on some pairs only

    scores = load_clip_judge(str(clip_dir))(images, PROMPTS)

    assert scores.per_pair == pytest.approx(expected.tolist(), abs=1e-4)
    assert float(scores.mean) == pytest.approx(float(expected.mean()), abs=1e-4)
    assert scores.per_pair[raw < 0].eq(0).all()
    # floored pair by pair, so more than torchmetrics' code gives (it floors only the mean)
    assert float(scores.mean) > max(float(raw.mean()), 0.0)


def test_uint8_float_and_pil_images_score_alike(clip_dir, images):
    judge = load_clip_judge(str(clip_dir))
    as_uint8 = judge(images, PROMPTS).per_pair
    as_float = judge(images.float() / 255, PROMPTS).per_pair
    as_pil = judge(
        [Image.fromarray(np.ascontiguousarray(i.permute(1, 2, 0).numpy())) for i in images], PROMPTS
    )
    assert as_float.tolist() == pytest.approx(as_uint8.tolist(), abs=1e-4)
    assert as_pil.per_pair.tolist() == pytest.approx(as_uint8.tolist(), abs=1e-4)


def test_long_prompts_are_truncated_by_the_tokenizer(clip_dir, images):
    judge = load_clip_judge(str(clip_dir))
    long_prompt = " ".join(["red house"] * 20)  # well past the 16 positions of the tiny text tower
    scores = judge(images[:1], [long_prompt])
    assert 0 <= float(scores.mean) <= 100


def test_bilingual_dual_encoder_export_is_a_judge(tmp_path, images):
    from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    out = write_tiny_dual_encoder(tmp_path / "dual")
    prompts = ["a photo of the red house", "빨간 집", "집 사진", "red", "the house", "사진"]
    expected, _ = reference_scores(
        VisionTextDualEncoderModel.from_pretrained(out),
        VisionTextDualEncoderProcessor.from_pretrained(out),
        images,
        prompts,
    )
    scores = load_clip_judge(str(out))(images, prompts)
    assert scores.per_pair.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert scores.per_pair.shape == (len(prompts),)


def test_missing_judge_names_the_id_and_the_setting():
    with pytest.raises(MissingWeightsError) as error:
        load_clip_judge("someone/no-such-clip", setting="callbacks.validation_prompts.judge")
    message = str(error.value)
    assert "someone/no-such-clip" in message
    assert "callbacks.validation_prompts.judge=/path/to/local/copy" in message


def test_a_model_that_is_not_clip_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model"):
        load_clip_judge(str(tmp_path))
