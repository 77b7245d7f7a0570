"""Data-loader workers that die with the process that started them.

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

__all__ = ["die_with_parent"]

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
