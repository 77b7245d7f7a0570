"""A multilingual text encoder made to speak to a Stable Diffusion UNet: AltCLIP's text tower.

AltCLIP and AltDiffusion (Chen et al. 2022) give a multilingual encoder (XLM-R) a LayerNorm and a linear map to the
width the UNet's cross-attention reads, and use its per-token states as the prompt context. transformers ships that
architecture as ``AltCLIPTextModel`` (its output 0 is the projected states), so a pipeline directory holding one
loads in ``StableDiffusionPipeline.from_pretrained`` unchanged and a Korean prompt reaches the UNet directly.

This file builds such a student from an encoder users already have: XLM-R (AltCLIP's own starting point), mBERT,
or the text tower of the project's bilingual CLIP (its transformers export). BERT differs from XLM-R only in where
positions start (XLM-R counts from ``pad_token_id + 1``), so BERT weights move over with their position table
shifted; nothing else is converted. The projection starts random, as it does in AltCLIP.
"""

from __future__ import annotations

from typing import Any

from src.utils.hub import from_pretrained

__all__ = ["altclip_student", "bilingual_student", "load_text_tower"]

SUPPORTED = ("bert", "xlm-roberta", "roberta")


def load_text_tower(name_or_path: str, setting: str) -> tuple[Any, Any]:
    """A multilingual encoder and its tokenizer: a hub id or directory of BERT / XLM-R, or of a dual encoder
    (the project's CLIP export, ``VisionTextDualEncoderModel``), whose text tower is taken."""
    from transformers import AutoModel, AutoTokenizer

    model = from_pretrained(AutoModel.from_pretrained, str(name_or_path), setting)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, str(name_or_path), setting)
    encoder = getattr(model, "text_model", model)
    if encoder.config.model_type not in SUPPORTED:
        raise ValueError(
            f"{setting}={name_or_path} is a {encoder.config.model_type} model; the student starts from one of "
            f"{', '.join(SUPPORTED)} (e.g. FacebookAI/xlm-roberta-base, google-bert/bert-base-multilingual-cased, "
            "or the project's CLIP export)"
        )
    return encoder, tokenizer


def altclip_student(encoder: Any, project_dim: int) -> Any:
    """An ``AltCLIPTextModel`` holding ``encoder``'s weights, projecting to ``project_dim`` (the UNet's
    cross-attention width); it reads the same token ids as ``encoder`` and masks padding
    (``config.use_attention_mask``, which diffusers' pipelines honour)."""
    from transformers import AltCLIPTextConfig, AltCLIPTextModel

    source = encoder.config
    position_offset = 0 if source.model_type != "bert" else source.pad_token_id + 1
    config = AltCLIPTextConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        max_position_embeddings=source.max_position_embeddings + position_offset,
        hidden_act=source.hidden_act,
        layer_norm_eps=source.layer_norm_eps,
        pad_token_id=source.pad_token_id,
        type_vocab_size=source.type_vocab_size,
        hidden_dropout_prob=source.hidden_dropout_prob,
        attention_probs_dropout_prob=source.attention_probs_dropout_prob,
        project_dim=project_dim,
    )
    config.use_attention_mask = True
    student = AltCLIPTextModel(config)
    weights = {}
    for name, tensor in encoder.state_dict().items():
        if name.startswith("pooler."):  # AltCLIP pools through its projection, not BERT's pooler
            continue
        name = name.replace("encoder.layer.", "encoder.layers.")
        if name == "embeddings.position_embeddings.weight" and position_offset:
            shifted = tensor.new_zeros(tensor.shape[0] + position_offset, tensor.shape[1])
            shifted[position_offset:] = tensor
            tensor = shifted
        weights[name] = tensor
    missing, unexpected = student.roberta.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise ValueError(
            f"Cannot map the encoder's weights: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return student


def bilingual_student(
    name_or_path: str, project_dim: int, max_length: int = 77, setting: str = "model.student"
) -> tuple[Any, Any]:
    """The student and its tokenizer, which pads and cuts at ``max_length`` tokens (or fewer, if the encoder
    has fewer positions) as Stable Diffusion's pipelines tokenize."""
    encoder, tokenizer = load_text_tower(name_or_path, setting)
    student = altclip_student(encoder, project_dim)
    # XLM-R's positions (and the shifted BERT ones) start after the padding index
    positions = student.config.max_position_embeddings - (student.config.pad_token_id + 1)
    tokenizer.model_max_length = min(int(max_length), positions)
    return student, tokenizer
