"""Every way from inputs to images, and the one loader that builds them.

The project's generation interface is :class:`~src.pipelines.text_to_image.TextToImage`:
``text_to_image(prompts, num_images_per_prompt, seed)`` -> images ``[n, k, 3, H, W]`` in ``[0, 1]``, image ``j``
of every prompt drawn from the noise of ``seed + j``. A diffusers pipeline object is called a *diffusers
pipeline* here, never just a pipeline. :mod:`src.pipelines.loading` is the only way to get either: from a
LightningModule in memory, a checkpoint of ``train.py``, or an export directory or file. Entry points,
callbacks, the benchmark, the demo checks and the service all go through it; models never import this package.
"""
