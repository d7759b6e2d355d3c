"""Pure-torch reference of the device reductions: the non-CUDA path and the test oracle.

``tensor_stats`` here is the per-tensor oracle; the public non-CUDA ``kernels.tensor_stats``
takes ``reference_many``, which batches a whole list into a few ops per dtype group.

Everything here runs on the tensor's own device with no host synchronisation (no ``.item()``,
no data-dependent shapes, no ``bincount`` whose size depends on the data).
"""

from __future__ import annotations

import math

import torch

STAT_NAMES = (
    "count",
    "sum",
    "sum_sq",
    "min",
    "max",
    "abs_max",
    "nan",
    "pos_inf",
    "neg_inf",
    "zeros",
)

_FLOAT_TO_F32 = {torch.float16, torch.bfloat16}


def widen(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """A flat view of ``x`` in a dtype whose comparisons match ``x.double()`` exactly.

    Half, bf16 and fp8 widen to fp32 (exact); integers and bool widen to fp64, as numpy's
    ``x.double()`` does; fp32 and fp64 stay. Complex raises TypeError.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (got {x.dtype})")
    x = x.detach().reshape(-1)
    if x.dtype in (torch.float32, torch.float64):
        return x
    if x.dtype in _FLOAT_TO_F32 or x.dtype.is_floating_point:  # fp16, bf16, fp8 variants
        return x.float()
    return x.double()


def stats_row(x: torch.Tensor) -> torch.Tensor:
    """float64 ``(len(STAT_NAMES),)`` statistics of one tensor, moments over finite elements.

    With no finite element, ``min``/``max`` are ``+inf``/``-inf`` (the identities) and
    ``abs_max`` is 0.
    """
    x = widen(x)
    finite = torch.isfinite(x)
    x64 = x.double()
    xf = torch.where(finite, x64, torch.zeros((), dtype=torch.float64, device=x.device))
    inf = torch.full((), math.inf, dtype=torch.float64, device=x.device)
    mn = torch.where(finite, x64, inf).amin() if x.numel() else inf
    mx = torch.where(finite, x64, -inf).amax() if x.numel() else -inf
    row = torch.stack(
        [
            finite.sum().double(),
            xf.sum(),
            (xf * xf).sum(),
            mn,
            mx,
            xf.abs().amax() if x.numel() else torch.zeros_like(inf),
            torch.isnan(x).sum().double(),
            (x == math.inf).sum().double(),
            (x == -math.inf).sum().double(),
            (x == 0).sum().double(),
        ]
    )
    return row


def tensor_stats(tensors) -> torch.Tensor:
    """float64 ``(len(tensors), len(STAT_NAMES))`` statistics, on the tensors' device."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors: expected at least one tensor")
    return torch.stack([stats_row(t) for t in tensors])


def linear_edges(lo: torch.Tensor, hi: torch.Tensor, n_bins: int) -> torch.Tensor:
    """numpy's ``linspace(lo, hi, n_bins + 1)`` in float64, bit for bit, from device scalars."""
    delta = hi - lo
    steps = torch.arange(n_bins + 1, dtype=torch.float64, device=lo.device)
    step = delta / n_bins
    edges = torch.where(step == 0, steps / n_bins * delta, steps * step) + lo
    edges[-1] = hi
    return edges


def auto_range(
    stats: torch.Tensor, range_: tuple[float, float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) as numpy picks them for integer ``bins``: the finite min..max (0..1 when there
    is none), widened by 0.5 each side when they are equal."""
    dev = stats.device
    if range_ is not None:
        lo = torch.tensor(float(range_[0]), dtype=torch.float64, device=dev)
        hi = torch.tensor(float(range_[1]), dtype=torch.float64, device=dev)
    else:
        has = stats[0] > 0
        lo = torch.where(has, stats[3], torch.zeros_like(stats[3]))
        hi = torch.where(has, stats[4], torch.ones_like(stats[4]))
    same = lo == hi
    return torch.where(same, lo - 0.5, lo), torch.where(same, hi + 0.5, hi)


def bin_counts(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """int64 counts with numpy's rule: bins ``[e_i, e_{i+1})``, the last one closed."""
    n = edges.numel() - 1
    x64 = widen(x).double()
    idx = torch.searchsorted(edges, x64, right=True) - 1
    idx = torch.where(x64 == edges[-1], torch.full_like(idx, n - 1), idx)
    valid = (idx >= 0) & (idx < n) & ~torch.isnan(x64)
    idx = torch.where(valid, idx, torch.full_like(idx, n))
    counts = torch.zeros(n + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, idx, torch.ones_like(idx))
    return counts[:n]
