"""The papers' tables, rebuilt from the runs that reproduce them: ours | paper | difference.

A table (``configs/table/<name>.yaml``) names, per variant, its runs (an entry point and its overrides), its rows
(a value read from a file a run writes) and its figures. :func:`run_missing` runs only the runs whose output is not
there yet, so a stopped reproduction resumes; :func:`write_table` reads every row and writes ``table.md`` with the
code version and the resolved table config. A ``paper`` variant is tabled beside the paper's numbers; a ``demo``
variant (offline, generated data) only beside its own references (an untrained model, chance), never beside the
paper's: other data and models make those numbers incomparable.

Row values come from JSON (``metrics.json``, a benchmark's summary; ``key`` is a dotted path), CSV (``where`` picks
the row, ``key`` the column) or a run's ``metrics.md`` (``key`` is ``<metric>.<column>``).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["code_version", "read_value", "run_missing", "write_table"]

# What each entry point writes last: a run with it is done.
DONE_MARKERS = {"train.py": "metrics.json", "evaluate.py": "metrics.json", "benchmark.py": None}
# Where each entry point is told its output directory.
OUTPUT_SETTING = {"train.py": "hydra.run.dir", "evaluate.py": "hydra.run.dir", "benchmark.py": "out_dir"}


def run_missing(
    runs: Mapping[str, Sequence[str]],
    out_dir: Path,
    root: Path,
    done_files: Mapping[str, str] | None = None,
    extra_overrides: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Run each ``name: [script, override, ...]`` whose ``out_dir/name`` lacks its done file; returns those run."""
    started = []
    for name, command in runs.items():
        script, *overrides = command
        if script not in OUTPUT_SETTING:
            raise ValueError(
                f"run {name}: the entry point must be one of {sorted(OUTPUT_SETTING)}, not {script}"
            )
        run_dir = out_dir / name
        done = (done_files or {}).get(name) or DONE_MARKERS[script]
        if done is None:
            raise ValueError(
                f"run {name} ({script}) needs done_files.{name}: the file it writes when finished"
            )
        if (run_dir / done).is_file():
            log.info("%s: done (%s)", name, run_dir / done)
            continue
        argv = [
            sys.executable,
            str(root / script),
            *overrides,
            *(extra_overrides or {}).get(name, []),
            f"{OUTPUT_SETTING[script]}={run_dir}",
        ]
        log.info("%s: %s", name, " ".join(argv[1:]))
        if subprocess.run(argv, cwd=root).returncode != 0:
            raise RuntimeError(f"run {name} failed: see its output above and its run directory {run_dir}")
        started.append(name)
    return started


def read_value(run_dir: Path, row: Mapping[str, Any]) -> float:
    """The number a row names in a file of its run."""
    path = run_dir / row.get("file", "metrics.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run {run_dir.name} did not finish")
    key = str(row["key"])
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            where = {column: str(value) for column, value in (row.get("where") or {}).items()}
            matches = [r for r in csv.DictReader(handle) if all(r.get(c) == v for c, v in where.items())]
        if len(matches) != 1:
            raise ValueError(f"{path}: {len(matches)} rows match {where}, expected one")
        return float(matches[0][key])
    data: Any = (
        parse_markdown_table(path.read_text()) if path.suffix == ".md" else json.loads(path.read_text())
    )
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise ValueError(f"{path} has no {key!r} (no {part!r})")
        data = data[part]
    return float(data)


def parse_markdown_table(text: str) -> dict[str, dict[str, str]]:
    """The first markdown table of ``text``: first column -> {header: cell}."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:], strict=False))
    return table


def cell(value: float | None, signed: bool = False) -> str:
    """A table cell: three decimals (signed for differences), empty where a row has no such reference."""
    if value is None:
        return ""
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def plot_curves(metrics_csv: Path, metrics: Sequence[str], out: Path, title: str) -> None:
    """Each metric's mean per epoch from a CSVLogger file, one line each, on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    per_epoch: dict[str, dict[int, list[float]]] = {name: {} for name in metrics}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for name in metrics:
                if row.get(name) and row.get("epoch"):
                    per_epoch[name].setdefault(int(float(row["epoch"])), []).append(float(row[name]))
    missing = [name for name, values in per_epoch.items() if not values]
    if missing:
        raise ValueError(f"{metrics_csv} logs no {missing}")
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, values in per_epoch.items():
        epochs = sorted(values)
        axes.plot(
            [e + 1 for e in epochs], [sum(values[e]) / len(values[e]) for e in epochs], marker="o", label=name
        )
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title, fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def code_version(root: Path) -> str:
    """``git describe`` of the code that made the numbers (with ``-dirty`` for uncommitted changes)."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def write_table(
    table: Mapping[str, Any],
    variant: str,
    spec: Mapping[str, Any],
    out_dir: Path,
    root: Path,
    resolved_yaml: str,
) -> Path:
    """``out_dir/table.md`` (and ``table.json``): the rows of ``spec`` (the table's ``variant``), its figures, the
    code version and the resolved config of the variant."""
    paper = variant == "paper"
    records = []
    for row in spec.get("rows", []):
        ours = read_value(out_dir / row["run"], row)
        record: dict[str, Any] = {"label": row["label"], "ours": ours}
        if paper:
            record["paper"] = float(row["paper"])
            record["difference"] = ours - record["paper"]
        for name, reference in (row.get("references") or {}).items():
            record[name] = read_value(out_dir / reference.get("run", row["run"]), reference)
        records.append(record)

    columns = list(dict.fromkeys(name for record in records for name in record if name != "label"))
    lines = [f"# {table['title']}", "", f"Source: {table['source']}. Variant: **{variant}**.", ""]
    if not paper:
        lines += [
            f"{table.get('demo_note', 'Offline demo: these numbers are never comparable with the paper.')}",
            "",
        ]
    if records:
        lines += [
            "| | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
            *(
                f"| {record['label']} | "
                + " | ".join(cell(record.get(column), signed=column == "difference") for column in columns)
                + " |"
                for record in records
            ),
            "",
        ]
    for figure in spec.get("figures", []):
        matches = sorted(
            (out_dir / figure["run"]).glob(figure["file"])
        )  # the last of e.g. validation/step_*.png
        source = matches[-1] if matches else out_dir / figure["run"] / figure["file"]
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the run {figure['run']} did not write it")
        target = out_dir / figure.get("name", f"{figure['run']}_{Path(figure['file']).stem}.png")
        if figure.get("kind") == "curves":  # per-epoch means of logged metrics (a CSVLogger's metrics.csv)
            plot_curves(source, figure["metrics"], target, figure["caption"])
        else:
            shutil.copyfile(source, target)
        lines += [f"![{figure['caption']}]({target.name})", "", figure["caption"], ""]
    lines += [
        f"Code version: `{code_version(root)}`. Runs: "
        + ", ".join(f"`{name}` ({' '.join(command)})" for name, command in spec["runs"].items())
        + ".",
        "",
        "Resolved table config:",
        "",
        "```yaml",
        resolved_yaml.rstrip(),
        "```",
        "",
    ]
    path = out_dir / "table.md"
    path.write_text("\n".join(lines))
    (out_dir / "table.json").write_text(json.dumps({"variant": variant, "rows": records}, indent=1) + "\n")
    return path
