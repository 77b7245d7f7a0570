"""CLIP's symmetric contrastive loss (open_clip's `ClipLoss`) made safe for Lightning DDP, and batch accuracy."""

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ContrastiveLoss", "contrastive_accuracy", "distributed_rank_and_world_size"]


def distributed_rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over image/text features gathered from every DDP rank with gradients.

    With ``local_loss=False`` every rank computes the loss over the global batch (so the logged value is the
    global loss); ``local_loss=True`` scores only local rows against all columns, which saves memory and gives
    the same gradients after DDP averaging, but a per-rank loss whose mean over ranks is the global loss.
    """

    def __init__(self, local_loss: bool = False, cache_labels: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.cache_labels = cache_labels
        # Built on first use: Lightning creates the process group after the LightningModule, so rank and
        # world size are unknown in __init__.
        self._clip_loss: nn.Module | None = None

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        """Scalar loss; features are L2-normalised [B, D], ``logit_scale`` is already exponentiated."""
        return self._loss_for_current_group()(image_features, text_features, logit_scale)

    def _loss_for_current_group(self) -> nn.Module:
        rank, world_size = distributed_rank_and_world_size()
        clip_loss = self._clip_loss
        # Rebuilt if the group changes (e.g. a test or a fit after a single-process validation), since
        # ClipLoss bakes rank and world size into its cached labels.
        if clip_loss is None or (clip_loss.rank, clip_loss.world_size) != (rank, world_size):
            # Imported here: open_clip's package import costs seconds and is not needed to build configs.
            from open_clip.loss import ClipLoss

            # gather_with_grad: without it, gradients reach only the local features and each rank trains on
            # a different, smaller objective than the global-batch loss it logs.
            clip_loss = ClipLoss(
                local_loss=self.local_loss,
                gather_with_grad=True,
                cache_labels=self.cache_labels,
                rank=rank,
                world_size=world_size,
            )
            self._clip_loss = clip_loss
        return clip_loss


@torch.no_grad()
def contrastive_accuracy(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Mean of image→text (row argmax) and text→image (column argmax) hit rates on the local batch logits."""
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must be paired [B, D], got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    # The logit scale is positive, so it cannot move an argmax and is left out.
    logits = image_features.float() @ text_features.float().T
    targets = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = (logits.argmax(dim=1) == targets).float().mean()
    text_to_image = (logits.argmax(dim=0) == targets).float().mean()
    return (image_to_text + text_to_image) / 2
