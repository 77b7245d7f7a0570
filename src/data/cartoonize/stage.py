"""The cartoonizing stage: source shards -> one mirrored shard set per style, through Lightning's predict loop.

    source shards --(expand, check names)--> generators loaded strictly (a missing file fails before any reading)
      --> loader of same-size photo batches (split by rank and worker, finished shards skipped)
      --> Trainer.predict: each style's generator on each batch
      --> StyleShardWriter: out_dir/<style>/<shard>.tar + done record, per shard
      --> sizes.json per style (rank 0), counts

Captions, keys, ids and sample order come from the source records unchanged, so every style's shard set
lines up with the photo set record for record.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

from src.data.cartoonize.cartoongan import LOAD_SIZE
from src.data.cartoonize.predict import Cartoonizer, StyleShardWriter
from src.data.cartoonize.progress import output_shard, pending_styles, read_record, split_of
from src.data.cartoonize.reading import photo_batches
from src.data.cartoonize.styles import PHOTO, load_generator, resolve_styles
from src.data.pipeline import describe_skips, expand_shards
from src.data.schema import SPLITS
from src.data.shards import read_sizes, update_sizes

log = logging.getLogger(__name__)

# Prediction needs no logger, checkpoints or summary; float32 because the published generators are float32
# and their instance norms (eps 1e-9) are not safe in half precision.
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "enable_progress_bar": False,
    "precision": "32-true",
}
PHOTO_BUILD_FILE = "build.json"


def cartoonize_shards(
    shards: str | Sequence[str],
    out_dir: str | os.PathLike,
    styles: Sequence[str],
    weights_dir: str | os.PathLike | None,
    load_size: int | None = LOAD_SIZE,
    batch_size: int = 8,
    num_workers: int = 2,
    encode_threads: int = 4,
    trainer_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Cartoonize every image of ``shards`` into ``out_dir/<style>/<same shard name>`` for each style.

    Resumable: shards finished by an earlier run are skipped, half-written ones redone. ``trainer_options``
    are Lightning ``Trainer`` arguments (``accelerator``, ``devices``, ``strategy="ddp"``, ``num_nodes``).
    Returns samples per split for each style, shard and skip counts, and this run's images/s.
    """
    chosen = resolve_styles(styles)
    if not chosen:
        raise ValueError(
            "cartoonize.styles is empty: name at least one style, e.g. cartoonize.styles=[hayao]"
        )
    sources = expand_shards(list(shards) if not isinstance(shards, str) else shards)
    out_dir = Path(out_dir)
    _check_outputs_apart_from_sources(sources, out_dir, [style.name for style in chosen])
    generators = {style.name: load_generator(style, weights_dir) for style in chosen}
    names = list(generators)

    pending = sum(bool(pending_styles(out_dir, names, source)) for source in sources)
    log.info("cartoonize: %d of %d source shards need %s", pending, len(sources), ", ".join(names))
    images, seconds = 0, 0.0
    if pending:
        writer = StyleShardWriter(out_dir, encode_threads)
        trainer = L.Trainer(**{**TRAINER_DEFAULTS, **(trainer_options or {})}, callbacks=[writer])
        loader = photo_batches(sources, out_dir, names, load_size, batch_size, num_workers)
        with warnings.catch_warnings():
            # the writer needs no dataset indices (batches carry their shard and record positions)
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            trainer.predict(Cartoonizer(generators), dataloaders=loader, return_predictions=False)
        images, seconds = writer.total_images, writer.seconds

    counts = summarize(sources, out_dir, names)
    if rank_zero_only.rank == 0:
        for style, per_split in counts["styles"].items():
            update_sizes(out_dir / style, per_split)
    if not any(n for per_split in counts["styles"].values() for n in per_split.values()):
        raise RuntimeError(
            f"cartoonize: no image of {len(sources)} shards could be read (skipped: "
            f"{describe_skips(counts['skipped'])}); check the shards given as `shards=`."
        )
    counts |= {
        "shards_cartoonized": pending,
        "shards_already_done": len(sources) - pending,
        "images": images,
        "images_per_s": round(images / seconds, 3) if seconds else None,
    }
    log.info("cartoonize: %s", counts)
    return counts


def summarize(sources: list[str], out_dir: Path, styles: list[str]) -> dict[str, Any]:
    """Samples per split for each style and skip counts by reason, from the finished shards' records."""
    per_style: dict[str, dict[str, int]] = {}
    skipped: Counter[str] = Counter()
    for style in styles:
        per_split: Counter[str] = Counter()
        for source in sources:
            record = read_record(out_dir, style, source)
            if record is None:
                raise RuntimeError(f"cartoonize: {output_shard(out_dir, style, source)} was not finished")
            per_split[split_of(source)] += record.samples
            if style == styles[0]:  # the same source records were skipped for every style
                skipped.update(record.skipped)
        per_style[style] = dict(sorted(per_split.items()))
    return {"styles": per_style, "shards": len(sources), "skipped": dict(skipped)}


def _check_outputs_apart_from_sources(sources: list[str], out_dir: Path, styles: list[str]) -> None:
    names = Counter(Path(source).name for source in sources)
    repeated = [name for name, n in names.items() if n > 1]
    if repeated:
        raise ValueError(
            f"cartoonize: shards from different folders share names {repeated[:3]}; their outputs in "
            f"{out_dir}/<style>/ would collide. Cartoonize each folder into its own out_dir."
        )
    resolved = {Path(source).resolve() for source in sources}
    for style in styles:
        if any(output_shard(out_dir, style, source).resolve() in resolved for source in sources):
            raise ValueError(
                f"cartoonize: out_dir/{style} is where the source shards are; choose another out_dir"
            )


def photo_shards_for_styles(
    out_dir: str | os.PathLike, settings: Mapping[str, Any], build: Callable[[], dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """``out_dir/photo`` for cartoonizing: reused when an earlier run built it from the same ``settings``
    (so a rerun resumes the styles instead of rebuilding, and DDP ranks started later read it as it is),
    else built by ``build`` in a process that runs alone. Returns the photo shard pattern and the build's counts."""
    photo_dir = Path(out_dir) / PHOTO
    record = photo_dir / PHOTO_BUILD_FILE
    settings = json.loads(json.dumps(dict(settings), default=str))
    built = json.loads(record.read_text()) if record.is_file() else None
    complete = set(read_sizes(photo_dir)) >= set(SPLITS)
    if built is not None and built.get("settings") == settings and complete:
        log.info(
            "Reusing the photo shards in %s (built with the same settings; delete it to rebuild)", photo_dir
        )
        counts = built["counts"]
    elif _one_of_several_processes():
        raise RuntimeError(
            f"{photo_dir} is not built yet, and processes started together must not all build it. Build it "
            "once on one process (the same command without cartoonize.styles), then cartoonize it on the "
            "cluster with "
            f"source=shards shards='{photo_dir}/{{train,val,test}}-*.tar'."
        )
    else:
        record.unlink(missing_ok=True)  # an interrupted build must not pass for a finished one
        counts = build()
        record.write_text(json.dumps({"settings": settings, "counts": counts}, indent=2, ensure_ascii=False))
    return str(photo_dir / "{train,val,test}-*.tar"), counts


def _one_of_several_processes() -> bool:
    """Whether a cluster launcher (srun, torchrun) or Lightning started this process beside others that run the
    same command at the same time."""
    sizes = [os.environ.get(name, "1") for name in ("WORLD_SIZE", "SLURM_NTASKS")]
    return rank_zero_only.rank != 0 or any(size.isdigit() and int(size) > 1 for size in sizes)
