"""Statistics and non-finite counts of CPU tensors: a cheap finiteness test, then exact work
where it is needed.

Host code for host tensors only (CUDA tensors take the stats kernel): reading a CPU tensor's
value here is not a device sync, so the common case, where every value is finite, costs one
summing pass (about a tenth of an exact count) and a look at the sums. A sum is non-finite
when a NaN or ±Inf is summed, or when finite values overflow; either way the tensor is then
counted exactly, so the result never depends on the shortcut.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SMALL_TOTAL = 1 << 18  # elements: below this, many tensors of one dtype share one flat pass
FEW = 4  # tensors: up to this many, summed one by one


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # no fp16 overflow


def _exact(t: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(t - t)  # x - x: 0 for finite x, NaN for NaN and ±Inf


def nonfinite_counts(tensors: list[torch.Tensor]) -> torch.Tensor:
    """float64 ``(len(tensors),)`` exact counts of NaN and ±Inf elements of CPU tensors.

    Example::

        nonfinite_counts([torch.tensor([1.0, float("nan")]), torch.ones(3)])  # [1., 0.]
    """
    tensors = [t.half() if t.element_size() == 1 else t for t in tensors]  # fp8: no sub/sum
    first = tensors[0]
    sizes = [t.numel() for t in tensors]
    if (
        len(tensors) > FEW
        and sum(sizes) <= SMALL_TOTAL
        and all(t.dtype == first.dtype for t in tensors)
    ):
        flat = torch._C._nn.flatten_dense_tensors(tensors)
        if np.isfinite(flat.sum(dtype=_acc(flat.dtype)).numpy()):  # sync-ok: CPU tensor
            return torch.zeros(len(tensors), dtype=torch.float64)
        ones = torch.nan_to_num(flat - flat, nan=1.0).float()  # 1 per non-finite element
        counts = torch.segment_reduce(ones, "sum", lengths=torch.tensor(sizes), unsafe=True)
        return counts.double()  # exact: at most SMALL_TOTAL < 2**24 per count
    else:
        sums = torch.stack([t.sum(dtype=_acc(t.dtype)).double() for t in tensors])
        sums = sums.numpy()  # sync-ok: CPU tensor, host code
    out = np.zeros(len(tensors))
    for i in np.flatnonzero(~np.isfinite(sums)):
        out[i] = float(_exact(tensors[i]))  # sync-ok: CPU tensor
    return torch.from_numpy(out)


BIG = 1 << 15  # elements: from here a float tensor takes the per-tensor finite path
_FAST = (torch.float32, torch.float16, torch.bfloat16)


def tensor_stats(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``kernels.tensor_stats`` of CPU tensors: float64 ``(len(tensors), 10)`` rows.

    Large fp32/fp16/bf16 tensors whose fp32 sum is finite (so every element is) take a short
    path: their sum (fp64) and sum of squares (within 4.8e-7 relative, see ``host_sums``)
    from numpy, min/max from one ``aminmax``, zeros from numpy's ``count_nonzero``: about a
    quarter of the batched path's time. The rest (small, integer, fp64 tensors, and any
    with a NaN or ±Inf) take ``reference_many``'s batched exact path.
    """
    from tbprobe.kernels import host_sums, reference_many

    big = [
        i
        for i, t in enumerate(tensors)
        if isinstance(t, torch.Tensor)
        and t.device.type == "cpu"
        and t.dtype in _FAST
        and t.numel() >= BIG
    ]
    if not big:
        return reference_many.tensor_stats(tensors)
    flat = [tensors[i].detach().reshape(-1) for i in big]
    flat = [x if x.dtype == torch.float32 else x.float() for x in flat]
    sums = torch.stack([x.sum() for x in flat]).numpy()  # sync-ok: CPU tensors, host code
    fast = [k for k in range(len(big)) if np.isfinite(sums[k])]
    taken = {big[k] for k in fast}
    rest = [i for i in range(len(tensors)) if i not in taken]
    out = torch.empty(len(tensors), 10, dtype=torch.float64)
    for k in fast:
        x = flat[k]
        lo, hi = (float(v) for v in torch.aminmax(x))  # sync-ok: CPU tensor
        f = x.numpy()  # sync-ok: a CPU tensor's memory, no copy
        zeros = len(f) - int(np.count_nonzero(f))  # ~4x faster than torch's on ReLU outputs
        st = host_sums.Stats()
        st.add_finite(f, lo, hi, np.empty(len(f) // 8 + 1, np.float32))
        st.n, st.zeros = x.numel(), zeros
        out[big[k]] = torch.from_numpy(host_sums.combine([st]))
    if rest:
        rows = reference_many.tensor_stats([tensors[i] for i in rest])
        out[rest] = rows
    return out


_LEAN = (*_FAST, torch.float64)  # float dtypes the lean rows take (others: full rows)
ROW = 4096  # elements per partial sum of squares (one row of a 2-D view)
ONE_DOT = 1 << 16  # elements: up to this, one BLAS dot


def _sum_sq(x: torch.Tensor) -> float:
    """Sum of squares of a 1-D contiguous float32/float64 CPU tensor.

    Up to ``ONE_DOT`` elements, one BLAS dot. Above, the norms of ``ROW``-element rows of a
    2-D view (one multithreaded reduction, about the time of a dot), squared and added in
    float64: a long dot's error depends on the BLAS and the CPU (MKL's ``sdot`` on an AMD
    EPYC: 2.7e-6 relative at 2**20 Gaussian values, 9e-5 at 1e7), the rows' stays near
    float32's rounding (measured within 1e-7 at 2**24 elements)."""
    n = x.numel()
    if n <= ONE_DOT:
        sq = float(torch.dot(x, x))  # sync-ok: CPU tensor, host code
    else:
        m = n - n % ROW
        rows = torch.linalg.vector_norm(x[:m].view(-1, ROW), dim=1)
        sq = float(torch.linalg.vector_norm(rows, dtype=torch.float64)) ** 2  # sync-ok: CPU
        if m < n:
            tail = x[m:]
            sq += float(torch.dot(tail, tail))  # sync-ok: CPU tensor, host code
    if x.dtype == torch.float32 and sq < n * _TINY_MEAN_SQUARE:
        return _sum_sq64(x)  # fp32 squares of values below ~1e-19 underflow
    return sq


# Mean square below which fp32 squares may have lost a measurable share to underflow (each
# lost square is < 1.2e-38, so above it the loss is < 1.2e-8 of the sum).
_TINY_MEAN_SQUARE = 1e-30


def _sum_sq64(x: torch.Tensor) -> float:
    """Sum of squares accumulated in float64 (tiny values: no underflow)."""
    return float(torch.linalg.vector_norm(x, 2, dtype=torch.float64)) ** 2  # sync-ok: CPU


def lean_stats(tensors: list[torch.Tensor], extremes: bool = True) -> torch.Tensor:
    """The columns of ``kernels.tensor_stats`` rows that the probe reads, for CPU tensors:
    float64 ``(len(tensors), 10)`` with ``count``, ``sum_sq``, the exact NaN/±Inf counts and,
    with ``extremes``, ``min``/``max``/``abs_max``; ``sum`` and ``zeros`` (and the extremes
    without ``extremes``) are NaN: not computed.

    A finite float tensor costs one pass for its sum of squares (``_sum_sq``, which is finite only
    when every element is) plus one ``aminmax`` pass with ``extremes``: about a fifth of the
    full statistics. Without extremes, tensors under ``BIG`` elements share one
    ``_foreach_norm`` accumulated in float32 (float64 for float64 tensors; measured within
    4e-7 relative at that size). A tensor whose sum of squares is not finite (or overflows
    float32), and any integer, bool or zero-size one, gets its full exact row.

    Example::

        lean_stats([torch.tensor([3.0, -4.0])])[0]  # count 2, sum_sq 25, min -4, max 3, abs_max 4
    """
    if extremes:  # forward outputs: a dot and an aminmax each (see lean_row)
        rows = [lean_row(t) for t in tensors]
    else:
        rows: list = [None] * len(tensors)  # each filled below
        narrow_at, narrow, wide_at, wide = [], [], [], []  # small float tensors, by accumulator
        with torch.no_grad():  # one context rather than a detach per tensor
            for i, x in enumerate(tensors):
                dt = x.dtype
                if 0 < x.numel() < BIG:
                    if dt is torch.float32 or dt is torch.float16 or dt is torch.bfloat16:
                        narrow_at.append(i)
                        narrow.append(x)
                        continue
                    if dt is torch.float64:
                        wide_at.append(i)
                        wide.append(x)
                        continue
                rows[i] = lean_row(x, False)
            for acc, at, group in ((_F32, narrow_at, narrow), (_F64, wide_at, wide)):
                if group:
                    for i, row in zip(at, _small_rows(group, acc), strict=True):
                        rows[i] = row
    # Rows are built as Python lists: a step's few small tensors cost several times more in
    # numpy calls on tiny arrays than in their reductions.
    return torch.from_numpy(np.array(rows, dtype=np.float64).reshape(-1, 10))


# Many tiny tensors of one dtype (FLAT_AVG elements each on average, FLAT_MAX in all) are
# squared and summed in one float64 copy: _foreach_norm costs ~2 us a tensor here, the copy
# ~4 ns an element (measured: 2.5x faster at 128 tensors of 136 elements, 5x slower at 30
# of 2100).
FLAT_AVG, FLAT_MAX = 256, 1 << 20


def _small_rows(group: list[torch.Tensor], acc: torch.dtype) -> list[list[float]]:
    """:func:`lean_stats` rows (no extremes) of small float tensors, as lists of 10 floats.

    Many tiny tensors of one dtype (more than ``FEW``, see ``FLAT_AVG``): one flat float64
    copy, squared in place and summed per tensor (``segment_reduce``): float64 squares
    neither underflow nor overflow. Otherwise one ``_foreach_norm`` in ``acc``, and
    the fp32 sums of squares too small to trust (underflowed squares, all-zero tensors)
    redone together in float64."""
    count = [x.numel() for x in group]
    first = group[0].dtype
    flat = None
    if (
        len(group) > FEW
        and sum(count) <= min(FLAT_MAX, FLAT_AVG * len(group))
        and all(x.dtype is first for x in group)
    ):
        flat = torch._C._nn.flatten_dense_tensors(group).double()  # a new tensor: a copy
        flat.square_()
        lengths = torch.tensor(count, dtype=torch.int64)
        sq = torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True).tolist()  # sync-ok
    else:
        norms = torch.stack(torch._foreach_norm(group, 2, dtype=acc))
        sq = norms.double().square_().tolist()  # sync-ok: CPU tensor, host code
    narrow = flat is None and acc is torch.float32
    rows, tiny = [], []
    for k, s in enumerate(sq):
        if s != s or s == math.inf:  # a NaN, ±Inf or an fp32 overflow
            rows.append(_full_row(group[k].detach()))
            continue
        if narrow and s < count[k] * _TINY_MEAN_SQUARE:  # fp32 squares may have underflowed
            tiny.append(k)
        rows.append([float(count[k]), _NAN, s, _NAN, _NAN, _NAN, 0.0, 0.0, 0.0, _NAN])
    if tiny:
        wide = torch._foreach_norm([group[k] for k in tiny], 2, dtype=torch.float64)
        for k, s in zip(tiny, torch.stack(wide).square_().tolist(), strict=True):  # sync-ok
            rows[k][2] = s
    return rows


_NAN = float("nan")
_WIDE = (torch.float32, torch.float64)
_DOT_MAX = 1 << 30  # elements: one BLAS call stays within 32-bit sizes


def lean_row(t: torch.Tensor, extremes: bool = True) -> list[float]:
    """:func:`lean_stats` of one CPU tensor, as a list of 10 floats, computed at once: the
    probe reduces a CPU tensor in its hook, so the tensor is not kept alive for a batch (on
    the CPU a batch saves no launch, and memory held longer costs fresh pages every step).

    Example::

        lean_row(torch.tensor([3.0, -4.0]))  # [2.0, nan, 25.0, -4.0, 3.0, 4.0, 0.0, 0.0, 0.0, nan]
    """
    x = t.detach()
    n = x.numel()
    if x.dtype not in _WIDE:
        if x.dtype not in _LEAN or not n:
            return _full_row(x)
        x = x.float()
    elif not n:
        return _full_row(x)
    x = x.reshape(-1)
    sq = _sum_sq(x)
    if sq != sq or sq == math.inf:  # a NaN or ±Inf (or an overflow): the exact row
        return _full_row(t.detach())
    if not extremes:
        return [float(n), _NAN, sq, _NAN, _NAN, _NAN, 0.0, 0.0, 0.0, _NAN]
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)  # sync-ok: CPU tensors, host code
    return [float(n), _NAN, sq, lo, hi, max(-lo, hi), 0.0, 0.0, 0.0, _NAN]


def _full_row(x: torch.Tensor) -> list[float]:
    from tbprobe.kernels import reference_many

    return reference_many.tensor_stats([x])[0].tolist()  # sync-ok: CPU tensor, host code


def any_nonfinite(rows: torch.Tensor) -> bool:
    """Whether host stats rows ``(n, 10)`` (e.g. :func:`lean_stats`') count a NaN or ±Inf."""
    return bool(rows.numpy()[:, 6:9].any())  # sync-ok: a CPU tensor, host code


_ONE_SUM = 1 << 16  # elements: up to this a plain sum (fewer calls than a dot's view)
_F32, _F64 = torch.float32, torch.float64


def nonfinite_count(t: torch.Tensor) -> float:
    """The number of NaN and ±Inf elements of one CPU tensor, computed at once: one reducing
    pass (a finite result: none), counted exactly only where the result is not finite. The
    pass is a sum up to ``_ONE_SUM`` elements (the fewest calls: this runs in every hook of
    every checked step), above it a BLAS dot for contiguous fp32/fp64 tensors (about 15%
    faster than ``sum`` on a freshly written activation here; an overflow only costs the
    exact count)."""
    x = t.detach() if t.requires_grad else t
    dt = x.dtype
    if dt is _F32 or dt is _F64:
        n = x.numel()
        if _ONE_SUM < n <= _DOT_MAX and x.is_contiguous():
            v = x.view(-1)
            s = torch.dot(v, v).item()  # sync-ok: CPU tensor, host code
        else:
            s = torch.sum(x).item()  # sync-ok: CPU tensor, host code
    elif not x.is_floating_point():
        return 0.0
    else:
        if x.element_size() == 1:
            x = x.half()  # fp8: no sum
        s = torch.sum(x, dtype=_acc(x.dtype)).item()  # sync-ok: CPU tensor, host code
    if s == s and s != math.inf and s != -math.inf:
        return 0.0
    return float(_exact(x))  # sync-ok: CPU tensor
