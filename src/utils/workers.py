"""Data-loader workers: they die with the process that started them, and write batches where it reads them.

torch's workers notice a dead parent only while they wait for work (a watchdog polled every few seconds); a
worker blocked writing a batch into its full result pipe never looks, so a ``train.py`` killed with SIGKILL left
one alive for minutes, holding its memory. On Linux the kernel can send the worker a signal the moment its
parent dies (``prctl(PR_SET_PDEATHSIG)``), whatever it is doing. Elsewhere the call does not exist and torch's
watchdog is all there is.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch
from torch.utils.data import get_worker_info

__all__ = ["die_with_parent", "worker_shared_tensor"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: SIGKILL this worker when its parent dies (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a data-loader worker")
    if os.getppid() == 1:  # the parent died between the fork and the call: no signal will come
        os._exit(1)


def worker_shared_tensor(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """In a DataLoader worker, an empty tensor in shared memory (None elsewhere).

    A batch sent from a worker must be in shared memory: one built in ordinary memory is copied there when it is
    sent (for a batch of 64 float images of 224 px, 38 MB and ~40 ms of the worker's ~500 ms). torch's
    ``default_collate`` therefore stacks into shared memory; a custom collate that writes its batch into this
    buffer does the same.
    """
    if get_worker_info() is None:
        return None
    numel = int(torch.Size(shape).numel())
    template = torch.empty(0, dtype=dtype)
    return template.new(template._typed_storage()._new_shared(numel)).view(shape)
