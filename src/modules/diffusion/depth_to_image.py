"""Depth-to-image from a text-to-image base, as Stable Diffusion 2 depth was made (thesis ch. V).

``stabilityai/stable-diffusion-2-depth`` is SD 2 with a fifth UNet input channel: a depth map of the input image,
estimated by a DPT (MiDaS) model, resized to the latent size and min-max scaled to [-1, 1] per image, is
concatenated to the noisy latents at every denoising step. Here the same model is grown from any base in
diffusers' format: its UNet is widened to five input channels with the new channel's weights at zero (so it starts
as the base and keeps drawing as it did), then fine-tuned on images with their true depth maps prepared exactly as
``StableDiffusionDepth2ImgPipeline`` prepares an estimated one; the VAE and text encoder stay frozen. Beside it a
small ``DPTForDepthEstimation`` learns the maps from the images, so that the export draws from an image alone.

:meth:`export` writes the directory that ``StableDiffusionDepth2ImgPipeline.from_pretrained`` loads as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from src.modules.diffusion.finetune import StableDiffusionFineTune
from src.modules.diffusion.objective import denoising_target, per_example_loss

__all__ = ["DepthToImageFineTune", "depth_condition", "widen_unet_for_depth"]


def widen_unet_for_depth(unet: Any) -> Any:
    """A ``UNet2DConditionModel`` like ``unet`` with one more input channel (the depth map) whose ``conv_in``
    weights are zero: it predicts exactly what ``unet`` predicts, whatever the depth."""
    from diffusers import UNet2DConditionModel

    config = unet.config
    if config.in_channels != config.out_channels:
        raise ValueError(
            f"model.pretrained_model_name_or_path: its UNet takes {config.in_channels} input channels for "
            f"{config.out_channels} latent ones; depth-to-image widens a text-to-image UNet (in = out)."
        )
    widened = UNet2DConditionModel.from_config({**config, "in_channels": config.in_channels + 1})
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, torch.zeros_like(weight[:, :1])], dim=1)
    widened.load_state_dict(state)
    return widened.to(device=unet.device, dtype=unet.dtype).train(unet.training)


def depth_condition(depth: Tensor, size: tuple[int, int]) -> Tensor:
    """Depth maps [B, H, W] or [B, 1, H, W] as the depth-to-image UNet reads them: bicubic to the latent
    ``size``, each map min-max scaled to [-1, 1] (``StableDiffusionDepth2ImgPipeline.prepare_depth_map``)."""
    depth = depth.unsqueeze(1) if depth.ndim == 3 else depth
    depth = F.interpolate(depth, size=tuple(size), mode="bicubic", align_corners=False)
    low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    return 2.0 * (depth - low) / (high - low) - 1.0


class DepthToImageFineTune(StableDiffusionFineTune):
    """The widened UNet on true depth maps, and a DPT depth estimator beside it; exported as depth-to-image."""

    # The export is a whole diffusers directory, like a full fine-tune's (finetune.json names the base model).
    method = "full"

    def __init__(
        self,
        pretrained_model_name_or_path: str | os.PathLike,
        depth_estimator: dict[str, Any],
        image_size: int,
        caption_dropout: float = 0.1,
        depth_loss_weight: float = 1.0,
        depth_estimator_lr: float = 1e-3,
        max_grad_norm: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        """``depth_estimator``: keyword arguments of a non-hybrid ``DPTConfig``; ``image_size``: the images the
        estimator sees (its feature extractor resizes inputs to it). ``caption_dropout``: the share of captions
        dropped to the empty prompt, for classifier-free guidance. ``max_grad_norm`` clips the UNet's and the
        estimator's gradients each by its own norm. The other settings are :class:`StableDiffusionFineTune`'s."""
        if image_size < 1 or not 0.0 <= caption_dropout < 1.0:
            raise ValueError(
                f"model.image_size must be positive and model.caption_dropout in [0, 1), got {image_size} "
                f"and {caption_dropout}"
            )
        self.depth_estimator_config = dict(depth_estimator)
        self.image_size = image_size
        # A path made on demand (src/demo/on_demand.py) arrives as a Path; the checkpoint keeps plain strings.
        pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        super().__init__(pretrained_model_name_or_path, **kwargs)

    def add_trainable_parts(self) -> None:
        from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor
        from transformers.image_utils import PILImageResampling

        self.unet = widen_unet_for_depth(self.unet).requires_grad_(True)
        self.components.unet = self.unet
        self.depth_estimator = DPTForDepthEstimation(
            DPTConfig(image_size=self.image_size, is_hybrid=False, **self.depth_estimator_config)
        )
        # Pixels to [-1, 1], the scale of the training batches: at inference the estimator sees what it learnt on.
        self.feature_extractor = DPTImageProcessor(
            size={"height": self.image_size, "width": self.image_size},
            keep_aspect_ratio=False,
            ensure_multiple_of=1,
            resample=PILImageResampling.BICUBIC,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )

    # --- the objective ----------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, depth = self.checked_inputs(batch)
        denoising = self.denoising_loss(images, depth, batch["caption"], drop_captions=True)
        depth_loss = self.depth_loss(images, depth)
        self.log("train/loss", denoising, prog_bar=True, batch_size=len(images))
        self.log("train/depth_loss", depth_loss, prog_bar=True, batch_size=len(images))
        # The two parts share no parameter: the sum's gradients are each part's own.
        return denoising + self.hparams.depth_loss_weight * depth_loss

    def denoising_loss(
        self,
        images: Tensor,
        depth: Tensor,
        captions: list[str],
        drop_captions: bool = False,
        generator: torch.Generator | None = None,
        use_depth: bool = True,
    ) -> Tensor:
        """The base's denoising loss with the depth map as the UNet's fifth input channel (zeros when
        ``use_depth`` is false: what the UNet predicts without it)."""
        latents = self.encode_images(images)
        condition = depth_condition(depth, latents.shape[-2:]).to(latents)
        if not use_depth:
            condition = torch.zeros_like(condition)
        if drop_captions:
            keep = torch.rand(len(captions), generator=generator) >= self.hparams.caption_dropout
            captions = [
                caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)
            ]
        context = self.encode_prompts([self.training_prompt(caption) for caption in captions])
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        unet_input = torch.cat([noisy, condition], dim=1).to(self.unet.dtype)
        prediction = self.unet(unet_input, timesteps, context.to(self.unet.dtype)).sample
        target = denoising_target(self.noise_scheduler, latents, noise, timesteps)
        losses = per_example_loss(prediction, target, self.noise_scheduler, timesteps, self.hparams.snr_gamma)
        return losses.mean()

    def estimate_depth(self, images: Tensor) -> Tensor:
        """The estimator's depth maps [B, 1, H, W] of images in [-1, 1] at the estimator's size (what its
        feature extractor makes of them), resized to the images' size."""
        predicted = self.depth_estimator(pixel_values=images).predicted_depth.unsqueeze(1)
        return F.interpolate(predicted, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def depth_loss(self, images: Tensor, depth: Tensor) -> Tensor:
        """Squared error of the estimated depth against the true map in [0, 1]. The true maps share one
        absolute scale (shape at 1, ground at 0.1-0.4), so there is no scale or shift to be invariant to, and the
        minimiser, min-max scaled by the pipeline, is the map the UNet is trained on."""
        return F.mse_loss(self.estimate_depth(images), depth)

    def checked_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images, depth = batch["image"], batch["depth"]
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"The data's images are {tuple(images.shape[-2:])} pixels but the depth estimator's are "
                f"{self.image_size}: set data.image_size={self.image_size} (or model.image_size)."
            )
        return images, depth

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Each part by its own norm: the new estimator's large early gradients must not shrink the UNet's.
        if self.hparams.max_grad_norm:
            for part in (self.unet, self.depth_estimator):
                torch.nn.utils.clip_grad_norm_(part.parameters(), self.hparams.max_grad_norm)

    def build_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """One optimizer, two parameter groups: the UNet at the configured rate (fine-tuning), the estimator
        at ``depth_estimator_lr`` (trained from scratch); the learning-rate schedule scales both."""
        estimator = {id(p) for p in self.depth_estimator.parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in estimator]},
            {"params": [p for p in params if id(p) in estimator], "lr": self.hparams.depth_estimator_lr},
        ]
        return super().build_optimizer(groups)

    # --- validation and test: fixed noise, and the estimator against the true maps ------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    @torch.no_grad()
    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        images, depth = self.checked_inputs(batch)
        captions = batch["caption"]
        metrics = {}
        for name, use_depth in (("loss", True), ("loss_depth_zeroed", False)):
            generator = torch.Generator().manual_seed(batch_idx)  # the same noise at every evaluation
            metrics[name] = self.denoising_loss(
                images, depth, captions, generator=generator, use_depth=use_depth
            )
        estimated = self.estimate_depth(images)
        metrics["depth_loss"] = F.mse_loss(estimated, depth)
        # What the pipeline feeds the UNet is min-max scaled: compare the maps on that scale.
        estimated, true = min_max_scaled(estimated), min_max_scaled(depth)
        metrics["depth_mae"] = (estimated - true).abs().mean()
        metrics["depth_iou"] = silhouette_iou(estimated >= 0.5, true >= 0.5).mean()
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, sync_dist=True, batch_size=len(images))

    # --- inference and export ---------------------------------------------------------------------------

    def diffusion_parts(self) -> dict[str, Any]:
        """The parts of a ``StableDiffusionDepth2ImgPipeline``: the base's (UNet widened) and the estimator."""
        return {
            **super().diffusion_parts(),
            "depth_estimator": self.depth_estimator,
            "feature_extractor": self.feature_extractor,
        }

    def export_weights(self, out_dir: Path) -> None:
        from diffusers import StableDiffusionDepth2ImgPipeline

        StableDiffusionDepth2ImgPipeline(**self.diffusion_parts()).save_pretrained(
            out_dir, safe_serialization=True
        )


def min_max_scaled(maps: Tensor) -> Tensor:
    """Each map [B, 1, H, W] scaled to [0, 1] (a constant map to 0)."""
    low = torch.amin(maps, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(maps, dim=[1, 2, 3], keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-8)


def silhouette_iou(predicted: Tensor, true: Tensor) -> Tensor:
    """Intersection over union of boolean masks [B, 1, H, W], per image."""
    intersection = (predicted & true).flatten(1).sum(1).float()
    union = (predicted | true).flatten(1).sum(1).float()
    return intersection / union.clamp(min=1)
