"""Per-chunk statistics of host data: counts, min/max and fp64 sums within 1e-6 of exact.

For fp32 data the squares are taken in fp32 and summed eight at a time in fp32, then in fp64.
Every term is non-negative, so no cancellation can magnify the rounding: a rounded square is
within ``u = 2**-24`` of the exact one and each of the 7 fp32 additions adds at most ``u`` of
the partial sum, so the result is within ``8u ~ 4.8e-7`` of the exact sum of squares. The
bound needs normal, finite fp32 squares: inputs near fp32 overflow (``|x| >= 1e18``) or whose
squares are tiny enough to lose bits to underflow take the exact fp64 product instead. Plain
sums can cancel, so they are always accumulated in fp64.
"""

from __future__ import annotations

import math

import numpy as np

_ROWS = 8  # fp32 terms added before widening: the error bound is (_ROWS) * 2**-24
_SQUARE_MAX = 1e18  # |x| below this: _ROWS squares sum far below the fp32 maximum (3.4e38)
_TINY_MEAN_SQUARE = 1e-37  # above this mean square, underflowed bits are < 1e-8 of the sum


class Stats:
    """Running ``STAT_NAMES`` totals over the chunks one thread took."""

    __slots__ = ("n", "nan", "pinf", "ninf", "zeros", "lo", "hi", "sums", "sums_sq")

    def __init__(self):
        self.n = self.nan = self.pinf = self.ninf = self.zeros = 0
        self.lo, self.hi = math.inf, -math.inf
        self.sums: list[float] = []
        self.sums_sq: list[float] = []

    def add_finite(self, f: np.ndarray, lo: float, hi: float, sq: np.ndarray) -> None:
        """Fold in finite values ``f`` ``(m,)`` (fp32 or fp64) whose min/max are ``lo``/``hi``.

        ``sq`` is a scratch buffer of ``f``'s dtype with at least ``m // 8`` elements.
        """
        if not len(f):
            return
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if f.dtype == np.float32:
            total, total_sq = _sums_f32(f, sq, lo, hi)
        else:
            total, total_sq = float(np.add.reduce(f)), float(np.einsum("i,i->", f, f))
        self.sums.append(total)
        self.sums_sq.append(total_sq)


def _sums_f32(f: np.ndarray, sq: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    total = float(np.add.reduce(f, dtype=np.float64))  # exact widening, pairwise fp64
    m = len(f)
    k = m // _ROWS
    if k and max(-lo, hi) < _SQUARE_MAX:
        rows = f[: _ROWS * k].reshape(_ROWS, k)  # (ROWS, k): each column adds ROWS squares
        cols = np.einsum("ij,ij->j", rows, rows, out=sq[:k])  # fp32, one pass, no temporary
        total_sq = float(np.add.reduce(cols, dtype=np.float64))
        tail = f[_ROWS * k :].astype(np.float64)
        total_sq += float(np.einsum("i,i->", tail, tail))
        if total_sq >= m * _TINY_MEAN_SQUARE:
            return total, total_sq
    return total, float(np.einsum("i,i->", f, f, dtype=np.float64))


def combine(parts: list[Stats]) -> np.ndarray:
    """float64 ``STAT_NAMES`` row (identities for min/max when nothing is finite)."""
    nan, pinf, ninf = (sum(getattr(p, k) for p in parts) for k in ("nan", "pinf", "ninf"))
    count = sum(p.n for p in parts) - nan - pinf - ninf
    lo = min(p.lo for p in parts)
    hi = max(p.hi for p in parts)
    return np.array(
        [
            count,
            math.fsum(s for p in parts for s in p.sums),
            math.fsum(s for p in parts for s in p.sums_sq),
            lo,
            hi,
            max(-lo, hi) if count else 0.0,
            nan,
            pinf,
            ninf,
            sum(p.zeros for p in parts),
        ],
        dtype=np.float64,
    )
