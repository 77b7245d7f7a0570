"""Paper 000's comparison of fine-tuning methods: method x number of training images, judged per prompt.

A *cell* is one ``train.py`` run of a method's experiment on the first N images of the subject's folder. Cells
train through a Hydra multirun of ``train.py`` (one per method, its sizes as the sweep), so a cluster launcher
(``launcher=submitit_slurm``) runs them in parallel exactly as it runs any sweep of this project. Each finished
cell is then judged here: ``num_images_per_prompt`` images per prompt with fixed seeds, scored by

- CLIP-T, the paper's CLIP score: the cosine between an image and its prompt (``*`` read as the subject's name
  the judge knows), in [0, 1] as the paper tables it (torchmetrics' CLIP score / 100);
- CLIP-I, concept fidelity as DreamBooth reports it: the mean cosine between generated images and the subject's
  images, in the judge's image space;
- optionally the concept rate: the share of images that an image classifier which knows the subject (a
  ``concept_classifier`` directory, see ``src/metrics/classifier.py``) labels as ``concept_label``. CLIP-I can
  rank colours before objects (a teal pentagon near a teal hanok); a classifier of the subject's shape cannot.

The base model, prompted with the subject's name in place of ``*``, is the row every method must beat on CLIP-I.
A cell is done when its ``cell.json`` exists, so a stopped benchmark rerun with the same command trains and
judges only the cells not yet done; ``base_model.json`` records which base model the cells were trained on, and a
rerun on another (e.g. a retrained demo base) stops rather than mix the two in one table. :func:`write_report` turns the cells into ``results.csv``, ``tables.md``
(the paper's Tables 2-4 layout), ``training_time.png`` (its Figure 6) and a method x size grid per prompt
(Figures 3-5).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["BASE", "Cell", "FineTuneBenchmark", "write_report"]

BASE = "base"  # the row of the base model, before any fine-tuning
NOT_ABOVE_BASE = "↓"  # marks a fidelity cell that fine-tuning did not lift above the base model
FIDELITY = {"clip_i": "CLIP-I", "concept_rate": "concept rate"}  # what fine-tuning must lift above the base
CELL_RESULT = "cell.json"
BASE_RECORD = "base_model.json"
METHOD_TITLES = {
    "textual_inversion": "Textual Inversion",
    "dreambooth": "DreamBooth",
    "lora": "LoRA",
    "hypernetwork": "Hypernetwork",
    BASE: "base model",
}
CSV_COLUMNS = (
    "method",
    "images",
    "prompt",
    "prompt_text",
    "clip_t",
    "clip_i",
    "concept_rate",
    "train_time_s",
    "steps",
    "peak_memory_mb",
)


@dataclass(frozen=True)
class Cell:
    method: str
    num_images: int

    @property
    def name(self) -> str:
        return f"{self.method}/images_{self.num_images}"


@dataclass
class FineTuneBenchmark:
    """The grid, where it is written and how its cells train and are judged (see ``configs/benchmark.yaml``)."""

    out_dir: Path
    image_dir: Path
    base_model: str
    methods: Mapping[str, Mapping[str, Any]]  # method -> {experiment, overrides}
    num_images: Sequence[int]
    prompts: Mapping[str, str]  # label (A, B, C) -> prompt with the placeholder
    judge: str
    subject_name: str  # how the judge and the base model read the placeholder
    placeholder: str = "*"
    concept_classifier: str | None = None  # an image classifier that knows the subject: the concept rate
    concept_label: str | None = None  # the subject's label among the classifier's
    num_images_per_prompt: int = 4
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    train_overrides: Sequence[str] = ()
    launcher: str | None = None
    device: str = "cpu"
    train_script: Path = field(default_factory=lambda: Path(os.environ.get("PROJECT_ROOT", ".")) / "train.py")

    # --- the grid -----------------------------------------------------------------------------------------

    def cells(self) -> list[Cell]:
        return [Cell(method, n) for method in self.methods for n in self.num_images]

    def run_dir(self, cell: Cell) -> Path:
        return self.out_dir / "runs" / cell.method / f"images_{cell.num_images}"

    def is_done(self, cell: Cell | str) -> bool:
        path = self.out_dir / "base" if cell == BASE else self.run_dir(cell)
        return (path / CELL_RESULT).is_file()

    def run(self) -> list[dict[str, Any]]:
        """Train and judge every cell not yet done, judge the base model once; return all results."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.check_base_model()
        if not self.is_done(BASE):
            self.judge_base()
        for method in self.methods:
            pending = [cell for cell in self.cells() if cell.method == method and not self.is_done(cell)]
            untrained = [cell for cell in pending if not (self.run_dir(cell) / "export").is_dir()]
            if untrained:
                self.train(method, [cell.num_images for cell in untrained])
            for cell in pending:
                self.judge_cell(cell)
        return self.results()

    def check_base_model(self) -> None:
        """Record the base model on the first run; stop if a rerun finds another one."""
        record, current = self.out_dir / BASE_RECORD, model_fingerprint(self.base_model)
        if not record.is_file():
            record.write_text(json.dumps(current, indent=1))
        elif json.loads(record.read_text()) != current:
            raise RuntimeError(
                f"{self.out_dir} holds cells trained on another base model than {self.base_model} (its files "
                f"differ from those recorded in {record.name}); resuming would table two base models as one. "
                "Move that directory away, or give this benchmark another name=."
            )

    def train(self, method: str, sizes: Sequence[int]) -> None:
        """One ``train.py`` multirun of ``method``'s experiment over ``sizes``; an unfinished cell restarts."""
        settings = self.methods[method]
        for size in sizes:
            shutil.rmtree(self.run_dir(Cell(method, size)), ignore_errors=True)
        command = [
            sys.executable,
            str(self.train_script),
            "--multirun",
            f"experiment={settings['experiment']}",
            f"data.image_dir={self.image_dir}",
            f"data.num_images={','.join(str(n) for n in sizes)}",
            f"model.pretrained_model_name_or_path={self.base_model}",
            f"hydra.sweep.dir={self.out_dir / 'runs' / method}",
            "hydra.sweep.subdir=images_${data.num_images}",
            *([f"hydra/launcher={self.launcher}"] if self.launcher else []),
            *settings.get("overrides", []),
            *self.train_overrides,
        ]
        log.info("Training %s on %s images: %s", method, sizes, " ".join(command))
        result = subprocess.run(command)
        if result.returncode != 0:
            raise RuntimeError(
                f"Training {method} failed (exit {result.returncode}); its runs are under "
                f"{self.out_dir / 'runs' / method}. Command: {' '.join(command)}"
            )

    # --- judging ------------------------------------------------------------------------------------------

    def judge_base(self) -> dict[str, Any]:
        from src.pipelines.loading import load_text_to_image

        text_to_image = load_text_to_image(
            base_model=self.base_model,
            device=self.device,
            # The base model knows no placeholder: it is given the subject's name instead.
            prompt_aliases={self.placeholder: self.subject_name},
            **self.sampling,
        )
        return self._judge(text_to_image, self.out_dir / "base", Cell(BASE, 0), {})

    def judge_cell(self, cell: Cell) -> dict[str, Any]:
        from src.pipelines.loading import load_text_to_image

        run_dir = self.run_dir(cell)
        text_to_image = load_text_to_image(
            base_model=self.base_model, weights=run_dir / "export", device=self.device, **self.sampling
        )
        metrics = json.loads((run_dir / "metrics.json").read_text())
        training = {
            "train_time_s": metrics.get("train/time_s"),
            "steps": metrics.get("train/steps"),
            "peak_memory_mb": metrics.get("train/peak_memory_mb"),
        }
        return self._judge(text_to_image, run_dir, cell, training)

    @property
    def sampling(self) -> dict[str, Any]:
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}

    def _judge(self, text_to_image, cell_dir: Path, cell: Cell, training: dict[str, Any]) -> dict[str, Any]:
        from src.utils.image_grid import to_pil

        judge, references = self.judge_model, self.subject_embeddings
        images = text_to_image(list(self.prompts.values()), self.num_images_per_prompt, self.seed)
        prompts = {}
        image_dir = cell_dir / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        for (label, prompt), row in zip(self.prompts.items(), images, strict=True):
            as_judged = prompt.replace(self.placeholder, self.subject_name)
            clip_t = judge(row, [as_judged] * len(row)).mean / 100
            clip_i = (judge.image_embeddings(row) @ references.T).mean()
            prompts[label] = {"prompt": prompt, "clip_t": float(clip_t), "clip_i": float(clip_i)}
            if self.concept_classifier:
                prompts[label]["concept_rate"] = self.concept_model.rate(row, self.concept_label)
            for k, image in enumerate(row):  # named by label and index, never by prompt text
                to_pil(image).save(image_dir / f"{label}_{k}.png")
        result = {"method": cell.method, "images": cell.num_images, "prompts": prompts, **training}
        (cell_dir / CELL_RESULT).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        log.info("%s: %s", cell.name, {label: round(p["clip_i"], 3) for label, p in prompts.items()})
        return result

    @cached_property
    def judge_model(self):
        """Loaded once per benchmark, not per cell."""
        from src.metrics.clip_score import load_clip_judge

        return load_clip_judge(self.judge, setting="judge").to(self.device)

    @cached_property
    def concept_model(self):
        from src.metrics.classifier import load_classifier_judge

        classifier = load_classifier_judge(self.concept_classifier, setting="evaluation.concept_classifier")
        if self.concept_label not in classifier.labels:
            raise ValueError(
                f"evaluation.concept_label={self.concept_label!r} is not a label of {self.concept_classifier} "
                f"({classifier.labels})."
            )
        return classifier.to(self.device)

    @cached_property
    def subject_embeddings(self):
        """The judge's embeddings of the subject's images, read and embedded once: CLIP-I's references."""
        return self.judge_model.image_embeddings(self.subject_images())

    def subject_images(self) -> list:
        """Every image of the subject's folder: the references of CLIP-I."""
        from PIL import Image

        from src.data.schema import IMAGE_EXTENSIONS

        paths = sorted(
            p for p in self.image_dir.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        )
        if not paths:
            raise FileNotFoundError(
                f"No images in data.image_dir={self.image_dir}: the subject's images go there."
            )
        return [Image.open(p).convert("RGB") for p in paths]

    def results(self) -> list[dict[str, Any]]:
        paths = [self.out_dir / "base" / CELL_RESULT] + [self.run_dir(c) / CELL_RESULT for c in self.cells()]
        return [json.loads(p.read_text()) for p in paths if p.is_file()]


# --- the report -------------------------------------------------------------------------------------------


def model_fingerprint(name_or_path: str) -> dict[str, Any]:
    """A hub id as it is; a local directory by its files' sizes and a hash of each file's first and last MiB
    (enough to tell retrained weights apart, and quick on Stable Diffusion's gigabytes)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return {"name_or_path": name_or_path}
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest, size = hashlib.sha256(), file.stat().st_size
        with file.open("rb") as handle:
            digest.update(handle.read(2**20))
            handle.seek(max(0, size - 2**20))
            digest.update(handle.read(2**20))
        files[file.relative_to(path).as_posix()] = [size, digest.hexdigest()]
    return {"files": files}


def write_report(
    out_dir: str | os.PathLike,
    results: Sequence[Mapping[str, Any]],
    prompts: Mapping[str, str],
    methods: Sequence[str],
    num_images: Sequence[int],
    paper: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
    note: str = "",
) -> dict[str, Path]:
    """``results.csv``, ``tables.md``, ``training_time.png`` and ``grid_<prompt>.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    rows = [
        {
            "method": result["method"],
            "images": result["images"],
            "prompt": label,
            "prompt_text": scores["prompt"],
            "clip_t": scores["clip_t"],
            "clip_i": scores["clip_i"],
            "concept_rate": scores.get("concept_rate"),
            "train_time_s": result.get("train_time_s"),
            "steps": result.get("steps"),
            "peak_memory_mb": result.get("peak_memory_mb"),
        }
        for result in results
        for label, scores in result["prompts"].items()
    ]
    paths = {"results": out_dir / "results.csv", "tables": out_dir / "tables.md"}
    with paths["results"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    paths["tables"].write_text(tables_markdown(rows, prompts, methods, num_images, paper, note))
    paths["training_time"] = training_time_chart(rows, methods, num_images, out_dir / "training_time.png")
    for label, prompt in prompts.items():
        paths[f"grid_{label}"] = image_grid(out_dir, results, label, prompt, methods, num_images)
    return paths


def tables_markdown(
    rows: Sequence[Mapping[str, Any]],
    prompts: Mapping[str, str],
    methods: Sequence[str],
    num_images: Sequence[int],
    paper: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
    note: str = "",
) -> str:
    """Per prompt, the paper's layout: one row per number of images, one column per method."""
    value = {(r["method"], r["images"], r["prompt"]): r for r in rows}
    header = "| images | " + " | ".join(METHOD_TITLES.get(m, m) for m in methods) + " |"
    rule = "|---|" + "---|" * len(methods)
    lines = ["# Fine-tuning benchmark", ""] + ([note, ""] if note else [])
    for label, prompt in prompts.items():
        base = value.get((BASE, 0, label))
        metrics = [("clip_t", "CLIP-T (CLIP score)"), ("clip_i", "CLIP-I (concept fidelity)")]
        if any(r.get("concept_rate") is not None for r in rows):
            metrics.append(
                ("concept_rate", "concept rate (share of images the classifier labels the subject)")
            )
        for metric, title in metrics:
            lines += [f"## Prompt {label}: `{prompt}` — {title}", "", header, rule]
            # Fine-tuning exists to raise concept fidelity above the base model's: cells that do not are marked.
            bar = base[metric] if metric in FIDELITY and base is not None else None
            for n in num_images:
                cells = [value.get((m, n, label), {}).get(metric) for m in methods]
                lines.append(f"| {n} | " + " | ".join(_cell(c, bar=bar) for c in cells) + " |")
            if base is not None:
                lines.append(f"| base model | {_cell(base[metric])} |" + " |" * (len(methods) - 1))
            if bar is not None:
                lines += [
                    "",
                    f"{NOT_ABOVE_BASE}: not above the base model's {FIDELITY[metric]} for this prompt.",
                ]
            lines.append("")
            if metric == "clip_t" and paper and label in paper:
                lines += [f"Paper 000, Table for prompt {label} (CLIP score):", "", header, rule]
                for n in num_images:
                    cells = [paper[label].get(m, {}).get(n) for m in methods]
                    lines.append(f"| {n} | " + " | ".join(_cell(c) for c in cells) + " |")
                lines.append("")
    lines += [
        "## Training",
        "",
        "| method | images | time (s) | steps | peak memory (MB) |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for r in rows:
        key = (r["method"], r["images"])
        if r["method"] != BASE and key not in seen:
            seen.add(key)
            lines.append(
                f"| {METHOD_TITLES.get(r['method'], r['method'])} | {r['images']} | {_cell(r['train_time_s'], 1)} "
                f"| {_cell(r['steps'], 0)} | {_cell(r['peak_memory_mb'], 0)} |"
            )
    return "\n".join(lines) + "\n"


def _cell(value: float | None, digits: int = 3, bar: float | None = None) -> str:
    """``value`` rounded, marked when it is not above ``bar`` (the base model's CLIP-I)."""
    if value is None:
        return ""
    text = f"{float(value):.{digits}f}"
    return f"{text} {NOT_ABOVE_BASE}" if bar is not None and value <= bar else text


def training_time_chart(
    rows: Sequence[Mapping[str, Any]], methods: Sequence[str], num_images: Sequence[int], path: Path
) -> Path:
    """Training time per method, one bar per number of images (the paper's Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = {(r["method"], r["images"]): r["train_time_s"] for r in rows if r["train_time_s"] is not None}
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(num_images))
    for k, n in enumerate(num_images):
        xs = [i + (k - (len(num_images) - 1) / 2) * width for i in range(len(methods))]
        axis.bar(xs, [times.get((m, n), 0.0) for m in methods], width, label=f"{n} images")
    axis.set_xticks(range(len(methods)), [METHOD_TITLES.get(m, m) for m in methods])
    axis.set_ylabel("training time (s)")
    axis.set_title("Training time per method and number of images")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def image_grid(
    out_dir: Path,
    results: Sequence[Mapping[str, Any]],
    label: str,
    prompt: str,
    methods: Sequence[str],
    num_images: Sequence[int],
    cell_size: int = 128,
) -> Path:
    """Rows = methods (and the base model), columns = numbers of images; each cell the first image drawn."""
    from PIL import Image, ImageDraw

    from src.utils.image_grid import caption_font, captioned_grid

    done = {(r["method"], r["images"]) for r in results}

    def picture(method: str, n: int) -> Image.Image:
        cell_dir = out_dir / "base" if method == BASE else out_dir / "runs" / method / f"images_{n}"
        path = cell_dir / "images" / f"{label}_0.png"
        if (method, n) in done and path.is_file():
            return Image.open(path).convert("RGB")
        return Image.new("RGB", (cell_size, cell_size), (235, 235, 235))  # a cell not yet done

    rows = [[picture(m, n) for n in num_images] for m in methods]
    captions = [METHOD_TITLES.get(m, m) for m in methods]
    if (BASE, 0) in done:
        rows.append([picture(BASE, 0)])
        captions.append("base model (no fine-tuning)")
    grid = captioned_grid(
        rows, captions, [f"{n} images" for n in num_images], cell_size=cell_size, caption_width=160
    )
    # The prompt above the grid, so the picture says what was asked.
    font = caption_font(16)
    titled = Image.new("RGB", (grid.width, grid.height + 30), "white")
    titled.paste(grid, (0, 30))
    ImageDraw.Draw(titled).text((6, 6), f"Prompt {label}: {prompt}", fill="black", font=font)
    path = out_dir / f"grid_{label}.png"
    titled.save(path)
    return path
