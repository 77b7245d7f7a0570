"""A CLIP training step in Lightning vs a bare PyTorch loop: same model, same batch, same optimizer.

python bench/bench_clip_step.py [--steps 60] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from src.modules.clip_module import WebtoonCLIP

TEXT = {
    "config": {
        "model_type": "bert",
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    }
}
IMAGE = {
    "config": {
        "model_type": "vit",
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    }
}


def make_model() -> WebtoonCLIP:
    torch.manual_seed(0)
    return WebtoonCLIP(
        TEXT,
        IMAGE,
        preprocess={"image_size": 64},
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        projection_dim=64,
    )


def make_batch(batch_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch_size, 3, 64, 64, generator=generator),
        "input_ids": torch.randint(5, 512, (batch_size, 16), generator=generator),
        "attention_mask": torch.ones(batch_size, 16, dtype=torch.long),
    }


def bare_loop(batch: dict, steps: int) -> float:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        image, text = model(batch)
        loss = model.loss(image, text, model.encoder.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.encoder.clamp_logit_scale()
    return (time.perf_counter() - start) / steps


class _Timer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 5:  # skip Lightning's first-step setup in both loops' comparison
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def lightning_loop(batch: dict, steps: int) -> float:
    model = make_model()
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps + 5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader([batch] * (steps + 5), batch_size=None))
    return timer.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    batch = make_batch(args.batch_size)
    bare_loop(batch, 5)  # warm-up: allocator and kernels
    bare = bare_loop(batch, args.steps)
    lightning = lightning_loop(batch, args.steps)
    print(f"bare PyTorch loop : {bare * 1000:7.1f} ms/step")
    print(
        f"Lightning         : {lightning * 1000:7.1f} ms/step  ratio {lightning / bare:.2f}x (1.00 = no overhead)"
    )


if __name__ == "__main__":
    main()
