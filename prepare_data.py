"""Write the bilingual shards every module trains on, and caption image folders for Stable Diffusion fine-tuning.

    python prepare_data.py source=synthetic out_dir=data/synthetic num_samples=2000 seed=0
    python prepare_data.py source=coco out_dir=data/coco coco.images_dir=DIR \\
        coco.captions_json=[DIR/annotations/captions_train2014.json,DIR/annotations/captions_val2014.json] \\
        coco.korean_json=MSCOCO_train_val_Korean.json [coco.karpathy_json=dataset_coco.json]
    python prepare_data.py source=captions images_dir=DIR captioner=Salesforce/blip-image-captioning-base \\
        replace='{"a building with a roof": "*"}' [batch_size=8] [overwrite=true]

Thesis chapter II's dataset stages (docs/dataset_stages.md):

    python prepare_data.py source=coco ... cartoonize.styles=[hayao,hosoda,paprika,shinkai] cartoonize.weights_dir=W
    python prepare_data.py source=shards shards='DIR/{train,val,test}-*.tar' out_dir=OUT \\
        cartoonize.styles=[hayao] cartoonize.weights_dir=W [trainer=gpu | trainer=ddp trainer.num_nodes=N]
    python prepare_data.py source=stories shards='OUT/photo/test-*.tar' out_dir=OUT model=LM num_captions=5000
    python prepare_data.py source=stories stories.import_jsonl=chatgpt_stories.jsonl out_dir=OUT

The image index that retrieval-guided generation searches (thesis chapter V, src/retrieval/index.py):

    python prepare_data.py source=index clip=RUN/checkpoints/last.ckpt shards='DIR/train-*.tar' \
        out_dir=data/index [index.batch_size=64] [index.dtype=float16] [device=auto]

Cartoonizing writes ``out_dir/<style>/`` beside ``out_dir/photo`` (the originals), runs in Lightning's predict
loop (so ``trainer=...`` scales it out) and resumes per shard; stories land in ``out_dir/stories.jsonl``.

source=captions writes a kohya ``<image>.txt`` caption beside each image of images_dir (BLIP's caption with each
phrase of ``replace`` swapped, as paper 000 did for Textual Inversion); images that have one are kept unless
overwrite=true. ``captioner`` is a hub id or a local copy (``save_pretrained`` output).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from src.utils.cli import one_line_errors

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "coco", "captions", "shards", "stories", "index")


def _path(value: str | None) -> str | None:
    from hydra.utils import to_absolute_path

    return to_absolute_path(str(value)) if value not in (None, "") else None


@hydra.main(version_base="1.3", config_path="configs", config_name="prepare_data")
@one_line_errors
def main(cfg: DictConfig) -> dict[str, Any]:
    """Build the shards (or cartoonized shards, or stories) of ``cfg.source`` into ``cfg.out_dir``, or caption
    ``cfg.images_dir``; print the counts."""
    if cfg.source not in SOURCES:
        # Checked before out_dir, whose default is looked up by source and would fail less clearly.
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {cfg.source!r}")
    if cfg.source == "captions":
        counts = caption_folder(cfg)
        print(json.dumps({"source": cfg.source, "images_dir": _path(cfg.images_dir), **counts}, indent=2))
        return counts
    out_dir = _path(cfg.out_dir)
    if cfg.source == "synthetic":
        from src.demo.synthetic import generate_synthetic_dataset

        counts = generate_synthetic_dataset(
            out_dir,
            num_samples=cfg.num_samples,
            seed=cfg.seed,
            image_size=cfg.image_size,
            split_fractions=tuple(cfg.split_fractions),
            samples_per_shard=cfg.samples_per_shard,
        )
    elif cfg.source == "coco":
        counts = coco_shards(cfg, out_dir)
    elif cfg.source == "shards":
        counts = cartoonize(cfg, _shard_patterns(cfg), out_dir)
    elif cfg.source == "index":
        counts = image_index(cfg, out_dir)
    else:
        counts = stories(cfg, out_dir)
    if _is_global_rank_zero():  # DDP ranks run this script too; one summary is enough
        print(json.dumps({"source": cfg.source, "out_dir": out_dir, **counts}, indent=2, ensure_ascii=False))
    return counts


def coco_shards(cfg: DictConfig, out_dir: str) -> dict[str, Any]:
    """``out_dir/photo`` from COCO, then each of ``cartoonize.styles`` beside it."""
    from src.data.coco import build_coco_shards

    captions = (
        OmegaConf.to_container(cfg.coco.captions_json)
        if OmegaConf.is_list(cfg.coco.captions_json)
        else [cfg.coco.captions_json]
    )
    settings = {
        "captions_json": [_path(c) for c in captions],
        "images_dir": _path(cfg.coco.images_dir),
        "korean_json": _path(cfg.coco.korean_json),
        "karpathy_json": _path(cfg.coco.karpathy_json),
        "val_fraction_of_coco_val": cfg.coco.val_fraction,
        "seed": cfg.seed,
        "samples_per_shard": cfg.samples_per_shard or 1000,
        "max_image_side": cfg.coco.max_image_side,
        "require_korean": cfg.coco.require_korean,
    }

    def build() -> dict[str, Any]:
        return build_coco_shards(out_dir=out_dir, **settings)

    if not cfg.cartoonize.styles:
        return build()
    from src.data.cartoonize import photo_shards_for_styles

    photo, counts = photo_shards_for_styles(out_dir, settings, build)
    return {**counts, "cartoonize": cartoonize(cfg, photo, out_dir)}


def cartoonize(cfg: DictConfig, shards: str | list[str], out_dir: str) -> dict[str, Any]:
    from src.data.cartoonize import cartoonize_shards

    settings = cfg.cartoonize
    styles = list(settings.styles) if OmegaConf.is_list(settings.styles) else [settings.styles]
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_options.pop("_target_", None)
    return cartoonize_shards(
        shards,
        out_dir,
        styles=styles,  # cartoonize.styles=hayao means [hayao]
        weights_dir=_path(settings.weights_dir),
        load_size=settings.load_size,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        encode_threads=settings.encode_threads,
        trainer_options=trainer_options,
    )


def stories(cfg: DictConfig, out_dir: str) -> dict[str, Any]:
    from src.data.stories import generate_stories, import_stories

    settings = cfg.stories
    if settings.import_jsonl:
        return import_stories(_path(settings.import_jsonl), out_dir)
    if not settings.model:
        raise ValueError(
            "source=stories needs model=<causal LM hub id or local dir> to write stories, "
            "or stories.import_jsonl=FILE to import stories written elsewhere."
        )
    return generate_stories(
        _shard_patterns(cfg),
        out_dir,
        model=str(settings.model),  # a hub id, or a local dir (relative to where the command runs)
        num_captions=cfg.num_captions,
        language=settings.language,
        prompt=settings.prompt,
        seed=cfg.seed,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_p=settings.top_p,
        device=cfg.device,
    )


def image_index(cfg: DictConfig, out_dir: str) -> dict[str, Any]:
    """Every image of ``cfg.shards`` embedded by the CLIP ``cfg.clip`` into an index in ``out_dir``."""
    from src.retrieval.encoder import CLIPEncoder
    from src.retrieval.index import build_image_index

    if not cfg.clip:
        raise ValueError(
            "source=index needs clip=<a CLIP checkpoint of train.py (RUN/checkpoints/last.ckpt) or its "
            "export directory (evaluate.py ... export_dir=DIR)>."
        )
    encoder = CLIPEncoder.load(_path(cfg.clip), device=cfg.device or "auto", setting="clip")
    return build_image_index(
        _shard_patterns(cfg), encoder, out_dir, batch_size=cfg.index.batch_size, dtype=cfg.index.dtype
    )


def _shard_patterns(cfg: DictConfig) -> list[str]:
    if not cfg.shards:
        raise ValueError(
            f"source={cfg.source} needs shards=PATTERN, e.g. shards='data/coco_webtoon/photo/{{train,val,test}}-*.tar'"
        )
    patterns = OmegaConf.to_container(cfg.shards) if OmegaConf.is_list(cfg.shards) else [cfg.shards]
    return [_path(pattern) for pattern in patterns]


def _is_global_rank_zero() -> bool:
    if "lightning" not in sys.modules:  # no trainer ran in this process
        return True
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def caption_folder(cfg: DictConfig) -> dict[str, Any]:
    from src.data.captioning import caption_images

    if not cfg.images_dir:
        raise ValueError("source=captions needs images_dir=DIR, the folder of images to caption.")
    replace = cfg.replace or {}
    # a JSON object arrives as a string (see quote_json_overrides), Hydra's own dict syntax as a DictConfig
    replace = (
        json.loads(replace) if isinstance(replace, str) else OmegaConf.to_container(OmegaConf.create(replace))
    )
    return caption_images(
        _path(cfg.images_dir),
        captioner=cfg.captioner,
        replace=replace,
        batch_size=cfg.batch_size,
        overwrite=cfg.overwrite,
        max_new_tokens=cfg.max_new_tokens,
        device=cfg.device,
    )


def quote_json_overrides(argv: list[str]) -> list[str]:
    """Hydra's override grammar has no quoted dict keys, so ``replace={"a building with a roof": "*"}`` (JSON)
    would not parse: such a JSON object is handed on as a quoted string, which :func:`caption_folder` decodes."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "replace" and value.lstrip().startswith("{"):
            try:
                json.loads(value)
            except ValueError:  # Hydra's own dict syntax: {a building with a roof: "*"}
                quoted.append(arg)
                continue
            # inside a quoted override only a quote needs its backslash; "\\${" keeps OmegaConf from interpolating
            escaped = value.replace("'", "\\'").replace("${", "\\${")
            arg = f"{key}='{escaped}'"
        quoted.append(arg)
    return quoted


def quote_shard_patterns(argv: list[str]) -> list[str]:
    """``shards=DIR/{train,val,test}-*.tar`` as a shell hands it on (its quotes removed) is a Hydra dict and a
    sweep; such a brace pattern is passed on quoted, so the documented commands work as typed."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "shards" and "{" in value and value[:1] not in ("'", '"', "["):
            arg = f"{key}='{value.replace(chr(39), chr(92) + chr(39))}'"
        quoted.append(arg)
    return quoted


def stories_model_override(argv: list[str]) -> list[str]:
    """``model=LM`` (the documented short form) -> ``stories.model=LM``: ``model`` is the name of train.py's config
    group, so Hydra would read ``model=LM`` as a choice in that group."""
    return [
        "stories.model=" + arg.partition("=")[2] if arg.lstrip("+").startswith("model=") else arg
        for arg in argv
    ]


def hydra_overrides(argv: list[str]) -> list[str]:
    """The command line as typed -> overrides Hydra parses as meant (see the three functions above)."""
    return stories_model_override(quote_shard_patterns(quote_json_overrides(argv)))


if __name__ == "__main__":
    sys.argv = hydra_overrides(sys.argv)
    main()
