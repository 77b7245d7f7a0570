"""One command per table or figure of the three studies: run what is missing, then write ours | paper | difference.

python reproduce.py table=thesis_clip variant=demo          # offline, on the generated data
python reproduce.py table=thesis_clip coco_root=/data/coco_webtoon/hayao   # the thesis' setting
python reproduce.py table=paper000_finetune hanok_dir=/data/hanok

Tables are configs/table/*.yaml. Each run goes to out_dir/<run name>; a rerun skips the runs that finished, so a
stopped reproduction resumes. out_dir/table.md holds the table, its figures, the code version and the resolved
table config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from src.utils.cli import one_line_errors

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
log = logging.getLogger(__name__)


def reproduce(cfg: DictConfig) -> Path:
    """Run the table's missing runs for ``cfg.variant`` and write its table; returns ``table.md``."""
    from hydra.utils import instantiate

    from src.benchmark.tables import run_missing, write_table

    tables = sorted(p.stem for p in (ROOT / "configs" / "table").glob("*.yaml"))
    if cfg.get("table") is None:
        raise ValueError(f"Choose a table: table={'|'.join(tables)}.")
    if cfg.variant not in ("paper", "demo"):
        raise ValueError(f"variant must be paper or demo, got {cfg.variant!r}")
    spec = cfg.table[cfg.variant]
    if spec is None:
        raise ValueError(f"table={cfg.table.name} has no {cfg.variant} variant")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # only this variant resolves (a missing setting such as coco_root fails here); the other's may be unset
    resolved = OmegaConf.to_container(spec, resolve=True)
    for name, builder in (spec.get("builders") or {}).items():  # inputs the demo makes itself when missing
        log.info("Preparing %s", name)
        instantiate(builder)()
    run_missing(
        resolved["runs"],
        out_dir,
        ROOT,
        done_files=resolved.get("done_files"),
        extra_overrides=OmegaConf.to_container(cfg.run_overrides) if cfg.run_overrides else None,
    )
    table = {key: cfg.table[key] for key in ("title", "source", "demo_note") if key in cfg.table}
    yaml = OmegaConf.to_yaml(OmegaConf.create({"table": cfg.table.name, "variant": cfg.variant, **resolved}))
    path = write_table(table, cfg.variant, resolved, out_dir, ROOT, yaml)
    print(f"Table written to {path}")
    return path


@hydra.main(version_base="1.3", config_path="configs", config_name="reproduce.yaml")
@one_line_errors
def main(cfg: DictConfig) -> None:
    reproduce(cfg)


if __name__ == "__main__":
    main()
