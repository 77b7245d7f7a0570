"""Cartoonized shard sets, as thesis chapter II made them: every image in four CartoonGAN styles (Hayao, Hosoda,
Paprika, Shinkai), and AnimeGANv2's published styles besides.

- ``cartoongan`` / ``animegan``: the generators, laid out as their published weight files.
- ``styles``: style name -> generator and weight file; strict loading with one message for a missing file.
- ``reading`` -> ``predict`` -> ``progress``: source shards -> same-size batches -> Lightning's predict loop
  with a writer callback -> finished shards marked done.
- ``stage``: :func:`cartoonize_shards`, the whole stage (``python prepare_data.py ... cartoonize.styles=[...]``).
"""

from src.data.cartoonize.animegan import AnimeGANv2
from src.data.cartoonize.cartoongan import LOAD_SIZE, CartoonGAN
from src.data.cartoonize.reading import resize_longer_side
from src.data.cartoonize.stage import cartoonize_shards, photo_shards_for_styles
from src.data.cartoonize.styles import PHOTO, STYLES, Style, load_generator, resolve_styles

__all__ = [
    "LOAD_SIZE",
    "PHOTO",
    "STYLES",
    "AnimeGANv2",
    "CartoonGAN",
    "Style",
    "cartoonize_shards",
    "load_generator",
    "photo_shards_for_styles",
    "resize_longer_side",
    "resolve_styles",
]
