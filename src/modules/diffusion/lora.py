"""LoRA (Hu et al. 2022) for Stable Diffusion: low-rank updates ``W + (alpha / r) B A`` on attention projections.

peft's ``LoraConfig`` adds the adapters to the UNet's attention projections (and, optionally, the text
encoder's), the rest stays frozen. The run exports two files of the same weights: diffusers' layout
(``pytorch_lora_weights.safetensors``, read by ``pipe.load_lora_weights(dir)``) and kohya's
(``<name>.safetensors`` with ``lora_unet_*``/``lora_te_*`` keys, ``.alpha`` entries and ``ss_*`` metadata, what
AUTOMATIC1111's WebUI and ComfyUI load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from src.modules.diffusion.finetune import StableDiffusionFineTune

__all__ = ["LoRAFineTune", "kohya_state_dict"]

# diffusers' DreamBooth-LoRA script adapts these (add_k/v_proj exist only in some UNets; peft skips absent ones)
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoRAFineTune(StableDiffusionFineTune):
    method = "lora"

    def __init__(
        self,
        *args,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        unet_target_modules: tuple[str, ...] = UNET_TARGETS,
        train_text_encoder: bool = False,
        text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGETS,
        init_lora_weights: str | bool = "gaussian",
        name: str = "lora",
        **kwargs,
    ) -> None:
        """``alpha`` defaults to ``rank`` (scale 1), as diffusers' scripts set it."""
        self.lora_settings = dict(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            lora_dropout=dropout,
            init_lora_weights=init_lora_weights,
        )
        self.unet_target_modules = list(unet_target_modules)
        self.train_text_encoder = train_text_encoder
        self.text_encoder_target_modules = list(text_encoder_target_modules)
        super().__init__(*args, **kwargs)

    def add_trainable_parts(self) -> None:
        from peft import LoraConfig

        # add_adapter freezes the base weights and leaves only the lora_A / lora_B matrices trainable.
        self.unet.add_adapter(LoraConfig(target_modules=self.unet_target_modules, **self.lora_settings))
        if self.train_text_encoder:
            self.text_encoder.add_adapter(
                LoraConfig(target_modules=self.text_encoder_target_modules, **self.lora_settings)
            )

    def lora_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """peft-layout LoRA weights per part (``unet``, ``text_encoder``), float32 on CPU."""
        from peft.utils import get_peft_model_state_dict

        parts = {"unet": self.unet}
        if self.train_text_encoder:
            parts["text_encoder"] = self.text_encoder
        return {
            name: {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(part).items()}
            for name, part in parts.items()
        }

    def export_weights(self, out_dir: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from safetensors.torch import save_file

        peft_weights = self.lora_state_dicts()
        text_encoder_weights = peft_weights.get("text_encoder")
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(peft_weights["unet"]),
            text_encoder_lora_layers=(
                convert_state_dict_to_diffusers(text_encoder_weights) if text_encoder_weights else None
            ),
            # The adapter config keeps alpha: without it a loader assumes alpha = rank.
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=(
                self.text_encoder.peft_config["default"].to_dict() if text_encoder_weights else None
            ),
        )
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.lora_settings["r"]),
            "ss_network_alpha": str(self.lora_settings["lora_alpha"]),
            "ss_base_model_version": "sd_v2" if self.unet.config.cross_attention_dim == 1024 else "sd_v1",
            "ss_sd_model_name": str(self.hparams.pretrained_model_name_or_path),
            "ss_steps": str(self.global_step),
            "ss_output_name": self.hparams.name,
        }
        save_file(
            kohya_state_dict(peft_weights, alpha=self.lora_settings["lora_alpha"]),
            out_dir / f"{self.hparams.name}.safetensors",
            metadata=metadata,
        )


def kohya_state_dict(
    peft_weights: dict[str, dict[str, torch.Tensor]], alpha: float
) -> dict[str, torch.Tensor]:
    """kohya/WebUI keys for SD 1.x/2.x: ``lora_unet_<path>`` and ``lora_te_<path>`` with ``lora_down``/``lora_up``
    and the true ``alpha`` (diffusers' converter writes alpha = rank and SDXL's ``lora_te1_`` prefix)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    prefixed = {
        f"{part}.{key}": value for part, weights in peft_weights.items() for key, value in weights.items()
    }
    converted = convert_state_dict_to_kohya(prefixed)
    kohya = {}
    for key, value in converted.items():
        key = key.replace("lora_te1_", "lora_te_", 1)
        kohya[key] = torch.tensor(float(alpha)) if key.endswith(".alpha") else value.contiguous()
    return kohya
