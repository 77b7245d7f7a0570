"""The thesis' CLIP analyses: similarity table, PCA of embeddings, top-k retrieval grid, zero-shot labels, and
the image-embedding index that retrieval-guided generation searches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.modules.dual_encoder import DualEncoder


@dataclass
class EncodedSplit:
    """Image embeddings of a split with the keys, captions and a few thumbnails needed to show results."""

    keys: list[str] = field(default_factory=list)
    image_embeds: torch.Tensor | None = None
    captions: list[list[str]] = field(default_factory=list)
    thumbnails: list[torch.Tensor] = field(default_factory=list)  # [3,H,W] in [0,1]


@torch.no_grad()
def encode_split(
    encoder: DualEncoder, dataloader, image_mean, image_std, keep_thumbnails: int = 64
) -> EncodedSplit:
    """One pass over an evaluation dataloader: every image embedding, plus thumbnails of the first images."""
    device = next(encoder.parameters()).device
    mean = torch.tensor(image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_std).view(1, 3, 1, 1)
    out, embeds = EncodedSplit(), []
    captions_per_image: list[list[str]] = []
    for batch in dataloader:
        embeds.append(encoder.encode_image(batch["image"].to(device)).float().cpu())
        out.keys += batch["key"]
        index = batch["caption_image_index"].tolist()
        for i in range(len(batch["key"])):
            captions_per_image.append(
                [c for c, j in zip(batch["all_captions"], index, strict=True) if j == i]
            )
        if len(out.thumbnails) < keep_thumbnails:
            images = (batch["image"] * std + mean).clamp(0, 1)
            out.thumbnails += list(images[: keep_thumbnails - len(out.thumbnails)])
    out.image_embeds = torch.cat(embeds) if embeds else torch.empty(0)
    out.captions = captions_per_image
    return out


@torch.no_grad()
def encode_texts(encoder: DualEncoder, tokenizer, texts: list[str], max_length: int = 64) -> torch.Tensor:
    device = next(encoder.parameters()).device
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(
        device
    )
    return encoder.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().cpu()


def similarity_table(image_embed: torch.Tensor, sentences: list[str], sentence_embeds: torch.Tensor) -> str:
    """Markdown table of the cosine similarity between one image and each sentence (thesis Fig. IV)."""
    similarities = sentence_embeds @ image_embed
    rows = ["| sentence | cosine similarity |", "|---|---|"]
    rows += [f"| {s} | {v:.3f} |" for s, v in zip(sentences, similarities.tolist(), strict=True)]
    return "\n".join(rows) + "\n"


def zero_shot_classify(
    image_embeds: torch.Tensor, label_embeds: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Class probabilities per image over the label prompts (CLIP zero-shot classification)."""
    return (logit_scale * image_embeds @ label_embeds.T).softmax(dim=-1)


def top_k_images(query_embeds: torch.Tensor, image_embeds: torch.Tensor, k: int) -> torch.Tensor:
    """Indexes of the k most similar images for each query, best first."""
    return (query_embeds @ image_embeds.T).topk(min(k, len(image_embeds)), dim=-1).indices


def pca_plot(groups: dict[str, torch.Tensor], path: Path, title: str = "PCA of CLIP embeddings") -> None:
    """Scatter of the first two principal components of several embedding groups (images, en and ko text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = torch.cat(list(groups.values()))
    centred = everything - everything.mean(0, keepdim=True)
    _, _, components = torch.pca_lowrank(centred, q=2, center=False)
    fig, ax = plt.subplots(figsize=(6, 6))
    for (name, embeds), marker in zip(groups.items(), "o^sv", strict=False):
        points = (embeds - everything.mean(0, keepdim=True)) @ components
        ax.scatter(points[:, 0], points[:, 1], s=14, marker=marker, label=name, alpha=0.7)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def retrieval_grid(
    queries: list[str], hits: torch.Tensor, thumbnails: list[torch.Tensor], path: Path
) -> None:
    """One row per query: its top-k images (indexes into ``thumbnails``) as a PNG, the queries in a sidecar file."""
    from torchvision.utils import save_image

    rows = [thumbnails[i] for row in hits.tolist() for i in row]
    save_image(torch.stack(rows), path, nrow=hits.shape[1], padding=2, pad_value=1.0)
    path.with_suffix(".txt").write_text(
        "\n".join(f"row {i}: {q}" for i, q in enumerate(queries)) + "\n", encoding="utf-8"
    )


def save_image_index(path: Path, keys: list[str], image_embeds: torch.Tensor) -> None:
    """The dataset's image embeddings on disk (safetensors + keys) for retrieval-guided generation."""
    from safetensors.torch import save_file

    save_file({"image_embeds": image_embeds.contiguous()}, str(path))
    path.with_suffix(".keys.json").write_text(json.dumps(keys))


def load_image_index(path: str | Path) -> tuple[list[str], torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    return json.loads(path.with_suffix(".keys.json").read_text()), load_file(str(path))["image_embeds"]


def write_clip_report(
    encoder: DualEncoder,
    tokenizer,
    dataloader,
    out_dir: Path,
    image_mean,
    image_std,
    zero_shot_labels: list[str],
    zero_shot_template: str = "{}",
    top_k: int = 4,
) -> dict[str, Path]:
    """Every analysis of chapter IV for one split, written into ``out_dir``; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = encode_split(encoder, dataloader, image_mean, image_std)
    files = {"index": out_dir / "image_index.safetensors"}
    save_image_index(files["index"], split.keys, split.image_embeds)
    if not split.keys:
        return files

    # One image against its own captions and the captions of two other images, in both languages.
    others = [c for captions in split.captions[1:3] for c in captions]
    sentences = split.captions[0] + others
    files["similarity"] = out_dir / "similarity.md"
    files["similarity"].write_text(
        f"Image `{split.keys[0]}` (its own captions first)\n\n"
        + similarity_table(split.image_embeds[0], sentences, encode_texts(encoder, tokenizer, sentences)),
        encoding="utf-8",
    )

    shown = min(len(split.keys), 50)
    first_captions = [c[0] for c in split.captions[:shown] if c]
    last_captions = [c[-1] for c in split.captions[:shown] if c]  # Korean when the split has both languages
    files["pca"] = out_dir / "pca.png"
    pca_plot(
        {
            "images": split.image_embeds[:shown],
            "first caption (en)": encode_texts(encoder, tokenizer, first_captions),
            "last caption (ko)": encode_texts(encoder, tokenizer, last_captions),
        },
        files["pca"],
    )

    queries = [
        split.captions[i][j] for i in range(min(4, len(split.captions))) for j in (0, -1) if split.captions[i]
    ]
    in_thumbnails = len(split.thumbnails)
    hits = top_k_images(encode_texts(encoder, tokenizer, queries), split.image_embeds[:in_thumbnails], top_k)
    files["retrieval_grid"] = out_dir / "retrieval_grid.png"
    retrieval_grid(queries, hits, split.thumbnails, files["retrieval_grid"])

    if zero_shot_labels:
        prompts = [zero_shot_template.format(label) for label in zero_shot_labels]
        probs = zero_shot_classify(
            split.image_embeds[:8], encode_texts(encoder, tokenizer, prompts), float(encoder.logit_scale)
        )
        rows = ["| image | first caption | predicted label | probability |", "|---|---|---|---|"]
        for key, captions, p in zip(split.keys[:8], split.captions[:8], probs, strict=False):
            rows.append(
                f"| {key} | {captions[0] if captions else ''} | {zero_shot_labels[int(p.argmax())]} | {float(p.max()):.2f} |"
            )
        files["zero_shot"] = out_dir / "zero_shot.md"
        files["zero_shot"].write_text("\n".join(rows) + "\n", encoding="utf-8")
    return files
