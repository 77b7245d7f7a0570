"""The dual encoder loads real (saved) towers by the setting users set for hub names; loggers work offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _tiny_towers(tmp_path):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    vit.save_pretrained(tmp_path / "vit")
    return bert, vit


def _optimizer():
    from functools import partial

    return partial(torch.optim.AdamW, lr=1e-3)


def test_saved_towers_load_through_name_or_path(tmp_path):
    from src.modules.clip_module import WebtoonCLIP

    bert, vit = _tiny_towers(tmp_path)
    model = WebtoonCLIP(
        text_encoder={"name_or_path": str(tmp_path / "bert"), "pooling": "cls"},
        image_encoder={"name_or_path": str(tmp_path / "vit"), "pooling": "cls"},
        preprocess={"image_size": 32},
        optimizer=_optimizer(),
        projection_dim=16,
    )
    loaded_text = model.encoder.model.text_model.state_dict()
    for name, value in bert.state_dict().items():
        assert torch.equal(loaded_text[name], value), name
    loaded_vision = model.encoder.model.vision_model.state_dict()
    for name, value in vit.state_dict().items():
        assert torch.equal(loaded_vision[name], value), name

    image, text = model.encoder(
        torch.randn(3, 3, 32, 32), torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    )
    assert image.shape == text.shape == (3, 16)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_mean_pooling_ignores_padding(tmp_path):
    from src.modules.clip_module import WebtoonCLIP

    _tiny_towers(tmp_path)
    model = WebtoonCLIP(
        text_encoder={"name_or_path": str(tmp_path / "bert"), "pooling": "mean"},
        image_encoder={"name_or_path": str(tmp_path / "vit")},
        preprocess={"image_size": 32},
        optimizer=_optimizer(),
        projection_dim=16,
    ).eval()
    ids = torch.tensor([[2, 5, 6, 3]])
    padded = torch.tensor([[2, 5, 6, 3, 0, 0]])
    with torch.no_grad():
        short = model.encoder.encode_text(ids, torch.ones_like(ids))
        long = model.encoder.encode_text(padded, torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert torch.allclose(short, long, atol=1e-5)


def test_missing_hub_weights_fail_with_one_clear_message():
    from src.modules.clip_module import WebtoonCLIP
    from src.utils.hub import MissingWeightsError

    with pytest.raises(
        MissingWeightsError, match=r"model.text_encoder.name_or_path=/path/to/local/copy"
    ) as error:
        WebtoonCLIP(
            text_encoder={"name_or_path": "bert-base-multilingual-cased"},
            image_encoder={"name_or_path": "google/vit-base-patch16-224-in21k"},
            preprocess={"tokenizer": "bert-base-multilingual-cased"},
            optimizer=_optimizer(),
        )
    assert "hf download bert-base-multilingual-cased" in str(error.value)


def test_logit_scale_is_clamped_at_100(tmp_path):
    from src.modules.clip_module import WebtoonCLIP

    _tiny_towers(tmp_path)
    model = WebtoonCLIP(
        text_encoder={"name_or_path": str(tmp_path / "bert")},
        image_encoder={"name_or_path": str(tmp_path / "vit")},
        preprocess={"image_size": 32},
        optimizer=_optimizer(),
        projection_dim=16,
    )
    with torch.no_grad():
        model.encoder.model.logit_scale.fill_(10.0)
    assert model.encoder.logit_scale.item() == pytest.approx(100.0)
    model.encoder.clamp_logit_scale()
    assert model.encoder.model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_schedule_warms_up_then_follows_a_cosine_to_the_minimum():
    from src.modules.clip_module import WebtoonCLIP

    model = WebtoonCLIP(
        {"config": {"model_type": "bert", "vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "intermediate_size": 16}},
        {"config": {"model_type": "vit", "image_size": 8, "patch_size": 4, "hidden_size": 8,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}},
        preprocess={"image_size": 8},
        optimizer=_optimizer(),
        projection_dim=4,
        warmup_steps=10,
        min_lr_ratio=0.1,
    )  # fmt: skip
    model.trainer = type("T", (), {"estimated_stepping_batches": 110})()
    config = model.configure_optimizers()
    schedule = config["lr_scheduler"]["scheduler"]
    factors = []
    for _ in range(111):
        factors.append(schedule.get_last_lr()[0] / 1e-3)
        config["optimizer"].step()
        schedule.step()
    assert factors[0] == pytest.approx(0.0) and factors[5] == pytest.approx(0.5)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)  # halfway down the cosine
    assert factors[110] == pytest.approx(0.1)
    assert config["lr_scheduler"]["interval"] == "step"


def test_wandb_logger_goes_offline_without_an_api_key_and_a_resumed_run_keeps_its_run_id(
    tmp_path, monkeypatch, caplog
):
    from omegaconf import OmegaConf

    from src.utils.run import instantiate_loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key

    def run_config(run_dir: Path, ckpt_path: str | None):
        logger = {
            "_target_": "lightning.pytorch.loggers.wandb.WandbLogger",
            "project": "webtoon-lab-test",
            "save_dir": str(tmp_path),
            "resume": "allow",
        }
        return OmegaConf.create(
            {"logger": {"wandb": logger}, "paths": {"output_dir": str(run_dir)}, "ckpt_path": ckpt_path}
        )

    with caplog.at_level("WARNING"):
        (logger,) = instantiate_loggers(run_config(tmp_path / "first", None))
    assert "offline" in caplog.text and "WANDB_API_KEY" in caplog.text
    logger.log_metrics({"train/loss": 1.5}, step=0)
    run_id = logger.experiment.id
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))

    # resumed from a checkpoint of that run (into a new directory), or requeued in its own with ckpt_path=last
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.touch()
    (resumed,) = instantiate_loggers(run_config(tmp_path / "resumed", str(checkpoint)))
    (requeued,) = instantiate_loggers(run_config(tmp_path / "first", "last"))
    (fresh,) = instantiate_loggers(run_config(tmp_path / "fresh", None))
    assert resumed.version == requeued.version == run_id != fresh.version
    resumed.log_metrics({"train/loss": 1.0}, step=1)
    resumed.experiment.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs)  # `wandb sync` joins them


def test_export_refuses_mean_pooling_that_transformers_cannot_reproduce(tmp_path):
    from src.modules.dual_encoder import DualEncoder

    _tiny_towers(tmp_path)
    encoder = DualEncoder(
        {"name_or_path": str(tmp_path / "bert"), "pooling": "mean"},
        {"name_or_path": str(tmp_path / "vit")},
        16,
    )
    from src.data.preprocess import Preprocess

    with pytest.raises(ValueError, match="model.text_encoder.pooling=cls"):
        encoder.export(str(tmp_path / "export"), Preprocess(image_size=32))
    assert not (tmp_path / "export").exists()
