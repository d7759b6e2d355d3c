"""Multi-tensor statistics for non-CUDA tensors: a few torch ops per dtype group, not per tensor.

The tensors of one widened dtype (fp32 for fp32/fp16/bf16/fp8, fp64 for fp64/ints/bool) are
copied once, by one ``torch.cat``, into a ``(rows, P)`` matrix: each tensor starts on a row of
its own and its last row is padded with NaN (the pads are counted as NaN and subtracted, so they
never reach a moment). Every statistic is then a dense row reduction, and the rows are folded
per tensor with ``index_add_``/``scatter_reduce_``. The four counts (NaN, +Inf, -Inf, zeros) are
bool flags summed eight to an int64 word (a byte per flag, 32 words at a time, so no byte
carries) because torch sums bools slowly. Inputs over ``_CAP`` elements go in chunks, so the
extra memory stays bounded. No host sync: the plan (row layout, pad counts) is built from
dtypes and sizes only and cached.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tbprobe.kernels.reference import stats_row

_P_MAX = 2048  # widest row
_P_MIN = 32  # narrowest row (four int64 words of flags)
_WORDS = 32  # flag words summed at once: each byte lane reaches at most 32 < 256
_CAP = 1 << 20  # elements per chunk: ~25 MiB of temporaries; 2^19..2^21 measured fastest
_CAT_PROMOTES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_MAX_PLANS = 32
_ONE_SMALL = 8192  # a lone tensor up to this size takes the per-tensor oracle (fewer ops)


@dataclass(frozen=True)
class _Chunk:
    """One ``(rows, P)`` matrix: ``parts`` are (member, start, length, pad) in row order."""

    parts: tuple[tuple[int, int, int, int], ...]
    whole: bool  # a single part covering one whole tensor with no pad: viewed, not copied


@dataclass(frozen=True)
class _Group:
    """The tensors of one widened dtype and their device-side constants."""

    wide: torch.dtype
    members: tuple[int, ...]  # input positions
    p: int
    chunks: tuple[_Chunk, ...]
    row_ids: torch.Tensor  # int64 (rows,): the member each row belongs to
    numel: torch.Tensor  # float64 (members,)
    pads: torch.Tensor  # float64 (members,)
    pad_src: torch.Tensor  # (P,) NaN in ``wide``
    index: torch.Tensor  # int64 (members,): output rows


_plans: OrderedDict[tuple, tuple[_Group, ...]] = OrderedDict()


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.is_floating_point and dtype != torch.float64 else torch.float64


def _row_width(sizes: list[int]) -> int:
    """The widest power-of-two row (32..2048) whose padding stays within a quarter of the
    narrowest row's padded total."""

    def padded(p):
        return sum(max(1, -(-n // p)) * p for n in sizes)

    budget = padded(_P_MIN) * 5 // 4
    p = _P_MAX
    while p > _P_MIN and padded(p) > budget:
        p //= 2
    return p


def _build_group(wide, members, sizes, device) -> _Group:
    p = _row_width(sizes)
    cap_rows = max(1, _CAP // p)
    chunks, parts, rows_in, row_ids, pads = [], [], 0, [], []
    for k, n in enumerate(sizes):
        rows = max(1, -(-n // p))
        pads.append(rows * p - n)
        row_ids += [k] * rows
        for first in range(0, rows, cap_rows):
            r = min(cap_rows, rows - first)
            start = first * p
            length = max(0, min(r * p, n - start))
            if parts and rows_in + r > cap_rows:
                chunks.append(parts)
                parts, rows_in = [], 0
            parts.append((k, start, length, r * p - length))
            rows_in += r
    chunks.append(parts)
    as_chunks = tuple(
        _Chunk(tuple(c), len(c) == 1 and c[0][1] == 0 and c[0][2] == sizes[c[0][0]] and not c[0][3])
        for c in chunks
    )

    def const(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device)

    return _Group(
        wide=wide,
        members=tuple(members),
        p=p,
        chunks=as_chunks,
        row_ids=const(row_ids, torch.int64),
        numel=const(sizes, torch.float64),
        pads=const(pads, torch.float64),
        pad_src=torch.full((p,), math.nan, dtype=wide, device=device),
        index=const(members, torch.int64),
    )


def _plan(tensors: list[torch.Tensor]) -> tuple[_Group, ...]:
    """Validate the list and return its cached plan (built from dtypes and sizes only)."""
    if not tensors:
        raise ValueError("tensors: expected at least one tensor")
    device = None
    key = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"tensors[{i}]: complex tensors are not supported (got {t.dtype})")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"tensors[{i}]: on {t.device}, the others are on {device}")
        key.append((t.dtype, t.numel()))
    full_key = (device, tuple(key))
    groups = _plans.get(full_key)
    if groups is not None:
        _plans.move_to_end(full_key)
        return groups
    by_wide: dict[torch.dtype, list[int]] = {}
    for i, (dtype, _) in enumerate(key):
        by_wide.setdefault(_wide(dtype), []).append(i)
    groups = tuple(
        _build_group(w, idx, [key[i][1] for i in idx], device) for w, idx in by_wide.items()
    )
    _plans[full_key] = groups
    if len(_plans) > _MAX_PLANS:
        _plans.popitem(last=False)
    return groups


def _row_stats(b: torch.Tensor) -> torch.Tensor:
    """float64 ``(rows, 8)``: sum, sum_sq, nan, pos_inf, neg_inf, zeros, min, max of each row
    of ``b`` (``(rows, P)``, fp32 or fp64), moments over finite elements."""
    rows, p = b.shape
    flags = torch.empty(4, rows, p, dtype=torch.bool, device=b.device)
    torch.ne(b, b, out=flags[0])
    torch.eq(b, math.inf, out=flags[1])
    torch.eq(b, -math.inf, out=flags[2])
    torch.eq(b, 0, out=flags[3])
    # Eight flags per int64 word: up to 255 words add up without a carry between the bytes.
    group = min(_WORDS, p // 8)
    words = flags.view(torch.uint8).view(torch.int64).view(4, rows, -1, group).sum(-1)
    counts = words.view(torch.uint8).view(4, rows, -1).sum(-1).t().double()  # (rows, 4)
    del flags, words
    x64 = torch.nan_to_num(b, 0.0, 0.0, 0.0).double()  # finite values, the rest 0
    s = x64.sum(1)
    ss = torch.linalg.vector_norm(x64, dim=1).square()  # one fp64 pass, relative error ~1e-16
    del x64
    mn = torch.nan_to_num(b, math.inf, math.inf, math.inf).amin(1)
    mx = torch.nan_to_num(b, -math.inf, -math.inf, -math.inf).amax(1)
    return torch.cat([torch.stack([s, ss], 1), counts, torch.stack([mn, mx], 1).double()], 1)


def _group_rows(g: _Group, flat: list[torch.Tensor]) -> torch.Tensor:
    """float64 ``(len(g.members), 10)`` STAT_NAMES rows of one group."""
    tables = []
    for chunk in g.chunks:
        if chunk.whole:
            b = flat[chunk.parts[0][0]]
        else:
            pieces = []
            for k, start, length, pad in chunk.parts:
                if length:
                    x = flat[k]
                    pieces.append(x if length == x.numel() else x.narrow(0, start, length))
                if pad:
                    pieces.append(g.pad_src[:pad])
            b = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if b.dtype != g.wide:
            b = b.to(g.wide)
        tables.append(_row_stats(b.view(-1, g.p)))
    table = torch.cat(tables) if len(tables) > 1 else tables[0]  # (rows, 8)
    n = len(g.members)
    sums = table.new_zeros(n, 6).index_add_(0, g.row_ids, table[:, :6])
    inf = torch.full((n,), math.inf, dtype=torch.float64, device=table.device)
    mn = inf.scatter_reduce(0, g.row_ids, table[:, 6], "amin")
    mx = (-inf).scatter_reduce(0, g.row_ids, table[:, 7], "amax")
    s, ss, nan, pinf, ninf, zeros = sums.unbind(1)
    nan = nan - g.pads
    count = g.numel - nan - pinf - ninf
    abs_max = torch.maximum(mx, -mn).clamp_min(0.0) + 0.0  # 0 (not -inf) with no finite value
    return torch.stack([count, s, ss, mn, mx, abs_max, nan, pinf, ninf, zeros], 1)


def tensor_stats(tensors) -> torch.Tensor:
    """float64 ``(len(tensors), len(STAT_NAMES))`` statistics on the tensors' device, computed
    with a few ops per dtype group (at most two groups: fp32-wide and fp64-wide).

    Same contract as :func:`tbprobe.kernels.reference.tensor_stats` (the per-tensor oracle):
    moments over finite elements, NaN/±Inf counted, rows in input order. No host sync.

    Example::

        rows = tensor_stats([torch.randn(3, 4), torch.arange(5)])  # (2, 10), float64
    """
    tensors = list(tensors)
    groups = _plan(tensors)
    if len(tensors) == 1 and tensors[0].numel() <= _ONE_SMALL:
        return stats_row(tensors[0]).unsqueeze(0)
    flat = []
    for t in tensors:
        x = t.detach().reshape(-1)
        if x.dtype.is_floating_point and x.dtype not in _CAT_PROMOTES:
            x = x.float()  # fp8: torch.cat does not promote it
        flat.append(x)
    if len(groups) == 1:
        g = groups[0]
        return _group_rows(g, flat)
    out = torch.empty(len(tensors), 10, dtype=torch.float64, device=tensors[0].device)
    for g in groups:
        out.index_copy_(0, g.index, _group_rows(g, [flat[i] for i in g.members]))
    return out
