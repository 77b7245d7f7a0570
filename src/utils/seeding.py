"""Seeds derived from the run's seed and a position (epoch, batch, rank, worker, sample key).

A random draw seeded from where it happens, rather than from whatever state a generator has reached, comes out
the same however the run got there: uninterrupted, or killed and resumed from a checkpoint with fresh loader
workers; with any number of workers. ``hash()`` cannot derive them: Python salts the hashes of strings per
process.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["derived_seed", "seed_all"]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (ints, strings), the same in every process and on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (every CUDA device's included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
