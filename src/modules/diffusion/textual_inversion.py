"""Textual Inversion (Gal et al. 2023): learn the embedding of one new word from a few images.

A placeholder token (``<hanok>``; with ``num_vectors`` > 1 also ``<hanok>_1`` ...) joins the tokenizer, its
embedding starts at an initializer word's ("house"), and only those rows train: they live in their own
parameter and replace the frozen embedding matrix's output wherever the placeholder appears, so the rest of the
vocabulary cannot move. Captions keep their own words (a BLIP caption per image, as paper 000 writes them); the
paper's ``*`` in a caption or prompt stands for the placeholder. Images without a caption fall back to the
datamodule's templates.

Exports ``learned_embeds.safetensors`` (``{placeholder: [num_vectors, dim]}``, read by diffusers'
``load_textual_inversion``) and the WebUI embedding ``<name>.pt`` (``string_to_param['*']``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from src.modules.diffusion.finetune import StableDiffusionFineTune

__all__ = ["TextualInversion"]


class TextualInversion(StableDiffusionFineTune):
    method = "textual_inversion"

    def __init__(
        self,
        *args,
        placeholder_token: str = "<hanok>",
        initializer_token: str = "house",
        num_vectors: int = 1,
        caption_placeholder: str = "*",
        **kwargs,
    ) -> None:
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if not self._placeholder_seen:
            # Otherwise backward fails with "element 0 of tensors does not require grad", naming nothing.
            raise ValueError(
                f"No caption of this batch holds the placeholder once tokenized, so {self.placeholder_tokens[0]} "
                f"cannot learn: captions must contain {self.caption_placeholder!r} (data.fallback_captions for "
                f"images without one), and a caption longer than the tokenizer's "
                f"{self.tokenizer.model_max_length} tokens loses what is past the end. Captions: "
                f"{list(batch['captions'])[:3]}"
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
