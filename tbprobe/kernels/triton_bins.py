"""Device helpers for the Triton histogram: the bin of each element, in float64, as numpy finds it.

``bin_index`` is called from ``triton_histogram``'s kernel, once per block; it finds the bin in
one of three ways, picked by the caller's ``KIND``:

- ``"tensorflow"``: TensorBoard's exponential edges. A guess from ``log|x|`` in fp32 is at most
  one bin off, and numpy's ±1 correction against the edges in memory makes it exact; only
  lanes whose guess is within 2^-8 bin of an edge gather the edges (the others are exact).
- ``"linear"``: ``n`` equal bins over ``[e_0, e_n]`` (int bins, or explicit edges that are
  numpy's linspace): numpy's fast-path formula ``(x - lo) / (hi - lo) * n`` and the same ±1
  correction, near edges only. A range so narrow that edges repeat (one large int64 with
  min == max) takes the binary search instead, decided per row at run time.
- ``"edges"``: any increasing edges: a branch-free binary search, ``ceil(log2(n + 1))`` steps.

Every comparison is ``x`` in float64 against the float64 edges, as numpy compares ``x.double()``.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

__all__ = ["bin_index"]

_LN_1E_12 = tl.constexpr(math.log(1e-12))
_INV_LN_1_1 = tl.constexpr(1.0 / math.log(1.1))


@triton.jit
def _correct(b_x, b_i, p_edges, n_bins, m_near):
    """numpy's fast-path correction of a guess ``i`` in ``[0, n)`` where ``m_near``: ``i -= x <
    e[i]``, then ``i += x >= e[i + 1]`` unless ``i`` is the last bin; exact when ``i`` is at most
    one off. Lanes off ``m_near`` (guess provably exact) load nothing and keep ``i``."""
    e_lo = tl.load(p_edges + b_i, mask=m_near, other=float("-inf"))
    b_i = tl.maximum(tl.where(b_x < e_lo, b_i - 1, b_i), 0)
    e_hi = tl.load(p_edges + b_i + 1, mask=m_near, other=float("inf"))
    m_up = (b_x >= e_hi) & (b_i != n_bins - 1)
    return tl.where(m_up, b_i + 1, b_i)


@triton.jit
def _near_integer(b_f):
    """True where ``b_f`` is within 2^-8 of an integer: a guess ``floor(b_f)`` whose error is
    below 2^-8 bin can be wrong only there (NaN: True)."""
    b_frac = b_f - tl.floor(b_f)
    return ~((b_frac > 0.00390625) & (b_frac < 0.99609375))


@triton.jit
def _search(b_x, p_edges, n_bins, N_STEPS: tl.constexpr):
    """The largest ``i`` in ``[0, n]`` with ``e_i <= x``, one bit per step (``2^N_STEPS > n``),
    then ``i = n`` (``x == e_n``) joins bin ``n - 1``: numpy's rule, repeated edges included."""
    b_i = tl.zeros(b_x.shape, tl.int32)
    for s in tl.static_range(N_STEPS):
        b_j = tl.minimum(b_i + (1 << (N_STEPS - 1 - s)), n_bins)
        b_i = tl.where(tl.load(p_edges + b_j) <= b_x, b_j, b_i)
    return tl.minimum(b_i, n_bins - 1)


@triton.jit
def bin_index(b_x, m_ok, p_edges, n_bins, KIND: tl.constexpr, N_STEPS: tl.constexpr):
    """Bin ``i`` in ``[0, n)`` with ``e_i <= x < e_{i+1}`` (``x == e_n`` in the last bin) where
    ``m_ok``; any index in ``[0, n)`` elsewhere."""
    if KIND == "tensorflow":
        # Positive edges are 1e-12 * 1.1**k (to 1e-13 relative), the 0.0 edge is edge n/2, the
        # negative ones mirror them. k ~ log(|x| / 1e-12) / log(1.1) in fp32 is off by < 1e-4
        # (argument rounding 2^-24, log and product rounding, edge drift 1e-12), so floor(k) is
        # exact unless k is within 2^-8 of an integer; only those lanes gather two edges.
        b_a = tl.where(m_ok, tl.abs(b_x), 1.0)
        b_a = tl.minimum(tl.maximum(b_a, 1e-13), 1e21).to(tl.float32)
        b_kf = (tl.log(b_a) - _LN_1E_12) * _INV_LN_1_1
        b_k = tl.maximum(tl.floor(b_kf), -1.0).to(tl.int32)
        half = n_bins // 2
        b_i = tl.where(b_x >= 0, half + 1 + b_k, half - 2 - b_k)
        b_i = tl.minimum(tl.maximum(b_i, 0), n_bins - 1)
        b_i = _correct(b_x, b_i, p_edges, n_bins, m_ok & _near_integer(b_kf))
    elif KIND == "linear":
        lo = tl.load(p_edges)  # linspace puts lo and hi at both ends exactly
        hi = tl.load(p_edges + n_bins)
        # The guess is within one bin only while a bin spans many float64 steps. A range a few
        # ulps wide (min == max == a large int64, widened by +-0.5) rounds edges together: the
        # bin then is the last of equal edges, found by the search (a uniform run-time branch).
        mag = tl.maximum(tl.abs(lo), tl.abs(hi))
        step = (hi - lo) / n_bins
        if (step > tl.maximum(mag * 2.0**-40, 2.0**-1000)) & (step < float("inf")):
            # Each edge is within 2^-12 bin of lo + i * step here, so the guess is exact
            # unless b_f is within 2^-8 of an integer; only those lanes gather two edges.
            b_f = (tl.where(m_ok, b_x, lo) - lo) / (hi - lo) * n_bins  # numpy's operations
            b_i = tl.minimum(b_f.to(tl.int32), n_bins - 1)
            b_i = _correct(b_x, b_i, p_edges, n_bins, m_ok & _near_integer(b_f))
        else:
            b_i = _search(b_x, p_edges, n_bins, N_STEPS)
    else:
        b_i = _search(b_x, p_edges, n_bins, N_STEPS)
    return b_i
