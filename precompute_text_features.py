"""Precompute multilingual-BERT sentence vectors for every caption of a set of shards (see the config)."""

import hydra
from omegaconf import DictConfig, OmegaConf

from src.utils.cli import one_line_errors


def precompute(cfg: DictConfig) -> dict:
    """Instantiate the encoder and rewrite the shards with ``txtfeat.npy`` into ``out_dir``; returns the stats."""
    # Heavy imports here so `--help` and config errors stay fast.
    from hydra.utils import instantiate, to_absolute_path

    from src.data.text_features import precompute_text_features

    shards = cfg.shards
    shards = [to_absolute_path(s) for s in shards] if OmegaConf.is_list(shards) else to_absolute_path(shards)
    encoder = instantiate(cfg.encoder)
    stats = precompute_text_features(shards, to_absolute_path(cfg.out_dir), encoder, progress=cfg.progress)
    summary = {k: v for k, v in stats.items() if k != "metadata"}
    print(f"text features: {summary}")
    return stats


@hydra.main(version_base="1.3", config_path="configs", config_name="precompute_text_features")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    """Command-line entry point: ``python precompute_text_features.py shards=... out_dir=...``."""
    return precompute(cfg)


if __name__ == "__main__":
    main()
