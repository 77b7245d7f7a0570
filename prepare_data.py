"""Write the bilingual shards every module trains on.

    python prepare_data.py source=synthetic out_dir=data/synthetic num_samples=2000 seed=0
    python prepare_data.py source=coco out_dir=data/coco coco.images_dir=DIR \\
        coco.captions_json=[DIR/annotations/captions_train2014.json,DIR/annotations/captions_val2014.json] \\
        coco.korean_json=MSCOCO_train_val_Korean.json [coco.karpathy_json=dataset_coco.json]
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _path(value: str | None) -> str | None:
    from hydra.utils import to_absolute_path

    return to_absolute_path(str(value)) if value not in (None, "") else None


@hydra.main(version_base="1.3", config_path="configs", config_name="prepare_data")
def main(cfg: DictConfig) -> dict[str, int]:
    """Build the shards of ``cfg.source`` into ``cfg.out_dir`` and print the counts."""
    if cfg.source not in ("synthetic", "coco"):
        # Checked before out_dir, whose default is looked up by source and would fail less clearly.
        raise ValueError(f"source must be 'synthetic' or 'coco', got {cfg.source!r}")
    out_dir = _path(cfg.out_dir)
    if cfg.source == "synthetic":
        from src.data.synthetic import generate_synthetic_dataset

        counts = generate_synthetic_dataset(
            out_dir,
            num_samples=cfg.num_samples,
            seed=cfg.seed,
            image_size=cfg.image_size,
            split_fractions=tuple(cfg.split_fractions),
            samples_per_shard=cfg.samples_per_shard,
        )
    else:
        from src.data.coco import build_coco_shards

        captions = (
            OmegaConf.to_container(cfg.coco.captions_json)
            if OmegaConf.is_list(cfg.coco.captions_json)
            else [cfg.coco.captions_json]
        )
        counts = build_coco_shards(
            captions_json=[_path(c) for c in captions],
            images_dir=_path(cfg.coco.images_dir),
            korean_json=_path(cfg.coco.korean_json),
            out_dir=out_dir,
            karpathy_json=_path(cfg.coco.karpathy_json),
            val_fraction_of_coco_val=cfg.coco.val_fraction,
            seed=cfg.seed,
            samples_per_shard=cfg.samples_per_shard or 1000,
            max_image_side=cfg.coco.max_image_side,
            require_korean=cfg.coco.require_korean,
        )
    print(json.dumps({"source": cfg.source, "out_dir": out_dir, **counts}, indent=2, ensure_ascii=False))
    return counts


if __name__ == "__main__":
    main()
