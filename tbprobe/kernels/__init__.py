"""Device reductions: statistics and histograms, computed where the tensor lives.

``tensor_stats`` and ``histogram`` run on the tensor's own device with no host sync. Host
(CPU) tensors and numpy arrays take a parallel sort-based path that is faster than numpy's
own ``np.histogram``; other devices take the pure-torch reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from tbprobe.kernels import host, reference_many
from tbprobe.kernels.dispatch import use_triton
from tbprobe.kernels.reference import STAT_NAMES, auto_range, bin_counts, linear_edges, stats_row
from tbprobe.kernels.thumbnail import thumbnail

__all__ = [
    "STAT_NAMES",
    "Histogram",
    "histogram",
    "histogram_many",
    "tensor_stats",
    "tensorflow_edges",
    "thumbnail",
]


@functools.lru_cache(maxsize=1)
def _tensorflow_edges_np() -> np.ndarray:
    v, pos = 1e-12, []
    while v < 1e20:
        pos.append(v)
        v *= 1.1
    edges = np.array([-p for p in reversed(pos)] + [0.0] + pos, dtype=np.float64)
    edges.flags.writeable = False
    return edges


def tensorflow_edges(device=None) -> torch.Tensor:
    """TensorBoard's default histogram edges: float64 ``(1549,)``, i.e. 1548 bins."""
    return torch.from_numpy(_tensorflow_edges_np().copy()).to(device)


@dataclass(frozen=True)
class Histogram:
    """``counts`` int64 ``(n_bins,)``, ``edges`` float64 ``(n_bins + 1,)``, ``stats`` float64
    ``(len(STAT_NAMES),)``; all on the input's device."""

    counts: torch.Tensor
    edges: torch.Tensor
    stats: torch.Tensor


def _check_bins(bins, range_):
    """Validate ``bins``/``range``; returns ("tensorflow" | "linear" | "edges", payload)."""
    if isinstance(bins, str):
        if bins != "tensorflow":
            raise ValueError(
                f"bins: expected 'tensorflow', an int or a sequence of edges, got {bins!r}"
            )
        return "edges", _tensorflow_edges_np()
    if isinstance(bins, (bool, np.bool_, float, np.floating)):
        raise TypeError(f"bins: expected 'tensorflow', an int or edges, got {bins!r}")
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise ValueError(f"bins: the number of bins must be at least 1, got {bins}")
        if range_ is not None:
            try:
                lo, hi = (float(v) for v in range_)
            except (TypeError, ValueError):
                raise TypeError(f"range: expected (min, max), got {range_!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"range: must be finite, got {range_!r}")
            if lo > hi:
                raise ValueError(f"range: max must not be below min, got {range_!r}")
            if not math.isfinite(hi - lo):
                raise ValueError(f"range: max - min overflows float64, got {range_!r}")
        return "linear", int(bins)
    if isinstance(bins, torch.Tensor):
        bins = bins.detach().cpu().double().numpy()  # sync-ok: user-given edges, tiny
    try:
        edges = np.asarray(bins, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"bins: expected 'tensorflow', an int or edges, got {bins!r}") from None
    if edges.ndim != 1:
        raise ValueError(f"bins: edges must be 1-D, got shape {edges.shape}")
    if edges.size < 2:
        raise ValueError(f"bins: expected at least 2 edges, got {edges.size}")
    if np.isnan(edges).any() or np.any(edges[:-1] > edges[1:]):
        raise ValueError("bins: edges must increase monotonically and not be NaN")
    return "edges", edges


def histogram(x, bins="tensorflow", range=None) -> Histogram:  # noqa: A002 - numpy's name
    """Histogram of ``x`` (any shape, any real dtype), equal to ``np.histogram(x.double(), edges)``.

    ``bins``: ``"tensorflow"`` (TensorBoard's default edges), an int (that many linear bins over
    ``range``, default the finite min..max of ``x``), or the edges. NaN and ±Inf are never
    counted in bins unless an edge is infinite; they are counted in ``stats``.

    Example::

        h = histogram(torch.randn(1000), bins=10)
        h.counts.sum()  # 1000
    """
    kind, payload = _check_bins(bins, range)
    if isinstance(x, np.ndarray):
        return _histogram_host(x, kind, payload, range)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if use_triton(x.device):
        from tbprobe.kernels import triton_histogram

        return triton_histogram.histogram(x, bins, range)
    if x.device.type == "cpu":
        return _histogram_host(x, kind, payload, range)
    stats = stats_row(x)
    if kind == "linear":
        lo, hi = auto_range(stats, range)
        edges = linear_edges(lo, hi, payload)
    elif payload is _tensorflow_edges_np():
        edges = _tensorflow_edges_on(x.device)
    else:
        edges = torch.as_tensor(payload, dtype=torch.float64).to(x.device)
    return Histogram(bin_counts(x, edges), edges, stats)


def histogram_many(tensors, bins="tensorflow", range=None) -> list[Histogram]:  # noqa: A002
    """One :class:`Histogram` per tensor with the same ``bins`` (on CUDA: one launch per dtype).

    Example::

        hs = histogram_many([p.grad for p in model.parameters()], bins=64)
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        raise ValueError("tensors: expected at least one tensor")
    first = tensors[0]
    if isinstance(first, torch.Tensor) and use_triton(first.device):
        from tbprobe.kernels import triton_histogram

        return triton_histogram.histogram_many(tensors, bins, range)
    for i, t in enumerate(tensors):
        if not isinstance(t, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"tensors[{i}]: expected a torch.Tensor or numpy array, got {type(t).__name__}"
            )
    return [histogram(t, bins, range) for t in tensors]


def _tensor_list(tensors) -> list:
    """``tensors`` as a list; a lone tensor or a non-iterable is refused, naming it."""
    if isinstance(tensors, (torch.Tensor, np.ndarray)):
        raise TypeError("tensors: expected a list of tensors, got one tensor (wrap it in a list)")
    try:
        return list(tensors)
    except TypeError:
        raise TypeError(
            f"tensors: expected a list of tensors, got {type(tensors).__name__}"
        ) from None


def tensor_stats(tensors) -> torch.Tensor:
    """float64 ``(len(tensors), len(STAT_NAMES))`` statistics on the tensors' device.

    Moments over finite elements; NaN/±Inf counted apart. On CUDA the whole list takes one
    Triton launch per dtype, with no host sync; on the CPU large finite float tensors take a
    short path (``host_stats``) and the rest a few torch ops per dtype group
    (``reference_many``), as on any other device.

    Example::

        rows = tensor_stats([p.grad for p in model.parameters()])  # (n_params, 10)
    """
    tensors = _tensor_list(tensors)
    if tensors and isinstance(tensors[0], torch.Tensor) and use_triton(tensors[0].device):
        from tbprobe.kernels import triton_stats

        return triton_stats.tensor_stats(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
    if tensors and tensors[0].device.type == "cpu":
        from tbprobe.kernels import host_stats

        return host_stats.tensor_stats(tensors)
    return reference_many.tensor_stats(tensors)


_edges_by_device: dict[torch.device, torch.Tensor] = {}


def _tensorflow_edges_on(device: torch.device) -> torch.Tensor:
    """The default edges, copied to each device once (read-only by convention)."""
    edges = _edges_by_device.get(device)
    if edges is None:
        edges = _edges_by_device[device] = tensorflow_edges(device)
    return edges


def _histogram_host(x, kind, payload, range_) -> Histogram:
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"x: complex tensors are not supported (got {x.dtype})")
        x = x.detach()
        if x.dtype == torch.bfloat16 or "float8" in str(x.dtype):
            x = x.float()
        x = x.resolve_conj().resolve_neg().numpy()  # sync-ok: a CPU tensor, no device
    if x.dtype.kind not in "biuf":
        raise TypeError(f"x: expected real numeric values, got dtype {x.dtype}")
    counts, edges, stats = host.histogram(x, payload, range_)
    return Histogram(
        torch.from_numpy(counts), torch.from_numpy(np.array(edges)), torch.from_numpy(stats)
    )
