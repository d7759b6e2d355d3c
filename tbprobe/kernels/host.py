"""Histograms and statistics of host (CPU) arrays, fast and exact.

numpy's ``np.histogram`` with non-uniform edges sorts blocks of the input and bisects the
edges into them. We do the same in parallel chunks on all cores (numpy's sort releases the
GIL), and read every statistic off the sorted chunks, so one sort gives counts, NaN/Inf
counts, min, max and zeros. fp32 data is compared with fp64 edges exactly by rounding each
edge outward to fp32, instead of copying the data to fp64.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_PARALLEL_MIN = 1 << 20  # below this, one thread is faster than the hand-off
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():  # a forked child has no pool threads
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="tbprobe")
        _pool_pid = os.getpid()
    return _pool


def as_sortable(arr: np.ndarray) -> np.ndarray:
    """A flat fp32 or fp64 array whose order and comparisons equal ``arr.astype(float64)``'s."""
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype in (np.float32, np.float64):
        return arr
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr.astype(np.float64)


class SortedChunk:
    """One sorted chunk and the statistics read off it."""

    __slots__ = ("s", "nan", "pos_inf", "neg_inf", "zeros", "lo", "hi", "sum", "sum_sq")

    def __init__(self, chunk: np.ndarray, scratch: np.ndarray | None = None):
        if scratch is None:
            s = np.sort(chunk)
        else:  # sorting into reused memory saves the page faults of a fresh array
            s = scratch[: len(chunk)]
            np.copyto(s, chunk)
            s.sort()
        self.s = s
        n = len(s)
        inf = s.dtype.type(math.inf)
        not_nan = int(s.searchsorted(inf, "right"))
        self.nan = n - not_nan
        self.pos_inf = not_nan - int(s.searchsorted(inf, "left"))
        self.neg_inf = int(s.searchsorted(-inf, "right"))
        zero = s.dtype.type(0)
        self.zeros = int(s.searchsorted(zero, "right") - s.searchsorted(zero, "left"))
        finite = s[self.neg_inf : not_nan - self.pos_inf]
        self.lo, self.hi = (float(finite[0]), float(finite[-1])) if len(finite) else (None, None)
        self.sum = float(np.add.reduce(finite, dtype=np.float64))
        self.sum_sq = float(np.einsum("i,i->", finite, finite, dtype=np.float64))

    def below(self, edges: np.ndarray) -> np.ndarray:
        """int64 ``#(x < e)`` for each fp64 edge but the last, and ``#(x <= e_last)``."""
        if self.s.dtype == np.float64:
            left, last = edges[:-1], edges[-1:]
        else:
            left, last = _round_out_f32(edges[:-1], up=True), _round_out_f32(edges[-1:], up=False)
        return np.concatenate(
            (self.s.searchsorted(left, "left"), self.s.searchsorted(last, "right"))
        )


def _round_out_f32(e: np.ndarray, up: bool) -> np.ndarray:
    """For fp32 x: ``x < e`` iff ``x < ceil32(e)`` and ``x <= e`` iff ``x <= floor32(e)``."""
    with np.errstate(over="ignore"):
        f = e.astype(np.float32)
    if up:
        return np.where(f.astype(np.float64) < e, np.nextafter(f, np.float32(np.inf)), f)
    return np.where(f.astype(np.float64) > e, np.nextafter(f, np.float32(-np.inf)), f)


_SCRATCH_MAX_BYTES = 256 << 20  # larger inputs sort into fresh memory
_scratch: dict[np.dtype, np.ndarray] = {}
_scratch_lock = threading.Lock()


def _sort_all(parts: list[np.ndarray], scratch: np.ndarray | None) -> list[SortedChunk]:
    if scratch is None:
        scratches = [None] * len(parts)
    else:
        offsets = np.cumsum([0] + [len(p) for p in parts])
        scratches = [scratch[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if len(parts) == 1:
        return [SortedChunk(parts[0], scratches[0])]
    return list(_executor().map(SortedChunk, parts, scratches))


def _parts(flat: np.ndarray) -> list[np.ndarray]:
    workers = os.cpu_count() or 1
    if flat.size < _PARALLEL_MIN or workers == 1:
        return [flat]
    bounds = np.linspace(0, flat.size, workers + 1).astype(np.int64)
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def histogram(arr: np.ndarray, bins, range_=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 counts, float64 edges, float64 STAT_NAMES row) of a host array.

    ``bins`` is an int (linear bins over ``range_`` or the finite min..max) or fp64 edges;
    counts equal ``np.histogram(arr.astype(float64), edges)``.
    """
    flat = as_sortable(arr)
    parts = _parts(flat)
    use_scratch = flat.nbytes <= _SCRATCH_MAX_BYTES and _scratch_lock.acquire(blocking=False)
    try:
        scratch = None
        if use_scratch:
            scratch = _scratch.get(flat.dtype)
            if scratch is None or len(scratch) < flat.size:
                scratch = _scratch[flat.dtype] = np.empty(flat.size, flat.dtype)
        chunks = _sort_all(parts, scratch)
        stats = combine_stats(chunks)
        if isinstance(bins, (int, np.integer)):
            if range_ is not None:
                lo, hi = float(range_[0]), float(range_[1])
            elif stats[0] > 0:
                lo, hi = float(stats[3]), float(stats[4])
            else:
                lo, hi = 0.0, 1.0
            edges = linear_edges(lo, hi, int(bins))
        else:
            edges = np.asarray(bins, dtype=np.float64)
        counts = counts_from_chunks(chunks, edges)
    finally:
        if use_scratch:
            _scratch_lock.release()
    return counts, edges, stats


def combine_stats(chunks: list[SortedChunk]) -> np.ndarray:
    """float64 ``STAT_NAMES`` row from the chunks (identities for min/max with no finite)."""
    n = sum(len(c.s) for c in chunks)
    nan = sum(c.nan for c in chunks)
    pinf = sum(c.pos_inf for c in chunks)
    ninf = sum(c.neg_inf for c in chunks)
    lows = [c.lo for c in chunks if c.lo is not None]
    highs = [c.hi for c in chunks if c.hi is not None]
    lo = min(lows) if lows else math.inf
    hi = max(highs) if highs else -math.inf
    abs_max = max(-lo, hi) if lows else 0.0
    return np.array(
        [
            n - nan - pinf - ninf,
            math.fsum(c.sum for c in chunks),
            math.fsum(c.sum_sq for c in chunks),
            lo,
            hi,
            abs_max,
            nan,
            pinf,
            ninf,
            sum(c.zeros for c in chunks),
        ],
        dtype=np.float64,
    )


def counts_from_chunks(chunks: list[SortedChunk], edges: np.ndarray) -> np.ndarray:
    """int64 counts of ``np.histogram(x.astype(float64), edges)``."""
    below = sum(c.below(edges) for c in chunks)
    return np.diff(below).astype(np.int64)


def linear_edges(lo: float, hi: float, n_bins: int) -> np.ndarray:
    """The edges numpy uses for ``bins=n_bins`` over ``[lo, hi]``."""
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1, dtype=np.float64)
