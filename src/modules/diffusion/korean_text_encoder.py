"""Teaching a Stable Diffusion checkpoint Korean: a bilingual text encoder distilled into its text space.

Stable Diffusion's CLIP text encoder reads English only. As M-CLIP and AltCLIP do for CLIP, and AltDiffusion and
Taiyi for Stable Diffusion, a multilingual student (``src/modules/networks/bilingual_text_encoder.py``: XLM-R,
mBERT or the project's bilingual CLIP text tower, plus a projection to the UNet's cross-attention width) learns to
say in Korean what the checkpoint's own encoder (the teacher) says in English. Parallel captions (an English and a
Korean caption of the same image) are the training data; the UNet and VAE stay frozen. Per batch, each term a
weight (0 turns it off):

- ``pooled_weight`` — M-CLIP's distillation: the student's pooled state of the Korean caption regressed onto the
  teacher's pooled state of the English one.
- ``unet_weight`` — distillation through the UNet, which compares every token's effect, however the two
  tokenizers cut the sentence: on the same noisy latent and timestep, the UNet's prediction read with the
  student's Korean context regressed onto its prediction read with the teacher's English context.
- ``denoising_weight`` — Taiyi's objective: the denoising loss of the image under the student's Korean context.

``english_weight`` adds the same terms for the student reading the English caption, so English prompts keep
working through it. Captions are dropped to the empty prompt at ``caption_dropout``, so that the student's empty
prompt, which classifier-free guidance pushes away from, is the teacher's. ``train_cross_attention_kv`` also
trains the UNet's cross-attention key and value projections (AltDiffusion's concept-alignment stage); off by
default, since it changes what English prompts draw through the original encoder too.

The export is a whole pipeline directory whose text encoder and tokenizer are the student's:
``StableDiffusionPipeline.from_pretrained(export)("큰 빨간 원, webtoon")`` draws, and the fine-tuning methods
take the directory as their base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from src.modules.diffusion.components import encode_text, save_pipeline_directory
from src.modules.diffusion.finetune import StableDiffusionFineTune
from src.modules.diffusion.objective import denoising_target, per_example_loss
from src.modules.networks.bilingual_text_encoder import bilingual_student

__all__ = ["KoreanTextEncoderDistillation"]

CROSS_ATTENTION_KV = ("attn2.to_k.", "attn2.to_v.")


class KoreanTextEncoderDistillation(StableDiffusionFineTune):
    """Trains ``self.student`` (and optionally the UNet's cross-attention K/V) on batches with ``image``,
    ``caption_en`` and ``caption_ko`` (``data.parallel_captions=true``)."""

    method = "korean_text_encoder"

    def __init__(
        self,
        *args: Any,
        student_name_or_path: str,
        max_length: int = 77,
        pooled_weight: float = 1.0,
        unet_weight: float = 1.0,
        denoising_weight: float = 1.0,
        english_weight: float = 0.5,
        caption_dropout: float = 0.1,
        train_cross_attention_kv: bool = False,
        **kwargs: Any,
    ) -> None:
        """``student_name_or_path``: the multilingual encoder the student starts from (hub id or directory);
        ``max_length``: the student tokenizer's length (Stable Diffusion's 77 by default)."""
        self.student_name_or_path = str(student_name_or_path)
        self.max_length = max_length
        self.train_cross_attention_kv = train_cross_attention_kv
        if not any((pooled_weight, unet_weight, denoising_weight)):
            raise ValueError("Set at least one of pooled_weight, unet_weight, denoising_weight above 0")
        self.weights = {"pooled": pooled_weight, "unet": unet_weight, "denoising": denoising_weight}
        super().__init__(*args, **kwargs)

    def add_trainable_parts(self) -> None:
        self.student, self.student_tokenizer = bilingual_student(
            self.student_name_or_path, self.unet.config.cross_attention_dim, self.max_length
        )
        self.student.requires_grad_(True)
        if self.train_cross_attention_kv:
            for name, parameter in self.unet.named_parameters():
                if any(part in name for part in CROSS_ATTENTION_KV):
                    parameter.requires_grad_(True)

    # --- the objective ----------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        english, korean = self.dropped_captions(batch["caption_en"], batch["caption_ko"])
        terms = self.distillation_terms(batch["image"], english, korean)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        for name, value in terms.items():
            self.log(f"train/{name}_loss", value)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def dropped_captions(self, english: list[str], korean: list[str]) -> tuple[list[str], list[str]]:
        """Both captions of an image become the empty prompt at the rate ``caption_dropout``."""
        drop = (torch.rand(len(english)) < self.hparams.caption_dropout).tolist()
        english = ["" if dropped else caption for caption, dropped in zip(english, drop, strict=True)]
        korean = ["" if dropped else caption for caption, dropped in zip(korean, drop, strict=True)]
        return english, korean

    def distillation_terms(
        self,
        images: Tensor,
        english: list[str],
        korean: list[str],
        generator: torch.Generator | None = None,
        english_weight: float | None = None,
    ) -> dict[str, Tensor]:
        """Each term (before its weight) for the student reading ``korean``, plus ``english_weight`` x the same
        term for the student reading ``english``, against the teacher reading ``english``."""
        english_weight = self.hparams.english_weight if english_weight is None else english_weight
        with torch.no_grad():
            teacher = encode_text(self.tokenizer, self.text_encoder, english)
        readings = {"ko": korean, "en": english} if english_weight else {"ko": korean}
        students = {
            language: encode_text(self.student_tokenizer, self.student, captions)
            for language, captions in readings.items()
        }
        share = {"ko": 1.0, "en": english_weight}

        def mixed(per_language: dict[str, Tensor]) -> Tensor:
            return sum(share[language] * value for language, value in per_language.items())

        terms: dict[str, Tensor] = {}
        if self.weights["pooled"]:
            terms["pooled"] = mixed(
                {lang: F.mse_loss(out.pooler_output, teacher.pooler_output) for lang, out in students.items()}
            )
        if self.weights["unet"] or self.weights["denoising"]:
            latents = self.encode_images(images)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
            ).to(latents.device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            predictions = {lang: self.predict(noisy, timesteps, out[0]) for lang, out in students.items()}
            if self.weights["unet"]:
                with torch.no_grad():
                    reference = self.predict(noisy, timesteps, teacher[0])
                terms["unet"] = mixed(
                    {lang: F.mse_loss(prediction, reference) for lang, prediction in predictions.items()}
                )
            if self.weights["denoising"]:
                target = denoising_target(self.noise_scheduler, latents, noise, timesteps)
                snr_gamma = self.hparams.snr_gamma
                terms["denoising"] = mixed(
                    {
                        lang: per_example_loss(
                            prediction, target, self.noise_scheduler, timesteps, snr_gamma
                        ).mean()
                        for lang, prediction in predictions.items()
                    }
                )
        return terms

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        return self.unet(
            noisy_latents.to(self.unet.dtype), timesteps, context.to(self.unet.dtype)
        ).sample.float()

    # --- evaluation: how far the student is from the teacher on held-out captions ----------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        """``{stage}/{term}_distance_{ko,en}``: each term of the student reading either language, on the same
        noise at every evaluation."""
        size = len(batch["image"])
        for language in ("ko", "en"):
            generator = torch.Generator().manual_seed(batch_idx)
            captions = batch["caption_ko"] if language == "ko" else batch["caption_en"]
            # the VAE posterior's sample too, so that the numbers repeat exactly
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(batch_idx)
                terms = self.distillation_terms(
                    batch["image"], batch["caption_en"], captions, generator=generator, english_weight=0.0
                )
            for name, value in terms.items():
                self.log(f"{stage}/{name}_distance_{language}", value, sync_dist=True, batch_size=size)

    # --- inference and export ---------------------------------------------------------------------------

    def diffusion_parts(self) -> dict[str, Any]:
        """The checkpoint's parts with the student reading the prompts."""
        return {
            **super().diffusion_parts(),
            "text_encoder": self.student,
            "tokenizer": self.student_tokenizer,
        }

    def original_diffusion_parts(self) -> dict[str, Any]:
        """The checkpoint as it was: its own text encoder (the teacher)."""
        return super().diffusion_parts()

    def export_weights(self, out_dir: Path) -> None:
        save_pipeline_directory(self.diffusion_parts(), out_dir)

    def train(self, mode: bool = True) -> KoreanTextEncoderDistillation:
        super().train(mode)
        if not self.train_cross_attention_kv:
            self.unet.eval()  # frozen: no dropout, whatever the checkpoint's config says
        return self
