"""benchmark.py as users run it, in miniature: both benchmarks, the report's files and layout, resume.

The cells train through real ``train.py`` multiruns (subprocesses) on a tiny local Stable Diffusion; the judge
is a tiny CLIP saved with ``save_pretrained``. Only sizes and step counts shrink.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from hydra_runs import BENCHMARKS, compose_plain, execute_notebook
from test_clip_score import write_tiny_clip
from tiny_sd import build_tiny_stable_diffusion, write_image_folder

from src.benchmark.finetune import BASE, FineTuneBenchmark, tables_markdown
from src.modules.networks.hypernetwork import load_hypernetwork

# A few CPU steps per cell, small images, few sampler steps (appended after each method's own overrides).
MINIATURE_TRAINING = [
    "data.resolution=32",
    "data.num_workers=0",
    "trainer.max_steps=2",
    "trainer.accumulate_grad_batches=1",
    "callbacks.model_checkpoint.every_n_train_steps=0",
    "callbacks.validation_prompts.every_n_steps=100",
    "callbacks.validation_prompts.num_images_per_prompt=1",
    "callbacks.validation_prompts.num_inference_steps=2",
]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("judge"))


def miniature(
    name: str,
    tiny_sd: Path,
    judge: Path,
    tmp_path: Path,
    *extra: str,
    dropped: tuple[str, ...] = ("dreambooth", "hypernetwork"),
):
    """The benchmark's config with 1 size x 1 prompt of the methods not ``dropped``, everything heavy swapped
    for tiny copies."""
    data_dir = tmp_path / "data"
    overrides = [
        f"benchmark={name}",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"model.pretrained_model_name_or_path={tiny_sd}",
        f"evaluation.judge={judge}",
        "evaluation.num_images_per_prompt=2",
        "evaluation.num_inference_steps=2",
        "evaluation.device=cpu",
        "num_images=[3]",
        *(f"~methods.{method}" for method in dropped),
        "~prompts.B",
        "~prompts.C",
        f"cell_overrides={json.dumps(MINIATURE_TRAINING)}",
        *extra,
    ]
    return compose_plain("benchmark.yaml", overrides)


@pytest.mark.slow
def test_demo_benchmark_writes_every_output_and_resumes_only_unfinished_cells(
    tiny_sd, judge, tiny_shape_judge, tmp_path, monkeypatch
):
    from benchmark import benchmark

    # The hypernetwork: its demo settings (relu activation) differ from its experiment's (textual inversion
    # and LoRA run in the hanok benchmark's test).
    cfg = miniature(
        "finetune_demo",
        tiny_sd,
        judge,
        tmp_path,
        "builders.subject.num_images=6",
        f"evaluation.concept_classifier={tiny_shape_judge}",
        dropped=("dreambooth", "textual_inversion"),
    )
    out = benchmark(cfg)

    assert out == tmp_path / "logs" / "benchmark" / "demo"
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    cells = {(r["method"], r["images"], r["prompt"]) for r in rows}
    assert cells == {
        ("lora", "3", "A"),
        ("hypernetwork", "3", "A"),
        (BASE, "0", "A"),
    }
    for row in rows:
        assert 0 < float(row["clip_i"]) <= 1 and 0 <= float(row["clip_t"]) <= 1
        assert 0 <= float(row["concept_rate"]) <= 1  # the shape judge's share of hanoks, 2 images per cell
        if row["method"] != BASE:
            assert (
                float(row["train_time_s"]) > 0
                and float(row["steps"]) == 2
                and float(row["peak_memory_mb"]) > 0
            )
    for name in ("tables.md", "training_time.png", "grid_A.png"):
        assert (out / name).is_file(), name
    hypernetwork = load_hypernetwork(
        out / "runs" / "hypernetwork" / "images_3" / "export" / "hypernetwork.pt"
    )
    assert hypernetwork.activation_func == "relu"
    tables = (out / "tables.md").read_text()
    assert "not comparable" in tables and "Paper 000" not in tables  # a demo never tables the paper beside it
    assert "concept rate" in tables
    # The subject's images came from the demo's builder, 6 as asked, captioned with the placeholder.
    subject = tmp_path / "data" / "concept" / "hanok"
    captions = [json.loads(line)["text"] for line in (subject / "metadata.jsonl").read_text().splitlines()]
    assert len(captions) == 6 and all("*" in c for c in captions)

    # Rerun with the same command: nothing trains or is judged again.
    trained, judged = [], []
    original_train, original_judge = FineTuneBenchmark.train, FineTuneBenchmark.judge_cell
    monkeypatch.setattr(
        FineTuneBenchmark, "train", lambda self, method, sizes: trained.append((method, sizes))
    )
    monkeypatch.setattr(
        FineTuneBenchmark, "judge_cell", lambda self, cell: judged.append(cell) or original_judge(self, cell)
    )
    before = (out / "results.csv").read_text()
    benchmark(cfg)
    assert trained == [] and judged == []
    assert (out / "results.csv").read_text() == before

    # A cell stopped after training is judged without training; a cell stopped before it is trained alone.
    (out / "runs" / "lora" / "images_3" / "cell.json").unlink()
    stopped = out / "runs" / "hypernetwork" / "images_3"
    (stopped / "cell.json").unlink()
    shutil.rmtree(stopped / "export")
    monkeypatch.setattr(
        FineTuneBenchmark,
        "train",
        lambda self, method, sizes: (
            trained.append((method, list(sizes))) or original_train(self, method, sizes)
        ),
    )
    benchmark(cfg)
    assert trained == [("hypernetwork", [3])]
    assert sorted(c.method for c in judged) == ["hypernetwork", "lora"]
    assert (stopped / "export" / "finetune.json").is_file()
    execute_notebook("finetune_comparison", out)  # the comparison notebook reads this benchmark's outputs


@pytest.mark.slow
def test_hanok_benchmark_tables_the_papers_scores_beside_ours(tiny_sd, judge, tmp_path):
    from benchmark import benchmark

    image_dir = write_image_folder(tmp_path / "hanok", num_images=4)
    cfg = miniature(
        "finetune_hanok",
        tiny_sd,
        judge,
        tmp_path,
        f"data.image_dir={image_dir}",
        "~methods.lora",
        f"train_overrides={json.dumps(['trainer=cpu'])}",  # its trainer=gpu, swapped as a CPU user would
    )
    out = benchmark(cfg)
    tables = (out / "tables.md").read_text()
    assert "Paper 000, Table for prompt A" in tables
    # The paper's Table row for 5 images would hold .24 for textual inversion; our grid has 3 images only.
    assert "| 3 |" in tables


def test_a_rerun_on_a_retrained_base_model_stops_before_judging_or_training(tiny_sd, tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(tiny_sd, base)
    bench = FineTuneBenchmark(
        out_dir=tmp_path / "bench",
        image_dir=tmp_path / "subject",
        base_model=str(base),
        methods={"lora": {"experiment": "finetune_lora"}},
        num_images=[3],
        prompts={"A": "*, black background"},
        judge="unused",
        subject_name="teal hanok",
    )
    work = []
    monkeypatch.setattr(FineTuneBenchmark, "judge_base", lambda self: work.append(BASE))
    monkeypatch.setattr(FineTuneBenchmark, "train", lambda self, method, sizes: work.append(method))
    monkeypatch.setattr(FineTuneBenchmark, "judge_cell", lambda self, cell: work.append(cell))
    monkeypatch.setattr(FineTuneBenchmark, "results", lambda self: [])
    bench.run()
    assert work and (bench.out_dir / "base_model.json").is_file()

    bench.run()  # the same base: resumes
    weights = next(base.glob("unet/*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the base is retrained: other weights
    work.clear()
    with pytest.raises(RuntimeError, match="another base model"):
        bench.run()
    assert work == []


def test_tables_are_laid_out_as_the_papers_rows_of_sizes_and_columns_of_methods():
    methods, sizes = ["textual_inversion", "dreambooth", "lora", "hypernetwork"], [5, 50, 100]
    rows = [
        {
            "method": m,
            "images": n,
            "prompt": "A",
            "prompt_text": "*, fire",
            "clip_t": 0.2 + 0.01 * i + 0.001 * j,
            "clip_i": 0.5,
            "train_time_s": 10.0,
            "steps": 100,
            "peak_memory_mb": 1000.0,
        }
        for i, m in enumerate(methods)
        for j, n in enumerate(sizes)
    ]
    rows.append({**rows[0], "method": BASE, "images": 0, "clip_t": 0.1, "clip_i": 0.3})
    rows[-2]["clip_i"] = 0.3  # the hypernetwork at 100 images: equal to the base, not above it
    paper = {"A": {"textual_inversion": {5: 0.24, 50: 0.25, 100: 0.25}, "dreambooth": {5: 0.30}}}
    text = tables_markdown(rows, {"A": "*, fire"}, methods, sizes, paper)
    lines = text.splitlines()
    start = lines.index("## Prompt A: `*, fire` — CLIP-T (CLIP score)")
    assert lines[start + 2] == "| images | Textual Inversion | DreamBooth | LoRA | Hypernetwork |"
    assert lines[start + 4] == "| 5 | 0.200 | 0.210 | 0.220 | 0.230 |"
    assert lines[start + 6] == "| 100 | 0.202 | 0.212 | 0.222 | 0.232 |"
    assert lines[start + 7].startswith("| base model | 0.100 |")
    fidelity = lines.index("## Prompt A: `*, fire` — CLIP-I (concept fidelity)")
    assert lines[fidelity + 4] == "| 5 | 0.500 | 0.500 | 0.500 | 0.500 |"
    assert lines[fidelity + 6] == "| 100 | 0.500 | 0.500 | 0.500 | 0.300 ↓ |"
    assert lines[fidelity + 9] == "↓: not above the base model's CLIP-I for this prompt."
    paper_start = lines.index("Paper 000, Table for prompt A (CLIP score):")
    assert lines[paper_start + 4] == "| 5 | 0.240 | 0.300 |  |  |"


def test_benchmarks_are_their_own_config_group_and_no_training_experiment():
    from hydra.errors import ConfigCompositionException

    assert set(BENCHMARKS) == {
        "finetune_demo",
        "finetune_hanok",
        "panels_demo",
        "stories_demo",
        "stories_coco",
    }
    with pytest.raises(ConfigCompositionException, match="finetune_demo"):
        compose_plain("train.yaml", ["experiment=finetune_demo"])
