"""The thesis' CLIP: a multilingual BERT text tower and a ViT image tower projected to a shared 512-d space.

The towers live inside transformers' ``VisionTextDualEncoderModel``, which has exactly this shape
(two encoders, bias-free projections, a learnable logit scale), so a trained model exports as a
directory that ``transformers`` loads as it is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.utils.hub import load_or_init_model
from src.utils.pooling import masked_mean

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the temperature so logits never exceed 100


class DualEncoder(nn.Module):
    """Text and image towers, each followed by a linear projection to ``projection_dim``."""

    def __init__(
        self,
        text_encoder: dict[str, Any],
        image_encoder: dict[str, Any],
        projection_dim: int = 512,
        logit_scale_init: float = math.log(1 / 0.07),
    ):
        super().__init__()
        from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

        text_model = load_or_init_model(
            text_encoder.get("name_or_path"), text_encoder.get("config"), "model.text_encoder.name_or_path"
        )
        vision_model = load_or_init_model(
            image_encoder.get("name_or_path"), image_encoder.get("config"), "model.image_encoder.name_or_path"
        )
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision_model.config,
            text_model.config,
            projection_dim=projection_dim,
            logit_scale_init_value=logit_scale_init,
        )
        self.model = VisionTextDualEncoderModel(
            config=config, vision_model=vision_model, text_model=text_model
        )
        self.text_pooling = text_encoder.get("pooling", "cls")
        self.image_pooling = image_encoder.get("pooling", "cls")
        for pooling, tower in ((self.text_pooling, text_model), (self.image_pooling, vision_model)):
            if pooling not in ("cls", "mean"):
                raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
            if pooling == "mean" and getattr(tower, "pooler", None) is not None:
                # The [CLS] pooler gets no gradient under mean pooling; frozen, DDP does not wait for it.
                tower.pooler.requires_grad_(False)

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp of the learnable temperature, clamped at 100 (the parameter itself is clamped after each step)."""
        return self.model.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        outputs = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = _pool(outputs, self.text_pooling, attention_mask)
        features = self.model.text_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        outputs = self.model.vision_model(pixel_values=pixel_values)
        pooled = _pool(outputs, self.image_pooling, None)
        features = self.model.visual_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    def export(self, out_dir: str, preprocess) -> None:
        """Save a directory that ``VisionTextDualEncoderModel``/``AutoProcessor`` load as it is."""
        from transformers import VisionTextDualEncoderProcessor, ViTImageProcessor

        if (self.text_pooling, self.image_pooling) != ("cls", "cls"):
            raise ValueError(
                "transformers' VisionTextDualEncoderModel pools with the [CLS] pooler; export needs "
                "model.text_encoder.pooling=cls and model.image_encoder.pooling=cls."
            )
        self.clamp_logit_scale()
        self.model.save_pretrained(out_dir)
        image_processor = ViTImageProcessor(
            size={"height": preprocess.image_size, "width": preprocess.image_size},
            image_mean=list(preprocess.image_mean),
            image_std=list(preprocess.image_std),
        )
        VisionTextDualEncoderProcessor(
            image_processor=image_processor, tokenizer=preprocess.loaded_tokenizer
        ).save_pretrained(out_dir)


def _pool(outputs, pooling: str, attention_mask: torch.Tensor | None) -> torch.Tensor:
    # "cls" is the encoder's pooler over the [CLS] token, which is what VisionTextDualEncoderModel uses.
    if pooling == "cls":
        if getattr(outputs, "pooler_output", None) is None:
            return outputs.last_hidden_state[:, 0]
        return outputs.pooler_output
    return masked_mean(outputs.last_hidden_state, attention_mask)
