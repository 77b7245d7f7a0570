"""Pipelines: inputs (captions, prompts, images) -> images.

A pipeline is the one thing that entry points (``generate.py``), callbacks (sample grids, judges) and services
call to generate; each takes ``(captions, num_images_per_caption, seed)`` and returns images
``[n, k, 3, H, W]`` in ``[0, 1]``.
"""
