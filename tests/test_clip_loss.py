"""Pins ContrastiveLoss to a plain symmetric cross entropy, alone and across two gloo DDP ranks."""

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from src.modules.clip_loss import ContrastiveLoss, contrastive_accuracy

WORLD_SIZE = 2
GLOBAL_BATCH = 8


def reference_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class DualEncoder(nn.Module):
    """Tiny linear image and text encoders with CLIP's learnable temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.Linear(12, 6)
        self.text_encoder = nn.Linear(10, 6)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_features = F.normalize(self.image_encoder(images), dim=-1)
        text_features = F.normalize(self.text_encoder(texts), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


# float64 so the comparison tests the gradient flow, not float32 summation order across ranks.
def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 12, generator=generator, dtype=torch.float64)
    return images, torch.randn(GLOBAL_BATCH, 10, generator=generator, dtype=torch.float64)


def make_model() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder().double()


def single_process_reference() -> dict:
    """Loss and parameter gradients of the plain loss on the whole batch, without DDP or open_clip."""
    model = make_model()
    loss = reference_clip_loss(*model(*make_batch()))
    loss.backward()
    return {"loss": loss.detach(), "grads": {name: p.grad for name, p in model.named_parameters()}}


def test_single_process_matches_plain_symmetric_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(2)
    features = [F.normalize(torch.randn(5, 7, generator=generator), dim=-1) for _ in range(2)]
    ours_inputs = [f.clone().requires_grad_() for f in features] + [torch.tensor(14.0, requires_grad=True)]
    reference_inputs = [f.clone().requires_grad_() for f in features] + [
        torch.tensor(14.0, requires_grad=True)
    ]

    loss_fn = ContrastiveLoss()
    loss = loss_fn(*ours_inputs)
    expected = reference_clip_loss(*reference_inputs)
    loss.backward()
    expected.backward()

    assert loss.ndim == 0
    torch.testing.assert_close(loss, expected)
    for ours, reference in zip(ours_inputs, reference_inputs, strict=True):
        torch.testing.assert_close(ours.grad, reference.grad)
    # Cached labels must follow a change of batch size (e.g. the last, smaller batch of an epoch).
    smaller = [f[:3] for f in features]
    torch.testing.assert_close(
        loss_fn(*smaller, torch.tensor(14.0)), reference_clip_loss(*smaller, torch.tensor(14.0))
    )


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # Built before the process group exists, as Lightning does with the LightningModule.
    losses = {local_loss: ContrastiveLoss(local_loss=local_loss) for local_loss in (False, True)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        images, texts = make_batch()
        local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        results = {}
        for local_loss, loss_fn in losses.items():
            model = nn.parallel.DistributedDataParallel(make_model())
            loss = loss_fn(*model(images[local], texts[local]))
            loss.backward()  # DDP averages the parameter gradients over the ranks here
            results[local_loss] = {
                "loss": loss.detach(),
                "grads": {name: p.grad for name, p in model.module.named_parameters()},
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_match_the_single_process_loss_and_gradients(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    expected = single_process_reference()

    # Global loss: every rank reports the loss of the concatenated batch.
    for results in per_rank:
        torch.testing.assert_close(results[False]["loss"], expected["loss"], atol=1e-6, rtol=0)
    # Local loss: each rank scores its own rows; their mean is the global loss.
    local_losses = torch.stack([results[True]["loss"] for results in per_rank])
    torch.testing.assert_close(local_losses.mean(), expected["loss"], atol=1e-6, rtol=0)

    for local_loss in (False, True):
        for rank, results in enumerate(per_rank):
            for name, grad in expected["grads"].items():
                torch.testing.assert_close(
                    results[local_loss]["grads"][name],
                    grad,
                    atol=1e-6,
                    rtol=0,
                    msg=lambda m, n=name, r=rank, ll=local_loss: f"{n} on rank {r} (local_loss={ll}): {m}",
                )


def test_contrastive_accuracy_on_a_hand_built_batch() -> None:
    # With one-hot images, logits[i, j] = text_features[j, i].
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # image 0 → text 0: hit
            [0.2, 0.8, 0.7],  # image 1 → text 1: hit
            [0.95, 0.3, 0.6],  # image 2 → text 0: miss
        ]
    )
    # Columns: text 0 → image 2 (miss), text 1 → image 1 (hit), text 2 → image 1 (miss).
    accuracy = contrastive_accuracy(torch.eye(3), logits.T.contiguous())
    assert accuracy.item() == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert contrastive_accuracy(torch.eye(4), torch.eye(4)).item() == 1.0


def test_contrastive_accuracy_rejects_unpaired_features() -> None:
    with pytest.raises(ValueError, match="paired"):
        contrastive_accuracy(torch.zeros(3, 4), torch.zeros(2, 4))
