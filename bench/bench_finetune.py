"""Stable Diffusion fine-tuning: our LoRA step against diffusers' text-to-image LoRA recipe, the training memory
of each method, and steps/s of every method, all on the same small SD and batch.

    python bench/bench_finetune.py [--steps 20] [--resolution 64] [--batch 4]

Baseline: the per-step work of diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` written out as
a plain loop (VAE encode + sample every step, text encoder every step, UNet with peft LoRA, MSE, AdamW step), no
Accelerate wrapper. Ours: the LoRA module in a Lightning Trainer (its latent and text-embedding caches on).

Memory on CPU: process RSS is dominated by the libraries, so the training state is measured directly: bytes of
all weights + 3 x the trained ones (gradients, two Adam moments) + the bytes autograd saves for the backward
pass (counted with ``saved_tensors_hooks``; a tensor saved by two operations counts twice, alike for all methods). On CUDA the same script also reports ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from src.modules.diffusion.dreambooth import DreamBooth
from src.modules.diffusion.full import FullFineTune
from src.modules.diffusion.hypernetwork import HypernetworkFineTune
from src.modules.diffusion.lora import LoRAFineTune
from src.modules.diffusion.textual_inversion import TextualInversion

# The tests' tiny SD builder (tokenizer, text encoder, VAE); the UNet below is wider.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_sd  # noqa: E402

METHODS = {
    "lora": (LoRAFineTune, {"rank": 4}),
    "dreambooth": (DreamBooth, {}),
    "full": (FullFineTune, {}),
    "textual_inversion": (TextualInversion, {}),
    "hypernetwork": (HypernetworkFineTune, {}),
}


def build_model(out: Path, resolution: int) -> Path:
    """A small SD: the tests' tokenizer and text encoder, a wider UNet so that the UNet dominates as in SD."""
    from diffusers import UNet2DConditionModel

    tiny_sd.build_tiny_stable_diffusion(out)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=tiny_sd.CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(out / "unet")
    return out


def batches(n: int, batch_size: int, resolution: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
            "captions": [f"a photo of * number {i % 4}" for i in range(batch_size)],
            "cache_key": torch.arange(batch_size) + (i % 2) * batch_size,
            "is_prior": torch.zeros(batch_size, dtype=torch.bool),
        }
        for i in range(n)
    ]


def diffusers_lora_recipe(model_dir: Path, data: list[dict], rank: int) -> float:
    """Seconds per step of the reference recipe, after 3 warm-up steps."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    times = []
    for i, batch in enumerate(data):
        start = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(
                batch["captions"],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            context = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, context, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def lightning_step(module: L.LightningModule, data: list[dict]) -> float:
    """Seconds per step in a Lightning Trainer, after 3 warm-up steps."""
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(data),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, DataLoader(data, batch_size=None))
    steps = timer.times[3:]
    return sum(steps) / len(steps)


def training_state_bytes(module, batch: dict) -> tuple[int, int]:
    """(all weights + gradients and Adam's two moments of the trained ones; bytes saved for backward)."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    trained = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad) * 3
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    module.log = lambda *args, **kwargs: None
    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module.training_step(batch, 0)
    return weights + trained, saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="diffusers' DreamBooth default is 1")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "sd", args.resolution)
        data = batches(args.steps, args.batch, args.resolution)

        baseline = diffusers_lora_recipe(model_dir, data, rank=4)
        ours = lightning_step(LoRAFineTune(pretrained_model_name_or_path=str(model_dir), rank=4), data)
        print(f"LoRA step, diffusers' recipe (plain loop) : {1000 * baseline:7.1f} ms")
        print(
            f"LoRA step, webtoon-lab (Lightning)         : {1000 * ours:7.1f} ms  ratio {ours / baseline:.2f}x"
        )

        print(f"\n{'method':<18} {'trained params':>14} {'state MiB':>10} {'saved MiB':>10} {'steps/s':>8}")
        memory = {}
        for name, (cls, kwargs) in METHODS.items():
            kwargs = {**kwargs, "gradient_checkpointing": args.gradient_checkpointing}
            module = cls(pretrained_model_name_or_path=str(model_dir), **kwargs)
            count = sum(p.numel() for p in module.parameters() if p.requires_grad)
            trained, saved = training_state_bytes(module, data[0])
            memory[name] = trained + saved
            step = lightning_step(cls(pretrained_model_name_or_path=str(model_dir), **kwargs), data)
            print(f"{name:<18} {count:>14,} {trained / 2**20:>10.2f} {saved / 2**20:>10.2f} {1 / step:>8.2f}")
        print(f"\ntraining memory, LoRA / DreamBooth: {memory['lora'] / memory['dreambooth']:.2f}")
        if torch.cuda.is_available():
            print(
                "(CUDA present: run with CUDA_VISIBLE_DEVICES set and compare max_memory_allocated as well)"
            )


if __name__ == "__main__":
    main()
