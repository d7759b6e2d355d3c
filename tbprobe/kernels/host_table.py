"""The fast host kernel for fp32 data: one table lookup per element, then ``np.bincount``.

For fp32 data, ``x < e`` (any fp64 edge ``e``) is a comparison of the raw bits ``u`` with one
threshold ``X``: positives satisfy ``x < e`` iff ``u < X``; negatives, whose bits grow as the
value falls, iff ``u >= X`` (see :func:`_thresholds`). Cut the 2**32 bit patterns into regions
of ``2**R`` consecutive patterns with at most one threshold each, and the key

    ``k = (u + A[u >> R]) >> R``  with ``A[r] = 2**R - offset of r's threshold`` (0 if none)

is non-decreasing in ``u`` and steps at every threshold. So ``np.bincount(k)`` counts the
elements between consecutive thresholds exactly, and its prefix sums give ``#(x < e)`` for
every edge: one shift, one lookup in an 8192-entry table, one add, one shift and one count per
element, instead of a sort. Edge sets that crowd two thresholds into one region even with
``R = 16`` take the sort kernel instead.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from tbprobe.kernels.host_sort import round_out_f32
from tbprobe.kernels.host_sums import Stats

_SIGN = 0x80000000
_U32 = 1 << 32
_REGION_BITS = (19, 18, 17, 16)  # 8192 to 65536 table entries
_ZERO_BOUNDS = (1, _SIGN, _SIGN | 1)  # +0.0 is u == 0 and -0.0 is u == _SIGN
_plans: OrderedDict[bytes, TablePlan | None] = OrderedDict()
_PLANS_KEPT = 16
_plans_lock = threading.Lock()


def _bits(f: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(f, dtype=np.float32).view(np.uint32).astype(np.int64)


def _up32(a: np.ndarray) -> np.ndarray:
    """The smallest fp32 above each ``a >= 0`` (``inf`` stays ``inf``)."""
    f = round_out_f32(a, up=True)
    return np.where(f.astype(np.float64) == a, np.nextafter(f, np.float32(np.inf)), f)


def _thresholds(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 bit thresholds ``X`` and bool ``neg`` per edge such that, for fp32 ``x``,
    ``#(x < e_j)`` (``#(x <= e_last)`` for the last edge) is ``#(x < 0) + #(0 <= u < X)``
    where ``neg`` is False and ``#(u >= X)`` where it is True.

    NaNs with the sign bit set land on the same side of every threshold, so they cancel out of
    every bin, like numpy's NaNs, which sort above everything.
    """
    left, last = edges[:-1], edges[-1:]
    x = np.empty(len(edges), dtype=np.int64)
    with np.errstate(invalid="ignore"):
        mag = np.abs(left)
        x[:-1] = np.where(
            left > 0,
            _bits(round_out_f32(left, up=True)),  # x < e  iff  x < ceil32(e)
            _SIGN | np.where(np.isinf(mag), 0x7F800001, _bits(_up32(mag))),  # |x| > |e|
        )
        x[:-1][left == 0] = _SIGN | 1  # x < 0: every negative but -0.0
        if last[0] >= 0:  # x <= e  iff  x < up32(e); +inf itself counts when e is +inf
            x[-1] = 0x7F800001 if np.isinf(last[0]) else _bits(_up32(last))[0]
        else:  # |x| >= |e|  iff  |x| >= ceil32(|e|)
            x[-1] = _SIGN | _bits(round_out_f32(-last, up=True))[0]
    neg = np.concatenate((left <= 0, last < 0))
    return x, neg


def _key_table(bounds: np.ndarray, r_bits: int) -> np.ndarray | None:
    """uint32 ``A`` (see the module docstring) that makes every bound a step of the key."""
    bounds = np.unique(bounds)
    size = 1 << r_bits
    region, off = bounds >> r_bits, bounds & (size - 1)
    inner = off != 0
    if len(np.unique(region[inner])) != int(inner.sum()):
        return None  # two thresholds inside one region
    a = np.zeros(_U32 >> r_bits, dtype=np.int64)
    a[region[~inner]] = size  # a threshold at a region start: the whole region steps up
    a[region[inner]] = size - off[inner]
    tops = (np.arange(len(a), dtype=np.int64) + 1) * size - 1
    if np.any(tops + a >= _U32):
        return None  # the sum would wrap in uint32

    def key(u):
        return (u + a[u >> r_bits]) >> r_bits

    b = bounds[bounds > 0]
    if np.any(key(b - 1) >= key(b)):
        return None
    return a.astype(np.uint32)


class TablePlan:
    """Key table and the key of every threshold, for fp32 data and one set of edges."""

    __slots__ = ("r_bits", "table", "n_keys", "k_edges", "neg", "k_sign", "k_zeros")

    def __init__(self, r_bits, table, k_edges, neg, k_sign, k_zeros):
        self.r_bits, self.table = r_bits, table
        self.n_keys = int((_U32 - 1 + int(table[-1])) >> r_bits) + 1
        self.k_edges, self.neg, self.k_sign, self.k_zeros = k_edges, neg, k_sign, k_zeros

    @staticmethod
    def for_edges(edges: np.ndarray) -> TablePlan | None:
        """The plan for fp64 ``edges`` ``(n,)``, or None if no region size separates them."""
        cache_key = edges.tobytes()
        with _plans_lock:
            if cache_key in _plans:
                _plans.move_to_end(cache_key)
                return _plans[cache_key]
        plan = _build(edges)
        with _plans_lock:
            _plans[cache_key] = plan
            if len(_plans) > _PLANS_KEPT:
                _plans.popitem(last=False)
        return plan

    def partial(self) -> TablePartial:
        return TablePartial(self.n_keys)

    def fold(self, src: np.ndarray, acc: TablePartial, bufs: tuple[np.ndarray, ...]) -> None:
        """Fold one fp32 or fp16 chunk (at most the buffers' length) into ``acc``."""
        m = len(src)
        keys, shifted = bufs[0][:m].view(np.uint32), bufs[1][:m].view(np.uint32)
        if src.dtype == np.float32:
            c = src
        else:
            c = bufs[2][:m]
            np.copyto(c, src)  # fp16 -> fp32 is exact
        u = c.view(np.uint32)
        np.right_shift(u, self.r_bits, out=shifted)
        self.table.take(shifted, out=keys, mode="clip")
        np.add(keys, u, out=keys)
        np.right_shift(keys, self.r_bits, out=keys)
        h = np.bincount(keys)
        acc.hist[: len(h)] += h
        st = acc.stats
        st.n += m
        lo, hi = c.min(), c.max()  # NaN anywhere makes both NaN
        finite = c
        if not (math.isfinite(lo) and math.isfinite(hi)):
            st.nan += int(np.count_nonzero(np.isnan(c)))
            st.pinf += int(np.count_nonzero(c == np.inf))
            st.ninf += int(np.count_nonzero(c == -np.inf))
            finite = c[np.isfinite(c)]
            lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
        if self.k_zeros is None:
            st.zeros += len(finite) - int(np.count_nonzero(finite))
        st.add_finite(finite, float(lo), float(hi), bufs[0][:m])  # keys are counted: reuse

    def below(self, parts: list[TablePartial]) -> tuple[np.ndarray, int | None]:
        """int64 ``#(x < e_j)`` (``<=`` for the last edge), and the zero count if known."""
        cum = np.zeros(self.n_keys + 1, dtype=np.int64)
        np.cumsum(sum(p.hist for p in parts), out=cum[1:])  # cum[k] = #(key < k)
        n = int(cum[-1])
        lt = cum[self.k_edges]
        below = np.where(self.neg, n - lt, n - cum[self.k_sign] + lt)
        zeros = None
        if self.k_zeros is not None:
            k_pos, k_sign, k_neg = self.k_zeros
            zeros = int(cum[k_pos] + cum[k_neg] - cum[k_sign])
        return below, zeros


def _build(edges: np.ndarray) -> TablePlan | None:
    x, neg = _thresholds(edges)
    for with_zeros in (True, False):
        bounds = np.concatenate((x, [_SIGN], _ZERO_BOUNDS if with_zeros else []))
        for r_bits in _REGION_BITS:
            table = _key_table(bounds.astype(np.int64), r_bits)
            if table is None:
                continue
            a = table.astype(np.int64)

            def key(u, a=a, r_bits=r_bits):
                return (np.asarray(u, dtype=np.int64) + a[np.asarray(u) >> r_bits]) >> r_bits

            k_zeros = tuple(int(k) for k in key(np.array(_ZERO_BOUNDS))) if with_zeros else None
            return TablePlan(r_bits, table, key(x), neg, int(key(np.array([_SIGN]))[0]), k_zeros)
    return None


class TablePartial:
    """One thread's key histogram and stats."""

    __slots__ = ("hist", "stats")

    def __init__(self, n_keys: int):
        self.hist = np.zeros(n_keys, dtype=np.int64)
        self.stats = Stats()
