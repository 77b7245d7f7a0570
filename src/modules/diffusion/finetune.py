"""What every Stable Diffusion fine-tuning method shares: the denoising objective of latent diffusion.

Per batch (Rombach et al. 2022; diffusers' training examples): encode the images into VAE latents, add noise at a
random timestep, encode the captions with the text encoder, and regress the UNet's prediction onto the noise
(or onto the velocity ``v`` for v-prediction checkpoints, Salimans & Ho 2022). Options users of those examples
reach for are here once: Min-SNR loss weighting (``snr_gamma``, Hang et al. 2023), offset noise
(``noise_offset``), DreamBooth's prior-preservation term (batches whose ``is_prior`` items carry class images),
gradient checkpointing, frozen parts in half precision on GPU, 8-bit AdamW on CUDA, latent and text-embedding
caches while their encoders are frozen.

A method (``lora.py``, ``dreambooth.py``, ``textual_inversion.py``, ``hypernetwork.py``, ``full.py``) says which
parameters train (:meth:`add_trainable_parts`) and what it writes for the ecosystem (:meth:`export`).
Checkpoints hold only the trained parameters; the frozen rest is reloaded from the base model, so a LoRA run's
checkpoint stays megabytes and resumes like any Lightning checkpoint.
"""

from __future__ import annotations

import abc
import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor

from src.modules.diffusion.components import encode_text, load_components
from src.modules.diffusion.objective import denoising_target, per_example_loss
from src.utils.checkpoint import record_module_class

__all__ = ["StableDiffusionFineTune"]

log = logging.getLogger(__name__)

# diffusers' examples: AdamW, lr 1e-4 (LoRA) .. 5e-6 (DreamBooth); methods' configs set their own rates.
DEFAULT_ADAMW = functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-2)
# Written beside every export: what generate.py needs to rebuild the model's inference from the directory alone.
EXPORT_RECORD = "finetune.json"
HALF_PRECISION = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


class StableDiffusionFineTune(LightningModule, abc.ABC):
    """Latent-diffusion training of the parts a method chooses; subclasses add and export those parts."""

    method: str  # the name the loader knows the export by (finetune.json)

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        optimizer: functools.partial | None = None,
        lr_scheduler: dict[str, Any] | None = None,
        use_8bit_adam: bool = False,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        prior_loss_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        frozen_dtype: str = "auto",
        cache_latents: bool = True,
        cache_text_embeddings: bool = True,
        revision: str | None = None,
        variant: str | None = None,
        prompt_aliases: dict[str, str] | None = None,
    ) -> None:
        """``prompt_aliases``: words that captions and prompts write for others, e.g. ``{"*": "sks hanok"}`` so
        that paper 000's ``*`` captions name the subject by a rare identifier (DreamBooth's recipe).

        ``lr_scheduler``: ``{name, warmup_steps}`` for diffusers' ``get_scheduler`` (constant, cosine, ...).

        ``frozen_dtype``: precision of the parts that do not train; ``auto`` follows the trainer (bf16/fp16
        under mixed precision on GPU, float32 otherwise); trained parameters always stay in float32.
        """
        super().__init__()
        if frozen_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"frozen_dtype must be auto, float32, float16 or bfloat16, got {frozen_dtype!r}")
        # The optimizer partial stays out of the hparams so that checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.optimizer = optimizer or DEFAULT_ADAMW
        components = load_components(pretrained_model_name_or_path, revision=revision, variant=variant)
        self.components = components
        self.tokenizer = components.tokenizer
        self.noise_scheduler = components.noise_scheduler
        self.vae, self.text_encoder, self.unet = components.vae, components.text_encoder, components.unet
        for part in (self.vae, self.text_encoder, self.unet):
            part.requires_grad_(False)
        self.add_trainable_parts()
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError(f"{type(self).__name__} left no parameter to train")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.text_encoder_trains:
                self.text_encoder.gradient_checkpointing_enable()
        # Checkpoints carry only the trained parameters (see on_save_checkpoint); the rest comes from the base.
        self.strict_loading = False
        self._latent_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._text_cache: dict[str, Tensor] = {}

    # --- what a method defines --------------------------------------------------------------------------

    @abc.abstractmethod
    def add_trainable_parts(self) -> None:
        """Add or unfreeze the parameters this method trains."""

    @abc.abstractmethod
    def export_weights(self, out_dir: Path) -> None:
        """Write the files the ecosystem loads (diffusers, WebUI, ComfyUI)."""

    def export(self, out_dir: str | Path) -> Path:
        """The method's files plus ``finetune.json`` (method, base model, prompt aliases), from which the
        project's loader (``src/pipelines/loading.py``) rebuilds this model's inference."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.export_weights(out_dir)
        record = {
            "method": self.method,
            "base_model": str(self.hparams.pretrained_model_name_or_path),
            "prompt_aliases": self.prompt_aliases,
            "step": int(self.global_step),
        }
        (out_dir / EXPORT_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return out_dir

    @property
    def prompt_aliases(self) -> dict[str, str]:
        """Words of prompts that inference reads as others (textual inversion: ``*`` -> its token)."""
        return dict(self.hparams.prompt_aliases or {})

    def training_prompt(self, caption: str) -> str:
        """A caption as the tokenizer should read it while training."""
        for alias, word in self.prompt_aliases.items():
            caption = caption.replace(alias, word)
        return caption

    @property
    def text_encoder_trains(self) -> bool:
        """Whether gradients flow through the text encoder (then its outputs are neither cached nor halved)."""
        return any(p.requires_grad for p in self.text_encoder.parameters())

    # --- the objective ----------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        latents = self.encode_images(batch["pixel_values"], batch.get("cache_key"))
        noise = torch.randn_like(latents)
        if self.hparams.noise_offset:
            # Offset noise: a per-channel constant lets the model learn to change an image's overall brightness.
            noise = noise + self.hparams.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
            )
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        context = self.encode_prompts([self.training_prompt(c) for c in batch["captions"]])
        prediction = self.unet(
            noisy_latents.to(self.unet.dtype), timesteps, context.to(self.unet.dtype)
        ).sample
        target = denoising_target(self.noise_scheduler, latents, noise, timesteps)
        losses = per_example_loss(prediction, target, self.noise_scheduler, timesteps, self.hparams.snr_gamma)

        is_prior = batch.get("is_prior")
        if is_prior is None or not bool(is_prior.any()):
            loss = losses.mean()
        else:
            # DreamBooth (Ruiz et al. 2023): the class images keep the model's prior for the class noun.
            instance_loss, prior_loss = losses[~is_prior].mean(), losses[is_prior].mean()
            loss = instance_loss + self.hparams.prior_loss_weight * prior_loss
            self.log("train/instance_loss", instance_loss)
            self.log("train/prior_loss", prior_loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, cache_keys: Tensor | None = None) -> Tensor:
        """Scaled VAE latents sampled from each image's posterior; posteriors are cached by the data's key."""
        keys = cache_keys.tolist() if (cache_keys is not None and self.hparams.cache_latents) else None
        if keys is None or any(k < 0 or k not in self._latent_cache for k in keys):
            posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
            for i, key in enumerate(keys or []):
                if key >= 0:
                    self._latent_cache[key] = (mean[i], std[i])
        else:
            mean = torch.stack([self._latent_cache[k][0] for k in keys])
            std = torch.stack([self._latent_cache[k][1] for k in keys])
        latents = mean + std * torch.randn_like(mean)
        return latents * self.vae.config.scaling_factor

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text-encoder hidden states, the UNet's cross-attention context."""
        use_cache = self.hparams.cache_text_embeddings and not self.text_encoder_trains
        if use_cache and all(p in self._text_cache for p in prompts):
            return torch.stack([self._text_cache[p] for p in prompts])
        with torch.set_grad_enabled(self.text_encoder_trains and torch.is_grad_enabled()):
            context = encode_text(self.tokenizer, self.text_encoder, prompts)[0]
        if use_cache:
            self._text_cache.update(zip(prompts, context.detach(), strict=True))
        return context

    # --- training set-up --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        dtype = self.frozen_dtype()
        if dtype == torch.float32:
            return
        from diffusers.training_utils import cast_training_params

        # Frozen weights in half precision halve their memory; trained ones stay float32 for the optimizer.
        self.vae.to(dtype)
        if not self.text_encoder_trains:
            self.text_encoder.to(dtype)
        if not all(p.requires_grad for p in self.unet.parameters()):
            self.unet.to(dtype)
        cast_training_params(self, dtype=torch.float32)

    def frozen_dtype(self) -> torch.dtype:
        setting = self.hparams.frozen_dtype
        if setting != "auto":
            return getattr(torch, setting)
        trainer = self._trainer
        if trainer is None or trainer.accelerator is None or self.device.type == "cpu":
            return torch.float32
        return HALF_PRECISION.get(str(trainer.precision), torch.float32)

    def on_fit_start(self) -> None:
        # from_pretrained returns modules in eval mode and Lightning keeps modes as they are: train explicitly.
        self.train()

    def train(self, mode: bool = True) -> StableDiffusionFineTune:
        super().train(mode)
        # Frozen encoders stay in inference mode (no dropout) while the trained parts train.
        self.vae.eval()
        if not self.text_encoder_trains:
            self.text_encoder.eval()
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.build_optimizer(params)
        settings = dict(self.hparams.lr_scheduler or {"name": "constant"})
        scheduler = get_scheduler(
            settings.get("name", "constant"),
            optimizer,
            num_warmup_steps=int(settings.get("warmup_steps", 0)),
            num_training_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.hparams.use_8bit_adam:
            if self.device.type == "cuda":
                try:
                    import bitsandbytes as bnb
                except ImportError as error:
                    raise ImportError(
                        "model.use_8bit_adam=true needs bitsandbytes: pip install -e '.[gpu]'"
                    ) from error
                return bnb.optim.AdamW8bit(params, **self.optimizer.keywords)
            log.warning(
                "model.use_8bit_adam: bitsandbytes' 8-bit AdamW runs on CUDA only; using plain %s on %s.",
                getattr(self.optimizer.func, "__name__", self.optimizer.func),
                self.device.type,
            )
        return self.optimizer(params)

    # --- checkpoints: the trained parameters only -------------------------------------------------------

    def trained_parameter_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_module_class(self, checkpoint)
        trained = self.trained_parameter_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trained_parameter_names() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(
                f"The checkpoint lacks {len(missing)} trained parameters of {type(self).__name__} "
                f"(e.g. {sorted(missing)[0]}): was it written by another method or settings?"
            )

    # --- inference --------------------------------------------------------------------------------------

    def diffusion_parts(self) -> dict[str, Any]:
        """The current (trained) parts and the base model's own sampler: what a diffusers pipeline is made of."""
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "scheduler": self.components.inference_scheduler,
        }
