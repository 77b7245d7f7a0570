"""Textual Inversion (Gal et al. 2023): learn the embedding of one new word from a few images.

A placeholder token (e.g. ``<hanok>``; with ``num_vectors`` > 1 also ``<hanok>_1`` ...) joins the tokenizer, its
embedding starts at an initializer word's (e.g. "house"), and only those rows train: they live in their own
parameter and replace the frozen embedding matrix's output wherever the placeholder appears, so the rest of the
vocabulary cannot move. Captions keep their own words (a BLIP caption per image, as paper 000 writes them); the
paper's ``*`` in a caption or prompt stands for the placeholder. Images without a caption fall back to the
datamodule's templates. Every caption is checked before training starts: one that does not hold the placeholder
once tokenized (BLIP wrote another phrase, or the tokenizer's length cut it off) could teach nothing, so the run
stops with the list of such images, or trains them on the templates (``captions_without_placeholder``).

Exports ``learned_embeds.safetensors`` (``{placeholder: [num_vectors, dim]}``, read by diffusers'
``load_textual_inversion``) and the WebUI embedding ``<name>.pt`` (``string_to_param['*']``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from src.modules.diffusion.finetune import StableDiffusionFineTune

__all__ = ["TextualInversion"]

log = logging.getLogger(__name__)


class TextualInversion(StableDiffusionFineTune):
    method = "textual_inversion"

    def __init__(
        self,
        *args,
        placeholder_token: str,
        initializer_token: str,
        num_vectors: int = 1,
        caption_placeholder: str = "*",
        captions_without_placeholder: str = "error",
        **kwargs,
    ) -> None:
        """``captions_without_placeholder``: ``error`` stops before training and lists the images whose caption
        lacks the placeholder once tokenized; ``fallback`` trains those images on ``data.fallback_captions``."""
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
        if captions_without_placeholder not in ("error", "fallback"):
            raise ValueError(
                f"captions_without_placeholder must be error or fallback, got {captions_without_placeholder!r}"
            )
        self.captions_without_placeholder = captions_without_placeholder
        self.placeholder_tokens = [placeholder_token] + [
            f"{placeholder_token}_{i}" for i in range(1, num_vectors)
        ]
        self.initializer_token = initializer_token
        self.caption_placeholder = caption_placeholder
        super().__init__(*args, **kwargs)

    def add_trainable_parts(self) -> None:
        tokenizer = self.tokenizer
        # A placeholder the tokenizer already reads as one word would silently take over that word.
        known = len(tokenizer.encode(self.placeholder_tokens[0], add_special_tokens=False)) == 1
        if known or tokenizer.add_tokens(self.placeholder_tokens) != len(self.placeholder_tokens):
            raise ValueError(
                f"model.placeholder_token={self.placeholder_tokens[0]!r} is already a word of the tokenizer; "
                "pick a new one (e.g. <my-concept>)"
            )
        initializer_ids = tokenizer.encode(self.initializer_token, add_special_tokens=False)
        if len(initializer_ids) != 1:
            raise ValueError(
                f"model.initializer_token={self.initializer_token!r} is {len(initializer_ids)} tokens; "
                "it must be a single token"
            )
        self.text_encoder.resize_token_embeddings(len(tokenizer))
        embeddings = self.text_encoder.get_input_embeddings()
        ids = tokenizer.convert_tokens_to_ids(self.placeholder_tokens)
        with torch.no_grad():
            # The matrix rows too, so that a pipeline sharing this text encoder starts from the same words.
            embeddings.weight[ids] = embeddings.weight[initializer_ids[0]].clone()
        self.placeholder_embeddings = nn.Parameter(embeddings.weight[ids].detach().clone())
        self.register_buffer("placeholder_ids", torch.tensor(ids), persistent=False)
        embeddings.register_forward_hook(self._insert_placeholder_embeddings)
        self._placeholder_seen = False

    def _insert_placeholder_embeddings(
        self, module: nn.Module, args: tuple[Any, ...], output: Tensor
    ) -> Tensor:
        """Wherever an input id is a placeholder, output its trained vector instead of the frozen row."""
        input_ids = args[0]
        matches = input_ids.unsqueeze(-1) == self.placeholder_ids.to(input_ids.device)  # [B, L, num_vectors]
        self._placeholder_seen = bool(matches.any())
        if not self._placeholder_seen:
            return output
        learned = matches.to(output.dtype) @ self.placeholder_embeddings.to(output.dtype)
        return torch.where(matches.any(-1, keepdim=True), learned, output)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        dataset = getattr(datamodule, "train_dataset", None)
        if stage == "fit" and dataset is not None:
            self.check_captions(
                getattr(dataset, "instance", dataset)
            )  # DreamBooth-style pairs: the instances

    def check_captions(self, dataset: Any) -> None:
        """Before the first step: every image's captions must hold the placeholder once tokenized."""
        lacking = [
            name
            for name, captions in dataset.training_captions().items()
            if not all(self.holds_placeholder(caption) for caption in captions)
        ]
        if not lacking:
            return
        if self.captions_without_placeholder == "fallback":
            dataset.use_fallback_captions(lacking)
            log.warning(
                "%d images' captions lack %r once tokenized; they train on data.fallback_captions: %s",
                len(lacking),
                self.caption_placeholder,
                ", ".join(lacking),
            )
            self.check_captions(dataset)  # the templates must hold it too
            return
        raise ValueError(
            f"{len(lacking)} images have a caption without the placeholder {self.caption_placeholder!r} once "
            f"tokenized (missing, or cut off past the tokenizer's {self.tokenizer.model_max_length} tokens), so "
            f"{self.placeholder_tokens[0]} could learn nothing from them: {', '.join(lacking)}. Fix their "
            "captions, or set model.captions_without_placeholder=fallback to train them on data.fallback_captions."
        )

    def holds_placeholder(self, caption: str) -> bool:
        """Whether ``caption``, as training tokenizes it (aliases, truncation), still holds the placeholder."""
        input_ids = self.tokenizer(
            self.training_prompt(caption), max_length=self.tokenizer.model_max_length, truncation=True
        ).input_ids
        return bool(set(input_ids) & set(self.placeholder_ids.tolist()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if not self._placeholder_seen:
            # Checked for every caption before training (check_captions); kept for data given another way,
            # since backward would otherwise fail with "element 0 of tensors does not require grad".
            raise ValueError(
                f"No caption of this batch holds the placeholder once tokenized, so {self.placeholder_tokens[0]} "
                f"cannot learn. Captions: {list(batch['captions'])[:3]}"
            )
        return loss

    @property
    def text_encoder_trains(self) -> bool:
        # Its weights are frozen, but the placeholder's gradient flows through it.
        return True

    @property
    def prompt_aliases(self) -> dict[str, str]:
        # diffusers' pipelines expand <token> into <token> <token>_1 ... themselves.
        return {**super().prompt_aliases, self.caption_placeholder: self.placeholder_tokens[0]}

    def training_prompt(self, caption: str) -> str:
        return (
            super()
            .training_prompt(caption)
            .replace(self.placeholder_tokens[0], " ".join(self.placeholder_tokens))
        )

    def learned_embeddings(self) -> Tensor:
        return self.placeholder_embeddings.detach().float().cpu().contiguous()

    def export_weights(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        token = self.placeholder_tokens[0]
        save_file({token: self.learned_embeddings()}, out_dir / "learned_embeds.safetensors")
        # The WebUI's embedding file; its name (without <>) is the word WebUI prompts use.
        name = token.strip("<>") or "embedding"
        webui = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": self.learned_embeddings()},
            "name": name,
            "step": int(self.global_step),
            "sd_checkpoint": None,
            "sd_checkpoint_name": str(self.hparams.pretrained_model_name_or_path),
        }
        # Legacy (non-zip) format with plain containers only, as the WebUI's restricted unpickler accepts.
        torch.save(webui, out_dir / f"{name}.pt", _use_new_zipfile_serialization=False)
