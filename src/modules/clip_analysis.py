"""The thesis' CLIP analyses: similarity table, PCA of embeddings, top-k retrieval grid, zero-shot labels, and
the image-embedding index that retrieval-guided generation searches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.data.preprocess import Preprocess
from src.modules.dual_encoder import DualEncoder


@dataclass(frozen=True)
class AnalysisSettings:
    """How much of the split each analysis shows (``model.analyses``)."""

    pca_images: int = 50  # images (and their captions, per language) in the PCA plot
    similarity_other_images: int = 2  # images whose captions are the distractors in the similarity table
    query_images: int = 4  # images whose captions (one per language) query the retrieval grid
    top_k: int = 4  # retrieved images per query
    thumbnails: int = 64  # first images kept as the retrieval grid's gallery
    zero_shot_images: int = 8
    zero_shot_labels: tuple[str, ...] = field(default_factory=tuple)
    zero_shot_template: str = "{}"


@dataclass
class EncodedSplit:
    """Image embeddings of a split with the keys, captions (and their languages) and thumbnails to show results."""

    keys: list[str] = field(default_factory=list)
    image_embeds: torch.Tensor | None = None
    captions: list[list[str]] = field(default_factory=list)
    languages: list[list[str]] = field(default_factory=list)
    thumbnails: list[torch.Tensor] = field(default_factory=list)  # [3,H,W] in [0,1]

    def first_caption_in(self, language: str, count: int) -> tuple[list[int], list[str]]:
        """Indexes of the first ``count`` images with a caption in ``language``, and that caption of each."""
        found = [
            (i, captions[languages.index(language)])
            for i, (captions, languages) in enumerate(zip(self.captions, self.languages, strict=True))
            if language in languages
        ][:count]
        return [i for i, _ in found], [c for _, c in found]


@torch.no_grad()
def encode_split(
    encoder: DualEncoder, dataloader, preprocess: Preprocess, keep_thumbnails: int
) -> EncodedSplit:
    """One pass over an evaluation dataloader: every image embedding, plus thumbnails of the first images."""
    device = next(encoder.parameters()).device
    out, embeds = EncodedSplit(), []
    for batch in dataloader:
        embeds.append(encoder.encode_image(batch["image"].to(device)).float().cpu())
        out.keys += batch["key"]
        index = batch["caption_image_index"].tolist()
        for i in range(len(batch["key"])):
            mine = [j for j, owner in enumerate(index) if owner == i]
            out.captions.append([batch["all_captions"][j] for j in mine])
            out.languages.append([batch["all_languages"][j] for j in mine])
        if len(out.thumbnails) < keep_thumbnails:
            images = preprocess.denormalize(batch["image"])
            out.thumbnails += list(images[: keep_thumbnails - len(out.thumbnails)])
    out.image_embeds = torch.cat(embeds) if embeds else torch.empty(0)
    return out


@torch.no_grad()
def encode_texts(encoder: DualEncoder, preprocess: Preprocess, texts: list[str]) -> torch.Tensor:
    device = next(encoder.parameters()).device
    tokens = {k: v.to(device) for k, v in preprocess.tokenize(texts).items()}
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
    """Scatter of the first two principal components of several embedding groups (images, text per language)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = torch.cat(list(groups.values()))
    centre = everything.mean(0, keepdim=True)
    _, _, components = torch.pca_lowrank(everything - centre, q=2, center=False)
    fig, ax = plt.subplots(figsize=(6, 6))
    for (name, embeds), marker in zip(groups.items(), "o^sv", strict=False):
        points = (embeds - centre) @ components
        ax.scatter(points[:, 0], points[:, 1], s=14, marker=marker, label=name, alpha=0.7)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def retrieval_grid(
    queries: list[str], hits: torch.Tensor, thumbnails: list[torch.Tensor], path: Path
) -> None:
    """One row per query (printed beside it): its top-k images (indexes into ``thumbnails``), best first."""
    from src.utils.image_grid import captioned_grid, save_grid

    rows = [[thumbnails[i] for i in row] for row in hits.tolist()]
    titles = [f"top {k + 1}" for k in range(hits.shape[1])]
    save_grid(captioned_grid(rows, queries, column_titles=titles, cell_size=96), path)


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
    preprocess: Preprocess,
    dataloader,
    out_dir: Path,
    settings: AnalysisSettings = AnalysisSettings(),
) -> dict[str, Path]:
    """Every analysis of chapter IV for one split, written into ``out_dir``; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = encode_split(encoder, dataloader, preprocess, settings.thumbnails)
    files = {"index": out_dir / "image_index.safetensors"}
    save_image_index(files["index"], split.keys, split.image_embeds)
    if not split.keys:
        return files

    # One image against its own captions and the captions of a few other images, in every language.
    others = [c for captions in split.captions[1 : 1 + settings.similarity_other_images] for c in captions]
    sentences = split.captions[0] + others
    files["similarity"] = out_dir / "similarity.md"
    files["similarity"].write_text(
        f"Image `{split.keys[0]}` (its own captions first)\n\n"
        + similarity_table(split.image_embeds[0], sentences, encode_texts(encoder, preprocess, sentences)),
        encoding="utf-8",
    )

    shown = min(len(split.keys), settings.pca_images)
    groups = {"images": split.image_embeds[:shown]}
    for language in sorted({lang for languages in split.languages for lang in languages}):
        _, captions = split.first_caption_in(language, shown)
        groups[f"captions ({language})"] = encode_texts(encoder, preprocess, captions)
    files["pca"] = out_dir / "pca.png"
    pca_plot(groups, files["pca"])

    queries = [
        captions[languages.index(language)]
        for captions, languages in zip(
            split.captions[: settings.query_images], split.languages[: settings.query_images], strict=True
        )
        for language in dict.fromkeys(languages)
    ]
    gallery = split.image_embeds[: len(split.thumbnails)]
    hits = top_k_images(encode_texts(encoder, preprocess, queries), gallery, settings.top_k)
    files["retrieval_grid"] = out_dir / "retrieval_grid.png"
    retrieval_grid(queries, hits, split.thumbnails, files["retrieval_grid"])

    if settings.zero_shot_labels:
        labels = list(settings.zero_shot_labels)
        prompts = [settings.zero_shot_template.format(label) for label in labels]
        count = settings.zero_shot_images
        probs = zero_shot_classify(
            split.image_embeds[:count],
            encode_texts(encoder, preprocess, prompts),
            float(encoder.logit_scale.detach()),
        )
        rows = ["| image | first caption | predicted label | probability |", "|---|---|---|---|"]
        for key, captions, p in zip(split.keys[:count], split.captions[:count], probs, strict=False):
            caption = captions[0] if captions else ""
            rows.append(f"| {key} | {caption} | {labels[int(p.argmax())]} | {float(p.max()):.2f} |")
        files["zero_shot"] = out_dir / "zero_shot.md"
        files["zero_shot"].write_text("\n".join(rows) + "\n", encoding="utf-8")
    return files
