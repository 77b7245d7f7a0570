"""The generation contract every text-to-image model of the project fulfils, whatever draws the pixels.

``text_to_image(prompts, num_images_per_prompt, seed)`` returns images ``[n, k, 3, H, W]`` in ``[0, 1]`` on the
CPU. Image ``j`` of every prompt starts from the noise of ``seed + j``, drawn on the CPU, so two prompts (or two
models) differ in column ``j`` only by the prompt (or the weights), and the same seed gives the same pixels on
any device. ``on_step(done, total)`` is called after every denoising step (once for one-step models); raising
:class:`GenerationCancelled` from it stops the generation there, which is how a service cancels a running job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

__all__ = ["GenerationCancelled", "StepCallback", "TextToImage", "cpu_generators"]

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


class GenerationCancelled(Exception):
    """Raised by a step callback to stop a generation; no image is returned."""


class TextToImage(Protocol):
    def __call__(
        self,
        prompts: Sequence[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor: ...

    @property
    def settings(self) -> dict[str, Any]:
        """What a manifest records to redraw the same images (model paths, sampling settings)."""
        ...


def cpu_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU random generator per image, seeded ``seed``, ``seed + 1``, ...: the same noise on every device."""
    return [torch.Generator(device="cpu").manual_seed(seed + j) for j in range(count)]
