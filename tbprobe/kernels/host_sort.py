"""The general host kernel: sort each chunk in cache and read everything off the sorted chunk.

Bin counts come from bisecting the thresholds into the sorted chunk, as ``np.histogram`` does
for non-uniform edges; NaN/Inf/zero counts and min/max from its ends and a few bisections.
Works for every edge set and for fp32 (fp16 widened) or fp64 (ints and bool widened) data.
"""

from __future__ import annotations

import math

import numpy as np

from tbprobe.kernels.host_sums import Stats


def round_out_f32(e: np.ndarray, up: bool) -> np.ndarray:
    """For fp32 x: ``x < e`` iff ``x < ceil32(e)`` and ``x <= e`` iff ``x <= floor32(e)``."""
    with np.errstate(over="ignore"):  # beyond fp32: ±inf, and nextafter of the maximum
        f = e.astype(np.float32)
        if up:
            return np.where(f.astype(np.float64) < e, np.nextafter(f, np.float32(np.inf)), f)
        return np.where(f.astype(np.float64) > e, np.nextafter(f, np.float32(-np.inf)), f)


class SortPlan:
    """Thresholds in the work dtype: ``below[j] = #(x < left[j])``, then ``#(x <= last)``."""

    __slots__ = ("dtype", "left", "last")

    def __init__(self, edges: np.ndarray, dtype: np.dtype):
        self.dtype = dtype
        if dtype == np.float32:
            self.left = round_out_f32(edges[:-1], up=True)
            self.last = round_out_f32(edges[-1:], up=False)[0]
        else:
            self.left = np.ascontiguousarray(edges[:-1])
            self.last = edges[-1]

    def partial(self) -> SortPartial:
        return SortPartial(len(self.left))

    def fold(self, src: np.ndarray, acc: SortPartial, bufs: tuple[np.ndarray, ...]) -> None:
        """Fold one chunk (any real dtype, at most the buffers' length) into ``acc``."""
        s, sq = bufs[0][: len(src)], bufs[1]
        np.copyto(s, src, casting="unsafe")  # exact: fp16 -> fp32, ints/bool -> fp64 like numpy
        s.sort()  # NaN sorts last
        m = len(s)
        st = acc.stats
        st.n += m
        finite = s
        first, end = s[0], s[-1]
        if first == -np.inf or not math.isfinite(end):
            inf = s.dtype.type(math.inf)
            not_nan = int(s.searchsorted(inf, "right"))
            pinf = not_nan - int(s.searchsorted(inf, "left"))
            ninf = int(s.searchsorted(-inf, "right"))
            st.nan += m - not_nan
            st.pinf += pinf
            st.ninf += ninf
            finite = s[ninf : not_nan - pinf]
        if len(finite):
            zero = s.dtype.type(0)
            st.zeros += int(finite.searchsorted(zero, "right") - finite.searchsorted(zero, "left"))
            st.add_finite(finite, float(finite[0]), float(finite[-1]), sq)
        # Bisect only the thresholds inside [first, end]: below it none counts, above it all do.
        left = self.left
        j0 = int(left.searchsorted(first, "right"))
        j1 = int(left.searchsorted(end, "right"))
        if j1 > j0:
            acc.below[j0:j1] += s.searchsorted(left[j0:j1], "left")
        acc.full[j1] += m
        acc.last += int(s.searchsorted(self.last, "right"))

    def below(self, parts: list[SortPartial]) -> np.ndarray:
        """int64 ``#(x < e_j)`` for every edge but the last, then ``#(x <= e_last)``."""
        n_left = len(self.left)
        below = np.empty(n_left + 1, dtype=np.int64)
        below[:-1] = sum(p.below for p in parts) + np.cumsum(sum(p.full for p in parts))[:-1]
        below[-1] = sum(p.last for p in parts)
        return below


class SortPartial:
    """One thread's totals: bisection counts, chunk sizes by first index, and stats."""

    __slots__ = ("below", "full", "last", "stats")

    def __init__(self, n_left: int):
        self.below = np.zeros(n_left, dtype=np.int64)  # #(x < left[j]) inside the bisected span
        self.full = np.zeros(n_left + 1, dtype=np.int64)  # chunk sizes, counted from an index on
        self.last = 0
        self.stats = Stats()
