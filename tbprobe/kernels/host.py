"""Histograms and statistics of host (CPU) arrays, fast and exact.

fp32 data (and fp16, widened) takes the table kernel (:mod:`host_table`: one lookup and one
count per element) when the edges allow it; anything else takes the sort kernel
(:mod:`host_sort`). The input is cut into chunks that fit in a core's cache, handed out one at
a time to the calling thread and the pool's threads (numpy and torch release the GIL), so a
core that another process slows down simply takes fewer chunks.

Small inputs read every number off a chunk while it is in cache: bin counts, NaN/Inf/zero
counts, min, max and fp64 sums. Large fp32 inputs split the work by kind instead: a helper
thread first takes the statistics over big blocks (a few long GIL-free numpy calls), then joins
the caller in counting keys chunk by chunk. Short numpy calls from two threads hand the GIL to
each other so often that the handovers, not the arithmetic, set the pace.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tbprobe.kernels.host_sort import SortPlan
from tbprobe.kernels.host_sums import combine
from tbprobe.kernels.host_table import COUNT_SLICE, TablePlan

CHUNK = 1 << 16  # elements per chunk: 256 KiB of fp32, kept in a core's L2 cache
KEY_CHUNK = 2 * COUNT_SLICE  # elements per key chunk of a split fold (~64K)
STATS_BLOCK = 1 << 20  # elements per statistics call of a split fold: long GIL-free calls
SPLIT_MIN = 1 << 21  # fp32 inputs from this size split the work by kind
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def _after_fork_in_child() -> None:
    """A fork taken while another thread held the lock would leave it held in the child."""
    global _pool, _pool_pid, _pool_lock
    _pool_lock = threading.Lock()
    _pool, _pool_pid = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child has no pool threads
            _pool = ThreadPoolExecutor(
                max_workers=max(1, _cpus() - 1), thread_name_prefix="tbprobe-hist"
            )
            _pool_pid = os.getpid()
        return _pool


def _buffers(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's three ``CHUNK`` scratch buffers (reused: no page faults per call)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    found = bufs.get(dtype)
    if found is None:
        found = bufs[dtype] = tuple(np.empty(CHUNK, dtype) for _ in range(3))
    return found


def _plan(flat: np.ndarray, edges: np.ndarray) -> TablePlan | SortPlan:
    if flat.dtype in (np.float32, np.float16):
        table = TablePlan.for_edges(edges)
        if table is not None:
            return table
        return SortPlan(edges, np.dtype(np.float32))
    return SortPlan(edges, np.dtype(np.float64))  # ints and bool compare as numpy's fp64


def _fold(flat: np.ndarray, plan) -> list:
    """Every chunk of ``flat`` folded into one partial per participating thread."""
    if isinstance(plan, TablePlan) and flat.dtype == np.float32 and len(flat) >= SPLIT_MIN:
        return _fold_split(flat, plan)
    n_chunks = -(-len(flat) // CHUNK)
    next_chunk = itertools.count().__next__  # atomic under the GIL: each chunk is taken once
    buf_dtype = np.float32 if isinstance(plan, TablePlan) else plan.dtype

    def work():
        acc = plan.partial()
        bufs = _buffers(buf_dtype)
        while (i := next_chunk()) < n_chunks:
            plan.fold(flat[i * CHUNK : (i + 1) * CHUNK], acc, bufs)
        return acc

    helpers = min(_cpus(), n_chunks) - 1
    if helpers <= 0:
        return [work()]
    pool = _executor()
    futures = [pool.submit(work) for _ in range(helpers)]
    parts = [work()]  # the caller works too, and takes whatever the helpers have not
    for f in futures:
        if not f.cancel():  # a helper that never started (busy pool) has nothing to add
            parts.append(f.result())
    return parts


def _fold_split(flat: np.ndarray, plan: TablePlan) -> list:
    """The fold of a large contiguous fp32 ``flat``: one helper takes the statistics in big
    blocks and then joins the caller, which counts keys from the first chunk on."""
    n_chunks = -(-len(flat) // KEY_CHUNK)
    next_chunk = itertools.count().__next__  # atomic under the GIL: each chunk is taken once

    def count(acc):
        while (i := next_chunk()) < n_chunks:
            plan.count(flat[i * KEY_CHUNK : (i + 1) * KEY_CHUNK], acc.hist)

    def stats(acc):
        for start in range(0, len(flat), STATS_BLOCK):
            plan.add_stats(flat[start : start + STATS_BLOCK], acc.stats)

    def helper():
        acc = plan.partial()
        stats(acc)
        count(acc)
        return acc

    main = plan.partial()
    if _cpus() < 2:
        stats(main)
        count(main)
        return [main]
    future = _executor().submit(helper)
    count(main)
    if future.cancel():  # the helper never started (busy pool): its statistics fall to us
        stats(main)
        return [main]
    return [main, future.result()]


def _finite_range(flat: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite values, or None if there are none."""
    if flat.dtype.kind in "biu":
        return float(flat.min()), float(flat.max())
    lo, hi = flat.min(), flat.max()
    if math.isfinite(lo) and math.isfinite(hi):
        return float(lo), float(hi)
    finite = flat[np.isfinite(flat)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def histogram(arr: np.ndarray, bins, range_=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 counts, float64 edges, float64 ``STAT_NAMES`` row) of a host array.

    ``arr``: any shape, any real dtype. ``bins``: an int (linear bins over ``range_`` or the
    finite min..max) or the fp64 edges ``(n_bins + 1,)``; counts ``(n_bins,)`` equal
    ``np.histogram(arr.astype(float64), edges)``. NaN and ±Inf are counted in the stats only.

    Example::

        counts, edges, stats = histogram(np.random.randn(1000), 10)  # counts.sum() == 1000
    """
    flat = np.asarray(arr).reshape(-1)
    if isinstance(bins, (int, np.integer)):
        if range_ is not None:
            lo, hi = float(range_[0]), float(range_[1])
        else:
            span = _finite_range(flat) if flat.size else None
            lo, hi = span if span is not None else (0.0, 1.0)
        edges = linear_edges(lo, hi, int(bins))
    else:
        edges = np.asarray(bins, dtype=np.float64)
    plan = _plan(flat, edges)
    parts = _fold(flat, plan) if flat.size else [plan.partial()]
    stats = combine([p.stats for p in parts])
    if isinstance(plan, TablePlan):
        below, zeros = plan.below(parts)
        if zeros is not None:
            stats[9] = zeros
    else:
        below = plan.below(parts)
    return np.diff(below), edges, stats


def linear_edges(lo: float, hi: float, n_bins: int) -> np.ndarray:
    """The edges numpy uses for ``bins=n_bins`` over ``[lo, hi]``."""
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1, dtype=np.float64)
