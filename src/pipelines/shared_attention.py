"""Shared self-attention across the panels of a story: a training-free way to keep their style consistent.

StyleAligned (Hertz et al., 2024) and StoryDiffusion (Zhou et al., 2024) draw the panels as one batch and let
each panel's self-attention also look at another panel's keys and values, so what the panels attend to, hence
their texture and palette, is partly shared. Here every image of a group also attends to the group's first
image (its reference):

    batch item i belongs to group i // group_size, whose reference is item (i // group_size) * group_size
    keys_i   <- [keys_i; keys_reference]        values_i <- [values_i; values_reference]

With classifier-free guidance a diffusers pipeline's batch is [unconditional panels..., conditional panels...],
so ``group_size`` = the number of panels gives each half its own reference. The reference then sees its own
keys twice, which leaves its softmax, hence its output, unchanged: the first panel is drawn as it would be
alone. Optionally (StyleAligned) the queries and keys are also normalised to the reference's statistics
(AdaIN over the tokens). Only the self-attention (``attn1``) of the named blocks is shared, the up blocks by
default, where StyleAligned and StoryDiffusion find the style; cross-attention keeps each panel's own prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SharedAttentionProcessor", "adain", "reference_indices", "shared_attention"]

SELF_ATTENTION = ".attn1.processor"  # diffusers' name of a transformer block's self-attention processor


class SharedAttentionProcessor:
    """A diffusers attention processor in which every image also attends to its group reference's keys and
    values (and, with ``adain``, has its queries and keys normalised to the reference's statistics)."""

    def __init__(self, group_size: int, adain: bool = False) -> None:
        if group_size < 1:
            raise ValueError(f"shared attention needs group_size >= 1, got {group_size}")
        self.group_size = group_size
        self.adain = adain

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # [B, C, H, W] feature maps attend as [B, H*W, C] tokens
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        reference = reference_indices(batch_size, self.group_size, hidden_states.device)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        key = _split_heads(attn.to_k(context), attn.heads)
        value = _split_heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.adain:
            query, key = adain(query, query[reference]), adain(key, key[reference])
        key = torch.cat([key, key[reference]], dim=2)
        value = torch.cat([value, value[reference]], dim=2)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)
            mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
            mask = torch.cat([mask, mask[reference]], dim=-1)  # the reference's tokens keep their own mask

        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
        hidden_states = attended.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, then dropout
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def reference_indices(batch_size: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """For every batch item, the index of its group's reference (the group's first item)."""
    if batch_size % group_size:
        raise ValueError(
            f"shared attention: a batch of {batch_size} images is not a whole number of groups of "
            f"group_size={group_size}; set group_size to the number of panels drawn together (with "
            "classifier-free guidance the batch holds each panel twice)"
        )
    return torch.arange(batch_size, device=device) // group_size * group_size


def adain(features: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``features`` [B, heads, tokens, dim] with each channel's mean and std over the tokens set to the
    ``reference``'s (adaptive instance normalisation, as StyleAligned applies it to queries and keys)."""
    mean, std = features.mean(dim=-2, keepdim=True), features.std(dim=-2, keepdim=True)
    reference_mean, reference_std = reference.mean(dim=-2, keepdim=True), reference.std(dim=-2, keepdim=True)
    return (features - mean) / (std + eps) * (reference_std + eps) + reference_mean


def _split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * dim] -> [B, heads, N, dim]."""
    batch_size, length, width = tokens.shape
    return tokens.view(batch_size, length, heads, width // heads).transpose(1, 2)


@contextmanager
def shared_attention(
    unet: Any, group_size: int, blocks: Sequence[str] = ("up_blocks",), adain: bool = False
) -> Iterator[list[str]]:
    """Within the context, the self-attention of ``unet``'s ``blocks`` (name prefixes such as ``up_blocks``,
    ``mid_block`` or ``up_blocks.1``) is shared within groups of ``group_size`` images; yields the names of
    the processors replaced. On exit the very processors that were there before are back."""
    if isinstance(blocks, str):
        blocks = (blocks,)
    before = unet.attn_processors
    shared = [name for name in before if name.endswith(SELF_ATTENTION) and _under(name, blocks)]
    if not shared:
        raise ValueError(
            f"shared_attention: no self-attention layer under blocks={list(blocks)}; the UNet's attention "
            f"layers sit under {sorted({_block_of(name) for name in before})}"
        )
    processor = SharedAttentionProcessor(group_size, adain)
    # set_attn_processor pops the entries of the dict it is given: it gets copies, `before` stays whole
    unet.set_attn_processor({name: processor if name in shared else p for name, p in before.items()})
    try:
        yield shared
    finally:
        unet.set_attn_processor(dict(before))


def _under(name: str, blocks: Sequence[str]) -> bool:
    return any(name == block or name.startswith(block.rstrip(".") + ".") for block in blocks)


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[1:2] and parts[1].isdigit() else parts[0]
