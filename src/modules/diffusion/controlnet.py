"""ControlNet (Zhang et al. 2023) trained on a frozen Stable Diffusion, as diffusers' ``train_controlnet.py`` does.

The ControlNet is a trainable copy of the UNet's encoder (down blocks and mid block, initialised from the base
UNet's weights) with a small convolutional encoder of the control image in front and a zero-initialised
convolution after each block; the base's VAE, text encoder and UNet stay frozen. Per batch: encode the images
into latents, add noise at a random timestep, run the ControlNet on the noisy latents, the caption and the
control image, add its residuals to the UNet's skip connections (``down_block_additional_residuals``) and mid
block (``mid_block_additional_residual``), and regress the UNet's prediction onto the base's own target (noise or
velocity). Since the zero convolutions start at zero, training starts from exactly the base model.

:meth:`export` writes the ControlNet alone (``ControlNetModel.from_pretrained`` loads it, and
``StableDiffusionControlNetPipeline`` takes it beside the base model) plus ``finetune.json`` naming the base.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from src.modules.diffusion.finetune import StableDiffusionFineTune
from src.modules.diffusion.objective import denoising_target, per_example_loss
from src.utils.hub import from_pretrained

__all__ = ["ControlNetTraining", "conditioning_channels_for"]

# ControlNetModel's default control-image encoder: four widths, three stride-2 steps, for a VAE of factor 8.
DIFFUSERS_CONDITIONING_CHANNELS = (16, 32, 96, 256)
CHANNELS_SETTING = "model.conditioning_embedding_out_channels"


def conditioning_channels_for(vae: Any, channels: Sequence[int] | None = None) -> tuple[int, ...]:
    """The control-image encoder's widths for ``vae``: one entry more than the VAE has stride-2 steps, so that
    the control image shrinks to the latent size. Unset: diffusers' widths, cut or extended to that length."""
    entries = len(vae.config.block_out_channels)  # log2(VAE factor) + 1
    factor = 2 ** (entries - 1)
    if channels is None:
        return (DIFFUSERS_CONDITIONING_CHANNELS + (DIFFUSERS_CONDITIONING_CHANNELS[-1],) * entries)[:entries]
    if len(channels) != entries:
        raise ValueError(
            f"{CHANNELS_SETTING}={list(channels)} has {len(channels)} entries, but the base model's VAE shrinks "
            f"images {factor}x, so the control image must shrink {factor}x too: give log2({factor}) + 1 = "
            f"{entries} entries (e.g. {list(conditioning_channels_for(vae))}) or null to derive them."
        )
    return tuple(int(width) for width in channels)


class ControlNetTraining(StableDiffusionFineTune):
    """A ControlNet on a frozen Stable Diffusion; batches hold ``pixel_values`` [B, 3, H, W] in [-1, 1],
    ``control`` [B, 3, H, W] in [0, 1] (what ``StableDiffusionControlNetPipeline`` feeds it) and ``captions``."""

    method = "controlnet"

    def __init__(
        self,
        pretrained_model_name_or_path: str | os.PathLike,
        conditioning_embedding_out_channels: list[int] | None = None,
        controlnet_model_name_or_path: str | None = None,
        caption_dropout: float = 0.0,
        max_grad_norm: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        """``conditioning_embedding_out_channels``: widths of the control-image encoder (null: derived from the
        VAE, see :func:`conditioning_channels_for`). ``controlnet_model_name_or_path``: continue training a
        ControlNet (hub id or directory) instead of starting from the UNet. ``caption_dropout``: the share of
        captions replaced by the empty prompt (``proportion_empty_prompts``; the ControlNet paper drops half, so
        the ControlNet learns to read the control image without the prompt's help). ``max_grad_norm`` clips the
        ControlNet's gradients. The other settings are :class:`StableDiffusionFineTune`'s."""
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"model.caption_dropout must be in [0, 1), got {caption_dropout}")
        # A path made on demand (src/demo/on_demand.py) arrives as a Path; the checkpoint keeps plain strings.
        pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        super().__init__(pretrained_model_name_or_path, **kwargs)
        if self.hparams.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()

    def add_trainable_parts(self) -> None:
        from diffusers import ControlNetModel

        channels = conditioning_channels_for(self.vae, self.hparams.conditioning_embedding_out_channels)
        if self.hparams.controlnet_model_name_or_path:
            self.controlnet = from_pretrained(
                ControlNetModel.from_pretrained,
                str(self.hparams.controlnet_model_name_or_path),
                "model.controlnet_model_name_or_path",
            )
        else:
            self.controlnet = ControlNetModel.from_unet(
                self.unet, conditioning_embedding_out_channels=channels
            )
        self.controlnet.requires_grad_(True)

    # --- the objective ----------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.denoising_loss(
            batch["pixel_values"],
            batch["control"],
            batch["captions"],
            cache_keys=batch.get("cache_key"),
            drop_captions=True,
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["captions"]))
        return loss

    def denoising_loss(
        self,
        pixel_values: Tensor,
        control: Tensor,
        captions: Sequence[str],
        cache_keys: Tensor | None = None,
        drop_captions: bool = False,
        generator: torch.Generator | None = None,
        use_control: bool = True,
    ) -> Tensor:
        """The base's denoising loss with the ControlNet's residuals added to the UNet (without them when
        ``use_control`` is false: the base model alone); ``generator`` fixes captions dropped, noise and steps."""
        if control.shape[-2:] != pixel_values.shape[-2:]:
            raise ValueError(
                f"The control images are {tuple(control.shape[-2:])} pixels but the images "
                f"{tuple(pixel_values.shape[-2:])}: the data must give both at the same size."
            )
        latents = self.encode_images(pixel_values, cache_keys)
        if drop_captions and self.hparams.caption_dropout:
            dropped = torch.rand(len(captions), generator=generator) < self.hparams.caption_dropout
            captions = [
                "" if drop else caption for caption, drop in zip(captions, dropped.tolist(), strict=True)
            ]
        context = self.encode_prompts([self.training_prompt(caption) for caption in captions])
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.hparams.noise_offset:
            # Offset noise: a per-channel constant lets the model learn to change an image's overall brightness.
            offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator).to(latents)
            noise = noise + self.hparams.noise_offset * offset
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        residuals = {}
        if use_control:
            down, mid = self.controlnet(
                noisy.to(self.controlnet.dtype),
                timesteps,
                encoder_hidden_states=context.to(self.controlnet.dtype),
                controlnet_cond=control.to(self.controlnet.dtype),
                return_dict=False,
            )
            residuals = {
                "down_block_additional_residuals": [sample.to(self.unet.dtype) for sample in down],
                "mid_block_additional_residual": mid.to(self.unet.dtype),
            }
        prediction = self.unet(
            noisy.to(self.unet.dtype), timesteps, context.to(self.unet.dtype), **residuals
        ).sample
        target = denoising_target(self.noise_scheduler, latents, noise, timesteps)
        losses = per_example_loss(prediction, target, self.noise_scheduler, timesteps, self.hparams.snr_gamma)
        return losses.mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.hparams.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), self.hparams.max_grad_norm)

    def train(self, mode: bool = True) -> ControlNetTraining:
        super().train(mode)
        self.unet.eval()  # frozen like the encoders: only the ControlNet trains
        return self

    # --- validation and test: the same noise every time, with and without the control ------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    @torch.no_grad()
    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        for name, use_control in (("loss", True), ("loss_without_control", False)):
            loss = self.denoising_loss(
                batch["pixel_values"],
                batch["control"],
                batch["captions"],
                generator=torch.Generator().manual_seed(batch_idx),
                use_control=use_control,
            )
            self.log(f"{stage}/{name}", loss, sync_dist=True, batch_size=len(batch["captions"]))

    # --- inference and export ---------------------------------------------------------------------------

    def diffusion_parts(self) -> dict[str, Any]:
        """The base's parts and the ControlNet: what ``StableDiffusionControlNetPipeline`` is made of."""
        return {**super().diffusion_parts(), "controlnet": self.controlnet}

    def export_weights(self, out_dir: Path) -> None:
        self.controlnet.save_pretrained(out_dir, safe_serialization=True)
