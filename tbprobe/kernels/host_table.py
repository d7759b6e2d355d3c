"""The fast host kernel for fp32 data: one table lookup per element, then a count.

For fp32 data, ``x < e`` (any fp64 edge ``e``) is a comparison of the raw bits ``u`` with one
threshold ``X``: positives satisfy ``x < e`` iff ``u < X``; negatives, whose bits grow as the
value falls, iff ``u >= X`` (see :func:`_thresholds`). With ``B`` the sorted distinct
thresholds ("bounds"), the key

    ``k(u) = #(b in B: b <= u)``

steps by one at every bound, so ``#(key < k(X)) = #(u < X)`` for every threshold, and one count
of the keys gives every bin. Cut the 2**32 bit patterns into regions of ``2**R`` consecutive
patterns with at most one bound strictly inside each; with ``n_r`` the bounds at or below
region ``r``'s start and ``off_r`` the offset of its inner bound,

    ``k(u) = ((u + T[u >> R]) mod 2**32) >> R``,  ``T[r] = (n_r - r) * 2**R + (2**R - off_r)``

(the last term 0 when ``r`` holds no inner bound): one shift, one lookup in an 8192-entry
table, one add and one shift per element. Keys are dense (about 1550 for the default edges), so
they fit int16 and the count runs over an L1-resident array. Edge sets that crowd two bounds
into one region even with ``R = 16`` take the sort kernel instead.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import torch

from tbprobe.kernels.host_scratch import scratch
from tbprobe.kernels.host_sort import round_out_f32
from tbprobe.kernels.host_sums import Stats

_SIGN = 0x80000000
_U32 = 1 << 32
_REGION_BITS = (19, 18, 17, 16)  # 8192 to 65536 table entries
_ZERO_BOUNDS = (1, _SIGN, _SIGN | 1)  # +0.0 is u == 0 and -0.0 is u == _SIGN
# torch.bincount takes the min and max of its input first; torch runs a reduction of fewer
# than 32768 elements (its GRAIN_SIZE) on the calling thread, never in its OpenMP pool, which
# stalls when another process holds a core.
COUNT_SLICE = 32704
_plans: OrderedDict[bytes, TablePlan | None] = OrderedDict()
_PLANS_KEPT = 16
_plans_lock = threading.Lock()


def _bits(f: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(f, dtype=np.float32).view(np.uint32).astype(np.int64)


def _up32(a: np.ndarray) -> np.ndarray:
    """The smallest fp32 above each ``a >= 0`` (``inf`` stays ``inf``)."""
    f = round_out_f32(a, up=True)
    with np.errstate(over="ignore"):  # nextafter of the fp32 maximum is inf
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


def _keys_of(u: np.ndarray, table: np.ndarray, r_bits: int) -> np.ndarray:
    """int64 keys of int64 bit patterns ``u``, computed like the kernel does (mod 2**32)."""
    u = np.asarray(u, dtype=np.int64)
    return ((u + table.astype(np.int64)[u >> r_bits]) % _U32) >> r_bits


def _key_table(bounds: np.ndarray, r_bits: int) -> np.ndarray | None:
    """uint32 ``T`` (see the module docstring) for sorted distinct int64 ``bounds`` in
    ``[1, 2**32)``, or None if two bounds share a region or the keys would not fit."""
    size = 1 << r_bits
    n_regions = _U32 >> r_bits
    if len(bounds) + 1 >= n_regions:
        return None  # keys up to len(bounds) + 1 must stay below 2**(32 - R): no wrap
    region, off = bounds >> r_bits, bounds & (size - 1)
    inner = off != 0
    if len(np.unique(region[inner])) != int(inner.sum()):
        return None  # two bounds inside one region
    r = np.arange(n_regions, dtype=np.int64)
    t = (np.searchsorted(bounds, r << r_bits, side="right") - r) << r_bits
    t[region[inner]] += size - off[inner]
    table = (t % _U32).astype(np.uint32)
    rank = np.arange(1, len(bounds) + 1)
    if np.any(_keys_of(bounds, table, r_bits) != rank):
        return None
    if np.any(_keys_of(bounds - 1, table, r_bits) != rank - 1):
        return None
    return table


class TablePlan:
    """Key table and the key of every threshold, for fp32 data and one set of edges."""

    __slots__ = ("r_bits", "table", "n_keys", "key_dtype", "k_edges", "neg", "k_sign", "k_zeros")

    def __init__(self, r_bits, table, n_keys, k_edges, neg, k_sign, k_zeros):
        self.r_bits, self.table, self.n_keys = r_bits, table, n_keys
        self.key_dtype = np.dtype(np.int16 if n_keys <= np.iinfo(np.int16).max else np.int32)
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

    def count(self, c: np.ndarray, hist: np.ndarray) -> None:
        """Add the key counts of fp32 ``c`` ``(m,)`` to int64 ``hist`` ``(n_keys,)``."""
        m = len(c)
        u = c.view(np.uint32)
        region = scratch("region", np.intp, m)
        looked = scratch("looked", np.uint32, m)
        keys = scratch("keys", self.key_dtype, m)
        np.right_shift(u, self.r_bits, out=region, casting="unsafe")  # intp: take's own index
        self.table.take(region, out=looked, mode="wrap")  # always in range; 'wrap' is fastest
        np.add(looked, u, out=looked)  # mod 2**32 by design
        np.right_shift(looked, self.r_bits, out=keys, casting="unsafe")  # < n_keys: exact
        t = torch.from_numpy(keys)
        for j in range(0, m, COUNT_SLICE):  # torch's count releases the GIL; numpy's does not
            h = torch.bincount(t[j : j + COUNT_SLICE], minlength=self.n_keys)
            np.add(hist, h.numpy(), out=hist)  # sync-ok: a CPU tensor

    def add_stats(self, c: np.ndarray, st: Stats) -> None:
        """Fold fp32 ``c`` ``(m,)`` into ``st``: counts, NaN/±Inf, min/max, sums (zeros too
        when the keys do not separate them)."""
        st.n += len(c)
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
        st.add_finite(finite, float(lo), float(hi), scratch("squares", np.float32, len(c) // 8 + 1))

    def fold(self, src: np.ndarray, acc: TablePartial, bufs: tuple[np.ndarray, ...]) -> None:
        """Fold one fp32 or fp16 chunk (at most the buffers' length) into ``acc``."""
        if src.dtype == np.float32:
            c = src
        else:
            c = bufs[0][: len(src)]
            np.copyto(c, src)  # fp16 -> fp32 is exact
        self.count(c, acc.hist)
        self.add_stats(c, acc.stats)

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
        bounds = np.unique(np.concatenate((x, [_SIGN], _ZERO_BOUNDS if with_zeros else [])))
        bounds = bounds.astype(np.int64)
        for r_bits in _REGION_BITS:
            table = _key_table(bounds, r_bits)
            if table is None:
                continue

            def key(u, table=table, r_bits=r_bits):
                return _keys_of(np.asarray(u), table, r_bits)

            k_zeros = tuple(int(k) for k in key(np.array(_ZERO_BOUNDS))) if with_zeros else None
            k_sign = int(key(np.array([_SIGN]))[0])
            return TablePlan(r_bits, table, len(bounds) + 1, key(x), neg, k_sign, k_zeros)
    return None


class TablePartial:
    """One thread's key histogram and stats."""

    __slots__ = ("hist", "stats")

    def __init__(self, n_keys: int):
        self.hist = np.zeros(n_keys, dtype=np.int64)
        self.stats = Stats()
