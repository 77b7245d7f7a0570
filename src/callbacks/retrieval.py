"""Text<->image retrieval metrics over a whole split, from embeddings gathered across steps and ranks."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist

from src.metrics.retrieval import random_ranking_metrics, retrieval_metrics


class RetrievalMetrics(L.Callback):
    """Collects the image/caption embeddings that validation and test steps return and logs MRR@K, R@K, ranks.

    The step outputs are ``{"image_embeds": [B,D], "text_embeds": [T,D], "caption_image_index": [T]}``
    with indexes local to the batch. Embeddings are kept on the CPU; ranks exchange them once at epoch end.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), chunk_size: int = 1024):
        super().__init__()
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        self.last_embeddings: dict[str, torch.Tensor] | None = None
        self.gallery_sizes: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self.image_embeds: list[torch.Tensor] = []
        self.text_embeds: list[torch.Tensor] = []
        self.caption_to_image: list[torch.Tensor] = []
        self.images_seen = 0

    def _collect(self, outputs: dict) -> None:
        self.image_embeds.append(outputs["image_embeds"].detach().float().cpu())
        self.text_embeds.append(outputs["text_embeds"].detach().float().cpu())
        self.caption_to_image.append(outputs["caption_image_index"].detach().cpu() + self.images_seen)
        self.images_seen += len(outputs["image_embeds"])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, "test")

    def _log(self, pl_module: L.LightningModule, stage: str) -> None:
        embeddings = self._gather()
        self.last_embeddings = embeddings
        if embeddings is None:
            return
        metrics = retrieval_metrics(
            embeddings["text_embeds"],
            embeddings["image_embeds"],
            embeddings["caption_to_image"],
            ks=self.ks,
            chunk_size=self.chunk_size,
        )
        # Every rank holds the same gathered embeddings, so the values agree and averaging keeps them.
        self.gallery_sizes[stage] = len(embeddings["image_embeds"])
        metrics["gallery_images"] = float(self.gallery_sizes[stage])
        for name, value in metrics.items():
            pl_module.log(f"{stage}/{name}", value, prog_bar=name == f"mrr@{max(self.ks)}", sync_dist=True)

    def references(self, stage: str = "test") -> dict[str, dict[str, float]]:
        """The chance level of the last ``stage`` evaluation (random ranking over its gallery), for reports."""
        if stage not in self.gallery_sizes:
            return {}
        chance = random_ranking_metrics(self.gallery_sizes[stage], self.ks)
        return {"chance (random ranking)": {f"{stage}/{name}": value for name, value in chance.items()}}

    def _gather(self) -> dict[str, torch.Tensor] | None:
        local = {
            "image_embeds": torch.cat(self.image_embeds) if self.image_embeds else torch.empty(0),
            "text_embeds": torch.cat(self.text_embeds) if self.text_embeds else torch.empty(0),
            "caption_to_image": torch.cat(self.caption_to_image)
            if self.caption_to_image
            else torch.empty(0, dtype=torch.long),
        }
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Ranks read different shards, so their counts differ: all_gather_object takes any size.
            parts: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(parts, local)
        else:
            parts = [local]
        parts = [p for p in parts if len(p["image_embeds"])]
        if not parts:
            return None
        offsets = torch.tensor([0] + [len(p["image_embeds"]) for p in parts]).cumsum(0)
        return {
            "image_embeds": torch.cat([p["image_embeds"] for p in parts]),
            "text_embeds": torch.cat([p["text_embeds"] for p in parts]),
            "caption_to_image": torch.cat([p["caption_to_image"] + offsets[i] for i, p in enumerate(parts)]),
        }
