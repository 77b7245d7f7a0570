"""A Stable Diffusion small enough for CPU tests, saved as a diffusers directory.

It has every component and file of a hub checkpoint (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), so code under test loads it by path exactly as a user loads
``stable-diffusion-v1-5/stable-diffusion-v1-5`` or a local copy of it. The cross-attention width (48) differs from
every UNet channel width (32, 64) so that hypernetwork modules keyed by context width are unambiguous, as 768
is in SD 1.x.
"""

from __future__ import annotations

import json
from pathlib import Path

from src.demo.bpe_tokenizer import write_clip_tokenizer as write_word_tokenizer

CROSS_ATTENTION_DIM = 48
IMAGE_SIZE = 32  # pixels; the VAE halves it, so latents are 16 x 16


def write_clip_tokenizer(out_dir: Path) -> None:
    """A byte-level CLIP BPE tokenizer in which a few whole words are single tokens, so prompts are short."""
    words = ["a", "photo", "of", "the", "in", "fire", "house", "hanok", "painting", "red", "blue", "pentagon"]
    write_word_tokenizer(out_dir, words, model_max_length=32)


def build_tiny_stable_diffusion(out_dir: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    write_clip_tokenizer(out_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir)
    return out_dir


def write_image_folder(out_dir: Path, num_images: int = 6, caption_format: str = "metadata") -> Path:
    """Images of a red house-like shape on varied backgrounds, captioned with the placeholder ``*``, in
    diffusers' ``metadata.jsonl`` layout or kohya's ``.txt`` sidecars."""
    from PIL import Image, ImageDraw

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_images):
        image = Image.new("RGB", (48, 48), (40 * i % 256, 200, 255 - 30 * i % 256))
        draw = ImageDraw.Draw(image)
        draw.polygon([(8, 24), (24, 8), (40, 24)], fill=(200, 30, 30))
        draw.rectangle([12, 24, 36, 42], fill=(150, 90, 40))
        name = f"house_{i:02d}.png"
        image.save(out_dir / name)
        caption = f"a photo of * number {i}"
        if caption_format == "metadata":
            lines.append(json.dumps({"file_name": name, "text": caption}))
        else:
            (out_dir / name).with_suffix(".txt").write_text(caption + "\n")
    if lines:
        (out_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir
