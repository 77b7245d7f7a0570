"""The shape judge of the generated world: a small image classifier trained on the dataset's real drawings.

Colour and background are judged by pixels; shape needs a model. The CLIP demo at 32 px scored 0.31 on the real
drawings themselves, so it could not tell a generator that draws shapes from one that draws blobs. This judge is
a small ResNet (transformers' ``ResNetForImageClassification``) trained on freshly rendered drawings of every
shape, the held-out hanok included (the judge may know the concept; the generators must not), in every style,
size, position, colour and background, at the resolutions the generators draw (32 px for the diffusion demos,
64 px for the DCGAN), each resized to the judge's input as ``ImageClassifierJudge`` resizes generated images.
Its accuracy on held-out drawings at each resolution is written beside it (``judge.json``): the ceiling every
shape number is reported with. It trains in about three minutes on 2 cores, once, on first use.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import pil_to_tensor

from src.demo.synthetic import ALL_KINDS, STYLES, Scene, render_scene, sample_scene
from src.metrics.classifier import ImageClassifierJudge, load_classifier_judge

log = logging.getLogger(__name__)

__all__ = ["drawings_of", "ensure_shape_judge", "load_shape_judge", "real_drawings", "train_shape_judge"]

SPEC_FILE = "judge.json"
INPUT_SIZE = 64
NORMALISATION = [0.5, 0.5, 0.5]


def real_drawings(
    count: int, seed: str, resolution: int, kinds: Sequence[str] = ALL_KINDS
) -> tuple[torch.Tensor, list[str]]:
    """``count`` drawings [count, 3, resolution, resolution] in [0, 1] of random scenes, and their shapes."""
    rng = random.Random(f"webtoon-lab/shape-judge/{seed}/{resolution}")
    images, labels = [], []
    for _ in range(count):
        scene = sample_scene(rng, kinds)
        images.append(pil_to_tensor(render_scene(scene, rng.choice(STYLES), resolution, rng)))
        labels.append(scene.kind)
    return torch.stack(images).float() / 255, labels


def drawings_of(scenes: Sequence[tuple[Scene, str]], count: int, image_size: int, seed: int) -> torch.Tensor:
    """[scenes, count, 3, H, W] in [0, 1]: ``count`` real drawings of each (scene, style), jittered as the
    dataset jitters them, the same for the same seed: the ceiling beside a generator's drawings of them."""
    rows = []
    for index, (scene, style) in enumerate(scenes):
        rngs = [random.Random(f"{seed}/{index}/{j}") for j in range(count)]
        rows.append(torch.stack([pil_to_tensor(render_scene(scene, style, image_size, rng)) for rng in rngs]))
    return torch.stack(rows).float() / 255


def accuracy(judge: ImageClassifierJudge, images: torch.Tensor, labels: Sequence[str]) -> float:
    return sum(p == t for p, t in zip(judge.predict(images), labels, strict=True)) / len(labels)


def train_shape_judge(
    out_dir: str | os.PathLike,
    resolutions: Sequence[int] = (32, 64),
    num_train: int = 12000,
    num_heldout: int = 500,
    steps: int = 900,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    widths: Sequence[int] = (32, 64, 128),
    seed: int = 0,
) -> dict:
    """Train the judge, save it (model, image processor, ``judge.json``) to ``out_dir``; return its record."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    settings = {
        "resolutions": list(resolutions),
        "num_train": num_train,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "widths": list(widths),
        "seed": seed,
    }
    torch.manual_seed(seed)
    model = ResNetForImageClassification(
        ResNetConfig(
            embedding_size=widths[0],
            hidden_sizes=list(widths),
            depths=[1, 1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
            num_labels=len(ALL_KINDS),
            id2label=dict(enumerate(ALL_KINDS)),
            label2id={kind: i for i, kind in enumerate(ALL_KINDS)},
        )
    )
    judge = ImageClassifierJudge(model, (INPUT_SIZE, INPUT_SIZE), NORMALISATION, NORMALISATION)
    # Rendered once at each resolution, kept at the judge's input size: the loop then only indexes tensors.
    per_resolution = [real_drawings(num_train // len(resolutions), "train", r) for r in resolutions]
    inputs = torch.cat([judge.preprocess(images) for images, _ in per_resolution])
    targets = torch.tensor([ALL_KINDS.index(kind) for _, kinds in per_resolution for kind in kinds])

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = torch.randint(0, len(inputs), (batch_size,), generator=order)
        loss = F.cross_entropy(model(pixel_values=inputs[batch]).logits, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            log.info("shape judge step %d/%d: loss %.3f", step, steps, loss.item())
    model.eval()

    heldout = {r: real_drawings(num_heldout, "heldout", r) for r in resolutions}
    record = {
        "settings": settings,
        "labels": list(ALL_KINDS),
        "heldout_accuracy": {str(r): accuracy(judge, *heldout[r]) for r in resolutions},
        "num_heldout": num_heldout,
    }
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    ViTImageProcessor(
        size={"height": INPUT_SIZE, "width": INPUT_SIZE}, image_mean=NORMALISATION, image_std=NORMALISATION
    ).save_pretrained(out_dir)
    (out_dir / SPEC_FILE).write_text(json.dumps(record, indent=1) + "\n")
    log.info("Shape judge at %s: held-out accuracy %s", out_dir, record["heldout_accuracy"])
    return record


def ensure_shape_judge(out_dir: str | os.PathLike, **settings) -> Path:
    """``out_dir`` holding a trained judge; trained with ``settings`` (see ``train_shape_judge``) when absent,
    into ``<out_dir>.partial`` renamed once complete, so an interrupted training is redone."""
    out_dir = Path(out_dir)
    if (out_dir / SPEC_FILE).is_file():
        return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.warning("No shape judge at %s: training it on rendered drawings first (~3 min)", out_dir)
    train_shape_judge(partial, **settings)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out_dir)
    return out_dir


def load_shape_judge(path: str | os.PathLike, setting: str = "judge") -> tuple[ImageClassifierJudge, dict]:
    """The judge and its record (held-out accuracy per resolution)."""
    judge = load_classifier_judge(str(path), setting)
    spec = Path(path) / SPEC_FILE
    return judge, json.loads(spec.read_text()) if spec.is_file() else {}
