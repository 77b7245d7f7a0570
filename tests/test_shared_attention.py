"""Shared self-attention across panels: the processor against diffusers' own attention over the joined tokens,
and a real Stable Diffusion call with classifier-free guidance on a tiny model loaded by path."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from tiny_sd import build_tiny_stable_diffusion

from src.pipelines.shared_attention import (
    SharedAttentionProcessor,
    adain,
    reference_indices,
    shared_attention,
)

PROMPTS = ["a red house", "a blue house", "a photo of fire"]


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    weights = build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))
    pipeline = StableDiffusionPipeline.from_pretrained(weights)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def draw(pipeline) -> torch.Tensor:
    """The 3 prompts with classifier-free guidance, each from its own seeded CPU generator."""
    generators = [torch.Generator().manual_seed(7) for _ in PROMPTS]
    return pipeline(
        PROMPTS,
        generator=generators,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="pt",
    ).images


def test_reference_indices_name_each_groups_first_item():
    assert reference_indices(6, 3).tolist() == [0, 0, 0, 3, 3, 3]
    assert reference_indices(4, 1).tolist() == [0, 1, 2, 3]


def test_each_image_attends_to_its_own_tokens_and_its_references():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    tokens = torch.randn(4, 10, 32)
    with torch.no_grad():
        shared = SharedAttentionProcessor(group_size=2)(attn, tokens)
        for i, reference in enumerate([0, 0, 2, 2]):
            joined = torch.cat([tokens[i : i + 1], tokens[reference : reference + 1]], dim=1)
            expected = AttnProcessor2_0()(attn, tokens[i : i + 1], encoder_hidden_states=joined)
            torch.testing.assert_close(shared[i : i + 1], expected, atol=1e-6, rtol=1e-5)


def test_feature_maps_with_group_norm_and_residual_keep_the_reference_unchanged():
    """The VAE's kind of attention layer: [B, C, H, W] input, group norm, residual connection."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True).eval()
    features = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        shared = SharedAttentionProcessor(group_size=2)(attn, features)
        alone = AttnProcessor2_0()(attn, features)
    assert shared.shape == features.shape
    torch.testing.assert_close(shared[0], alone[0], atol=1e-6, rtol=1e-5)
    assert (shared[1] - alone[1]).abs().max() > 1e-3


def test_adain_gives_the_references_statistics():
    torch.manual_seed(0)
    features, reference = torch.randn(2, 3, 50, 8), 4 * torch.randn(2, 3, 50, 8) + 2
    moved = adain(features, reference)
    torch.testing.assert_close(moved.mean(dim=-2), reference.mean(dim=-2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.std(dim=-2), reference.std(dim=-2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adain(features, features), features, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def drawn_alone(diffusers_pipeline) -> torch.Tensor:
    return draw(diffusers_pipeline)


def test_first_panel_unchanged_others_change_and_exit_restores_the_output(diffusers_pipeline, drawn_alone):
    with shared_attention(diffusers_pipeline.unet, group_size=len(PROMPTS)):
        together = draw(diffusers_pipeline)
    after = draw(diffusers_pipeline)

    torch.testing.assert_close(together[0], drawn_alone[0], atol=1e-5, rtol=0)
    for panel in (1, 2):
        assert (together[panel] - drawn_alone[panel]).abs().max() > 1e-3
    assert torch.equal(after, drawn_alone)


def test_adain_also_leaves_the_first_panel_unchanged(diffusers_pipeline, drawn_alone):
    with shared_attention(diffusers_pipeline.unet, group_size=len(PROMPTS), adain=True):
        together = draw(diffusers_pipeline)

    torch.testing.assert_close(together[0], drawn_alone[0], atol=1e-5, rtol=0)
    for panel in (1, 2):
        assert (together[panel] - drawn_alone[panel]).abs().max() > 1e-3


@pytest.mark.parametrize("blocks", [("up_blocks",), ("down_blocks", "mid_block")])
def test_only_self_attention_of_the_named_blocks_is_replaced_and_the_same_objects_come_back(
    diffusers_pipeline, blocks
):
    unet = diffusers_pipeline.unet
    before = unet.attn_processors
    with shared_attention(unet, group_size=3, blocks=blocks) as replaced:
        inside = unet.attn_processors
    after = unet.attn_processors

    expected = {n for n in before if n.endswith(".attn1.processor") and n.split(".")[0] in blocks}
    assert set(replaced) == expected and expected
    for name, processor in inside.items():
        if name in expected:
            assert isinstance(processor, SharedAttentionProcessor) and processor.group_size == 3
        else:  # cross-attention and the other blocks' self-attention are untouched
            assert processor is before[name]
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_group_size_that_does_not_divide_the_batch_is_a_clear_error(diffusers_pipeline):
    unet = diffusers_pipeline.unet
    before = unet.attn_processors
    latents, context = torch.randn(3, 4, 16, 16), torch.randn(3, 5, unet.config.cross_attention_dim)
    with (
        pytest.raises(ValueError, match=r"batch of 3 images .* group_size=2"),
        torch.no_grad(),
        shared_attention(unet, group_size=2),
    ):
        unet(latents, 10, encoder_hidden_states=context)
    assert all(unet.attn_processors[name] is before[name] for name in before)


def test_blocks_without_self_attention_are_a_clear_error(diffusers_pipeline):
    unet = diffusers_pipeline.unet
    before = unet.attn_processors
    with (
        pytest.raises(ValueError, match=r"blocks=\['decoder'\].*up_blocks\.1"),
        shared_attention(unet, group_size=3, blocks=("decoder",)),
    ):
        pass
    with pytest.raises(ValueError, match="group_size >= 1"), shared_attention(unet, group_size=0):
        pass
    assert all(unet.attn_processors[name] is before[name] for name in before)
