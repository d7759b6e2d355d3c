"""Per-thread scratch buffers for the host kernels, reused across calls: no allocation and no
page faults per chunk, and no sharing between the threads that fold chunks at once."""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def scratch(slot: str, dtype, n: int) -> np.ndarray:
    """This thread's buffer named ``slot``: ``(n,)`` of ``dtype`` (contents undefined)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    dtype = np.dtype(dtype)
    found = bufs.get(slot)
    if found is None or found.dtype != dtype or len(found) < n:
        found = bufs[slot] = np.empty(n, dtype)
    return found[:n]
