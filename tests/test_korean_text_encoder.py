"""Korean prompts straight into Stable Diffusion: the student built from a multilingual encoder, parallel captions,
the distillation objective, and experiment=korean_text_encoder(_demo) as run, its export loaded by diffusers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra_runs import KOREAN_EXPERIMENTS, compose_config, synthetic_samples
from tiny_sd import CROSS_ATTENTION_DIM, build_tiny_stable_diffusion

KOREAN = "하늘색 배경의 가운데에 있는 큰 빨간 원을 그린 그림."
ENGLISH = "A large red circle in the middle of a sky blue background."
# 20 words of the demo's vocabulary
LONG_KOREAN = " ".join(["큰 빨간 원이 하늘색 배경의 가운데에 있고 작은 파란 별이"] * 2)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_base"))


def distillation(tiny_base, tiny_towers, **settings):
    from src.modules.diffusion.korean_text_encoder import KoreanTextEncoderDistillation

    torch.manual_seed(0)
    module = KoreanTextEncoderDistillation(
        str(tiny_base), student_name_or_path=str(tiny_towers["bert"]), **settings
    )
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    return module.train()


def parallel_batch(synthetic_dir, n: int = 4) -> dict:
    from src.data.datamodule import WebtoonShardDataModule

    datamodule = WebtoonShardDataModule(
        root=str(synthetic_dir),
        preprocess={"image_size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        batch_size=n,
        num_workers=0,
        parallel_captions=True,
    )
    return next(iter(datamodule.test_dataloader()))


# --- the student -----------------------------------------------------------------------------------------------


def test_student_is_the_encoder_it_starts_from_plus_a_projection_and_reads_hangul_whole(tiny_towers):
    from transformers import AutoModel

    from src.modules.networks.bilingual_text_encoder import bilingual_student

    student, tokenizer = bilingual_student(str(tiny_towers["bert"]), CROSS_ATTENTION_DIM)
    bert = AutoModel.from_pretrained(tiny_towers["bert"]).eval()
    tokens = tokenizer([KOREAN, ENGLISH], padding="max_length", max_length=24, return_tensors="pt")
    mask = tokens.attention_mask.bool()
    with torch.no_grad():
        ours = student.eval().roberta(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        theirs = bert(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        projected = student(tokens.input_ids, attention_mask=tokens.attention_mask)
    # BERT's positions moved one row down the table (XLM-R counts from the padding index + 1): same states
    torch.testing.assert_close(ours[mask], theirs[mask])
    assert projected[0].shape == (2, 24, CROSS_ATTENTION_DIM)
    torch.testing.assert_close(projected.pooler_output, projected[0][:, 0])
    # Hangul as words, not bytes; a 20-word caption fits whole
    long_ids = tokenizer(LONG_KOREAN, truncation=True).input_ids
    assert tokenizer.unk_token_id not in long_ids and len(LONG_KOREAN.split()) == 20
    assert len(long_ids) < tokenizer.model_max_length and long_ids[-1] == tokenizer.sep_token_id
    assert student.config.use_attention_mask


def test_an_xlm_roberta_encoder_moves_over_unchanged():
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from src.modules.networks.bilingual_text_encoder import altclip_student

    torch.manual_seed(0)
    xlmr = XLMRobertaModel(
        XLMRobertaConfig(
            vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).eval()
    student = altclip_student(xlmr, project_dim=24).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        torch.testing.assert_close(
            student.roberta(ids, attention_mask=mask)[0][mask.bool()],
            xlmr(ids, attention_mask=mask)[0][mask.bool()],
        )
    assert student(ids, attention_mask=mask)[0].shape == (1, 7, 24)


def test_a_model_that_is_not_a_text_encoder_is_refused_by_name(tmp_path):
    from transformers import ViTConfig, ViTModel

    from src.modules.networks.bilingual_text_encoder import load_text_tower

    ViTModel(
        ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="model.student"):
        load_text_tower(str(tmp_path), "model.student")


# --- parallel captions -----------------------------------------------------------------------------------------


def test_parallel_captions_are_the_same_templates_caption_of_the_same_image(synthetic_dir):
    import random

    from src.data.pipeline import choose_parallel_captions
    from src.data.schema import WebtoonSample

    batch = parallel_batch(synthetic_dir, n=6)
    assert len(batch["caption_en"]) == len(batch["caption_ko"]) == len(batch["image"]) == 6
    assert all("가" <= ch <= "힣" for caption in batch["caption_ko"] for ch in caption if ch.isalpha())
    # the datamodule pairs caption i of one language with caption i of the other
    sample = WebtoonSample(
        key="k", image=None, captions_en=["e0", "e1", "e2"], captions_ko=["k0", "k1", "k2"]
    )
    pairs = {choose_parallel_captions(sample, random.Random(seed)) for seed in range(30)}
    assert pairs == {("e0", "k0"), ("e1", "k1"), ("e2", "k2")}


def test_a_record_without_korean_is_skipped_and_counted(tmp_path):
    import webdataset as wds
    from PIL import Image

    from src.data.datamodule import WebtoonShardDataModule

    tmp_path.joinpath("sizes.json").write_text(json.dumps({"test": 3}))
    with wds.TarWriter(str(tmp_path / "test-000000.tar")) as sink:
        for i in range(3):
            image = Image.new("RGB", (32, 32), (i * 80, 0, 0))
            meta = {
                "captions_en": [f"a red square {i}"],
                "captions_ko": [] if i == 1 else [f"빨간 정사각형 {i}"],
            }
            sink.write({"__key__": f"s{i}", "jpg": image, "json": meta})
    datamodule = WebtoonShardDataModule(
        root=str(tmp_path), preprocess={"image_size": 32}, batch_size=4, num_workers=0, parallel_captions=True
    )
    batches = [datamodule.on_after_batch_transfer(b, 0) for b in datamodule.test_dataloader()]
    assert [key for b in batches for key in b["key"]] == ["s0", "s2"]
    assert datamodule.skipped["no_parallel_captions"] == 1


# --- the objective -------------------------------------------------------------------------------------------


def test_distillation_steps_bring_the_student_to_the_teacher(tiny_base, tiny_towers, synthetic_dir):
    module = distillation(tiny_base, tiny_towers, caption_dropout=0.0)
    batch = parallel_batch(synthetic_dir)

    def distances() -> dict[str, float]:
        with torch.no_grad():
            terms = module.distillation_terms(
                batch["image"],
                batch["caption_en"],
                batch["caption_ko"],
                torch.Generator().manual_seed(0),
                0.0,
            )
        return {name: float(value) for name, value in terms.items()}

    before = distances()
    assert set(before) == {"pooled", "unet", "denoising"}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        torch.manual_seed(step)
        loss = module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = distances()
    assert after["pooled"] < 0.5 * before["pooled"]
    assert after["unet"] < 0.5 * before["unet"]


def test_evaluation_gives_the_same_distances_twice(tiny_base, tiny_towers, synthetic_dir):
    module = distillation(tiny_base, tiny_towers)
    batch = parallel_batch(synthetic_dir)
    logged: list[dict[str, float]] = []
    for _ in range(2):
        logged.append({})
        module.log = lambda name, value, **kwargs: logged[-1].__setitem__(name, float(value))
        with torch.no_grad():
            module.eval()._evaluate(batch, 0, "val")
    assert set(logged[0]) == {
        f"val/{t}_distance_{lang}" for t in ("pooled", "unet", "denoising") for lang in ("ko", "en")
    }
    assert logged[0] == logged[1]


def test_only_the_student_trains_unless_the_cross_attention_kv_is_asked_for(tiny_base, tiny_towers):
    module = distillation(tiny_base, tiny_towers)
    trained = module.trained_parameter_names()
    assert trained and all(name.startswith("student.") for name in trained)
    aligned = distillation(tiny_base, tiny_towers, train_cross_attention_kv=True)
    unet_trained = {name for name in aligned.trained_parameter_names() if name.startswith("unet.")}
    assert unet_trained and all(".attn2.to_k." in name or ".attn2.to_v." in name for name in unet_trained)
    with pytest.raises(ValueError, match="at least one"):
        distillation(tiny_base, tiny_towers, pooled_weight=0, unet_weight=0, denoising_weight=0)


# --- the experiments, as run ---------------------------------------------------------------------------------


def experiment_overrides(
    experiment: str, data_dir: Path, synthetic_dir: Path, tiny_towers: dict
) -> list[str]:
    overrides = [
        f"experiment={experiment}",
        f"paths.data_dir={data_dir}",
        f"data.root={synthetic_dir}",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.max_steps=3",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "model.lr_scheduler.warmup_steps=1",
    ]
    if experiment == "korean_text_encoder_demo":
        overrides += [
            f"data.builders.dataset.num_samples={synthetic_samples(synthetic_dir)}",
            f"data.builders.shape_judge.out_dir={tiny_towers['shape_judge']}",
            "callbacks.korean_prompt_following.num_prompts=3",
            "callbacks.korean_prompt_following.num_images_per_prompt=2",
            "callbacks.korean_prompt_following.num_inference_steps=2",
            "trainer.check_val_every_n_epoch=1",
        ]
    else:  # the real recipe on local copies: SD and mBERT by path, a CPU trainer, 32 px images
        overrides += [
            "trainer=cpu",
            f"model.pretrained_model_name_or_path={data_dir / 'models' / 'sd_demo_base'}",
            f"model.student_name_or_path={tiny_towers['bert']}",
            "model.gradient_checkpointing=false",
            "data.preprocess.image_size=32",
            "trainer.val_check_interval=3",
            "callbacks.validation_prompts.every_n_steps=3",
            "callbacks.validation_prompts.num_inference_steps=2",
        ]
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("experiment", KOREAN_EXPERIMENTS)
def test_korean_text_encoder_experiment_trains_the_student_only_and_exports_a_pipeline_that_reads_korean(
    experiment, tiny_base, tiny_towers, synthetic_dir, tmp_path
):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import AltCLIPTextModel

    from src.pipelines.loading import load_text_to_image
    from train import train

    data_dir = tmp_path / "data"
    # present with their markers, so the demo's on-demand builders take them instead of training the demos
    shutil.copytree(tiny_base, data_dir / "models" / "sd_demo_base")
    shutil.copytree(tiny_towers["bert"], data_dir / "clip_demo_text_encoder")
    run = tmp_path / "run"
    metrics, objects = train(
        compose_config(
            "train.yaml", experiment_overrides(experiment, data_dir, synthetic_dir, tiny_towers), run
        )
    )

    assert objects["trainer"].global_step == 3
    assert {"train/loss", "test/unet_distance_ko", "test/unet_distance_en", "test/pooled_distance_ko"} <= set(
        metrics
    )
    if experiment == "korean_text_encoder_demo":
        for reading in ("en", "ko", "en_student", "ko_original"):
            for attribute in ("colour", "shape", "background"):
                assert 0.0 <= metrics[f"test/{attribute}_match_{reading}"] <= 1.0
        assert metrics["test/shape_match_real"] >= 0.0
        table = (run / "metrics.md").read_text()
        assert "chance" in table and "test/colour_match_ko" in table
        assert list(run.rglob("korean_prompt_following.png"))
    else:
        assert list(run.rglob("validation/step_000003.png"))

    # UNet and VAE exactly the base's; the text encoder and tokenizer are the student's
    export = run / "export"
    for part in ("unet", "vae"):
        ours = load_file(export / part / "diffusion_pytorch_model.safetensors")
        base = load_file(tiny_base / part / "diffusion_pytorch_model.safetensors")
        assert ours.keys() == base.keys() and all(torch.equal(ours[k], base[k]) for k in base)
    assert json.loads((export / "finetune.json").read_text())["method"] == "korean_text_encoder"
    pipeline = StableDiffusionPipeline.from_pretrained(export)
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline.text_encoder, AltCLIPTextModel)
    student = objects["model"].student
    for name, value in pipeline.text_encoder.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[name])
    images = pipeline(
        "큰 빨간 원, webtoon",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # the project's loader knows the export by its finetune.json, as generate.py weights=... loads it
    drawn = load_text_to_image(weights=export, num_inference_steps=2, device="cpu")(["큰 빨간 원"], 1, seed=0)
    assert drawn.shape == (1, 1, 3, 32, 32)


@pytest.mark.slow
def test_fine_tuning_methods_take_the_korean_export_as_their_base(tiny_base, tiny_towers, tmp_path):
    from src.modules.diffusion.lora import LoRAFineTune
    from src.modules.diffusion.textual_inversion import TextualInversion

    export = distillation(tiny_base, tiny_towers).export(tmp_path / "export")
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "captions": ["* 빨간 원", "* 파란 별"],
        "cache_key": torch.arange(2),
    }
    lora = LoRAFineTune(str(export), prompt_aliases={"*": "sks"})
    lora.log = lambda *args, **kwargs: None
    loss = lora.train().training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for n, p in lora.named_parameters() if "lora" in n)
    inversion = TextualInversion(str(export), placeholder_token="<hanok>", initializer_token="원이")
    inversion.log = lambda *args, **kwargs: None
    loss = inversion.train().training_step(batch, 0)
    loss.backward()
    assert (
        inversion.placeholder_embeddings.grad is not None
        and inversion.placeholder_embeddings.grad.abs().sum() > 0
    )
