"""Histogram edges on the device for the Triton path, with no host sync and few launches.

- Edges known on the host (``"tensorflow"``, explicit edges, int bins over an explicit range)
  are copied once per device through pinned memory (``non_blocking``) and cached by value, so
  a repeated call launches no copy at all.
- Int bins over each tensor's own finite min..max take one launch, ``_linear_edges_kernel``,
  for every row at once (the torch form of the same formula was ~20 small launches).

The linear edges equal numpy's ``linspace`` bit for bit: the kernel does numpy's operations
in numpy's order, and it is compiled with ``enable_fp_fusion=False`` so that ``i * step + lo``
is two roundings, as in numpy, and never one FMA.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["host_edges", "linear_edges_from_stats", "uniform_range"]

_CACHE_SIZE = 64
_BLOCK = 1024

_cache: OrderedDict[tuple, tuple] = OrderedDict()
_lock = threading.Lock()


@triton.jit
def _linear_edges_kernel(p_stats, p_edges, n_bins, BLOCK: tl.constexpr):
    """Row ``r``: ``lo, hi`` = the finite min, max of stats row ``r`` (0, 1 if it has no finite
    element; -0.5, +0.5 each side when equal); ``e_i = i * (d / n) + lo`` with ``d = hi - lo``
    (``i / n * d + lo`` when ``d / n == 0``), ``e_n = hi``: numpy's ``linspace``."""
    i_r = tl.program_id(0).to(tl.int64)
    p_row = p_stats + i_r * 10
    has = tl.load(p_row) > 0
    lo = tl.where(has, tl.load(p_row + 3), 0.0)
    hi = tl.where(has, tl.load(p_row + 4), 1.0)
    same = lo == hi
    lo = tl.where(same, lo - 0.5, lo)
    hi = tl.where(same, hi + 0.5, hi)
    delta = hi - lo
    step = delta / n_bins
    p_out = p_edges + i_r * (n_bins + 1)
    for start in range(0, n_bins + 1, BLOCK):
        o_e = start + tl.arange(0, BLOCK)
        b_i = o_e.to(tl.float64)
        b_e = tl.where(step == 0, b_i / n_bins * delta, b_i * step) + lo
        b_e = tl.where(o_e == n_bins, hi, b_e)
        tl.store(p_out + o_e, b_e, mask=o_e <= n_bins)


def linear_edges_from_stats(stats: torch.Tensor, n_bins: int) -> torch.Tensor:
    """float64 ``(T, n_bins + 1)``: numpy's edges for ``n_bins`` bins over each row's range.

    ``stats``: float64 ``(T, 10)`` rows of ``tensor_stats`` (contiguous), on the device.

    Example::

        edges = linear_edges_from_stats(tensor_stats([x]), 64)[0]  # (65,)
    """
    stats = stats.contiguous()
    edges = torch.empty((stats.shape[0], n_bins + 1), dtype=torch.float64, device=stats.device)
    block = min(_BLOCK, triton.next_power_of_2(n_bins + 1))
    _linear_edges_kernel[(stats.shape[0],)](
        stats, edges, n_bins, BLOCK=block, num_warps=4, enable_fp_fusion=False
    )
    return edges


def uniform_range(range_, n_bins: int) -> np.ndarray:
    """numpy's edges for ``n_bins`` bins over an explicit ``(lo, hi)`` (widened when equal)."""
    lo, hi = float(range_[0]), float(range_[1])
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1)


def host_edges(array: np.ndarray, device: torch.device, name: str = "") -> tuple:
    """``(edges, uniform)``: float64 edges known on the host, on ``device``, copied once through
    pinned memory with no sync and then cached (by ``name`` if given, else by value; treat
    ``edges`` as read-only); ``uniform`` is True when they are numpy's ``linspace`` of their
    ends, so the kernel may find bins with the linear guess."""
    array = np.ascontiguousarray(array, dtype=np.float64)
    key = (device, name or array.tobytes())
    if device.type == "cuda":  # a copy queued on one stream is only known done on that one
        key += (torch.cuda.current_stream(device).cuda_stream,)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    n = array.size - 1
    uniform = bool(n >= 1 and np.array_equal(array, np.linspace(array[0], array[-1], n + 1)))
    host = torch.from_numpy(array.copy())
    if device.type == "cuda":
        edges = host.pin_memory().to(device, non_blocking=True)
    else:
        edges = host.to(device)
    with _lock:
        _cache[key] = (edges, uniform)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return edges, uniform
