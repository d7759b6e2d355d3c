"""Triton ``tensor_stats``: every tensor of a list read once, one launch per dtype.

Design. The tensors are grouped by kernel variant (their dtype; bool and uint8 share one) and
cut on the host, from ``numel`` alone (no sync), into chunks of ``BLOCK * CHUNK_BLOCKS``
elements (a tensor's last chunk may be shorter). One int64 metadata table describes the call:

- per chunk ``(address, start, end)``: the tensor's base address and the element range;
- per output row ``(lo, hi)``: the range of chunks that belong to that input tensor.

``_stats_chunks_kernel`` runs one program per chunk, one launch per group; it casts the
address to a typed pointer and writes one partial row per chunk. ``_stats_finish_kernel``
(one launch for the whole call, every dtype) folds each tensor's partial rows in a fixed order:
no float atomics anywhere, so results are bitwise deterministic. (torch's ``index_add_`` would
use float atomics on CUDA, so it is not used for the fold.) A call is ``groups + 1`` launches.

On CUDA the table is built in pinned memory, copied ``non_blocking`` and cached by the
tensors' (dtype, address, numel) and the stream, since parameters and gradients keep their
addresses from step to step; a cache hit launches with no host-to-device copy at all.
Transposed/permuted tensors are read in place (statistics ignore order); views with gaps or
repeats are copied once with ``.contiguous()``."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from tbprobe.kernels.reference import STAT_NAMES

__all__ = ["tensor_stats"]

_N_STATS = len(STAT_NAMES)
_BLOCK = 2048  # elements per loop step of a program
_CHUNK_BLOCKS = 16  # loop steps per chunk: a program reads at most BLOCK * CHUNK_BLOCKS elements
_FINISH_BLOCK = 128  # partial rows per loop step of the fold
_CACHE_SIZE = 64

# torch dtype -> (element type the kernel loads, accumulate in fp64). Narrow types widen to
# fp32 exactly; int32/int64/uint32/uint64 beyond 2^24 would round in fp32 (min/max would no
# longer be elements of the input), so they and fp64 take the fp64 path. fp64 keeps int64 as
# ``x.double()`` does: rounding is monotonic, so min/max equal the reference's.
_ELEMENT = {
    torch.float32: (tl.float32, False),
    torch.float16: (tl.float16, False),
    torch.bfloat16: (tl.uint16, False),  # loaded as bits, decoded in the kernel (DECODE)
    torch.float8_e4m3fn: (tl.uint8, False),
    torch.float8_e5m2: (tl.uint8, False),
    torch.int8: (tl.int8, False),
    torch.int16: (tl.int16, False),
    torch.uint8: (tl.uint8, False),
    torch.bool: (tl.uint8, False),  # one byte holding 0 or 1
    torch.uint16: (tl.uint16, False),
    torch.float64: (tl.float64, True),
    torch.int32: (tl.int32, True),
    torch.int64: (tl.int64, True),
    torch.uint32: (tl.uint32, True),
    torch.uint64: (tl.uint64, True),
}
_DECODE = {torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}  # else 0: a cast


@triton.jit
def _decode(b_raw, ACC: tl.constexpr, DECODE: tl.constexpr):
    """``x`` in ``ACC`` from the loaded block: a plain cast, or bf16/fp8 decoded from their bits
    exactly (the interpreter flushes bf16 subnormals and has no fp8 NaN/Inf; sm < 89 has no
    e4m3 conversion; these integer forms are right everywhere)."""
    if DECODE == 1:  # bf16 is the high half of an fp32
        b_x = (b_raw.to(tl.uint32) << 16).to(tl.uint32).to(tl.float32, bitcast=True).to(ACC)
    elif DECODE == 2:  # e4m3fn: |x| / 256 has the fp16 bits (b & 0x7F) << 7; S.1111.111 is NaN
        b_h = ((b_raw & 0x7F).to(tl.int16) << 7).to(tl.int16).to(tl.float16, bitcast=True)
        b_x = b_h.to(ACC) * 256.0
        b_x = tl.where(b_raw >= 0x80, -b_x, b_x)
        b_x = tl.where((b_raw & 0x7F) == 0x7F, float("nan"), b_x)
    elif DECODE == 3:  # e5m2 is the high byte of an fp16
        b_x = (b_raw.to(tl.int16) << 8).to(tl.int16).to(tl.float16, bitcast=True).to(ACC)
    else:
        b_x = b_raw.to(ACC)
    return b_x


@triton.jit
def _accumulate(b_raw, m_x, s_sum, s_sq, b_min, b_max, n_special, n_zero, ACC, DECODE):
    """One block ``x`` (lanes ``m_x``) into the running state: ``s_sum += sum x``, ``s_sq +=
    sum x^2`` over finite x (a tree in ACC, added in fp64), lane-wise min/max, packed counts."""
    b_x = _decode(b_raw, ACC, DECODE)
    m_fin = m_x & (tl.abs(b_x) < float("inf"))  # False for NaN and ±Inf
    b_f = tl.where(m_fin, b_x, 0.0)
    b_s = tl.sum(b_f, axis=0).to(tl.float64)
    b_q = tl.sum(b_f * b_f, axis=0).to(tl.float64)
    # The outer `if` is resolved at compile time (ACC is a constexpr), the inner at run time.
    if ACC == tl.float32:  # noqa: SIM102, SIM300 - see above; ACC is a parameter, not a constant
        # fp32 squares overflow above |x| ~ 2^58 and lose precision below ~ 2^-40 (fp64 does
        # neither): then, and for all-zero blocks, the block is summed again in fp64.
        if (b_q < 2.0**-80) | (b_q > 2.0**126):
            b_d = b_f.to(tl.float64)
            b_s = tl.sum(b_d, axis=0)
            b_q = tl.sum(b_d * b_d, axis=0)
    s_sum += b_s
    s_sq += b_q
    b_min = tl.minimum(b_min, tl.where(m_fin, b_x, float("inf")))
    b_max = tl.maximum(b_max, tl.where(m_fin, b_x, float("-inf")))
    n_special += (m_x & (b_x != b_x)).to(tl.int32)
    n_special += (m_x & (b_x == float("inf"))).to(tl.int32) << 10
    n_special += (m_x & (b_x == float("-inf"))).to(tl.int32) << 20
    n_zero += (m_x & (b_x == 0)).to(tl.int32)
    return s_sum, s_sq, b_min, b_max, n_special, n_zero


@triton.jit
def _chunk_exact(p_x, start, end, ACC: tl.constexpr, DECODE: tl.constexpr, BLOCK: tl.constexpr):
    """Every statistic of ``x = t[start:end]`` block by block, with NaN/±Inf masked out of the
    moments and the fp32 -> fp64 fallback of ``_accumulate``: right for any input."""
    s_sum = tl.zeros((), tl.float64)
    s_sq = tl.zeros((), tl.float64)
    b_min = tl.full((BLOCK,), float("inf"), ACC)
    b_max = tl.full((BLOCK,), float("-inf"), ACC)
    # Per lane, #nan + #+inf << 10 + #-inf << 20: each count is below CHUNK_BLOCKS < 1024.
    n_special = tl.zeros((BLOCK,), tl.int32)
    n_zero = tl.zeros((BLOCK,), tl.int32)
    o_b = tl.arange(0, BLOCK)
    m_all = o_b < BLOCK  # all true: full blocks load unmasked, so they can be vectorised
    n_full = ((end - start) // BLOCK).to(tl.int32)
    for i in range(0, n_full):
        b_raw = tl.load(p_x + (start + i * BLOCK + o_b))
        s_sum, s_sq, b_min, b_max, n_special, n_zero = _accumulate(
            b_raw, m_all, s_sum, s_sq, b_min, b_max, n_special, n_zero, ACC, DECODE
        )
    if start + n_full * BLOCK < end:  # the tail block
        o_x = start + n_full * BLOCK + o_b
        m_x = o_x < end
        # No `other=`: masked lanes are excluded from every statistic through m_x instead.
        b_raw = tl.load(p_x + o_x, mask=m_x)
        s_sum, s_sq, b_min, b_max, n_special, n_zero = _accumulate(
            b_raw, m_x, s_sum, s_sq, b_min, b_max, n_special, n_zero, ACC, DECODE
        )
    n_nan = tl.sum(n_special & 1023, axis=0)
    n_pinf = tl.sum((n_special >> 10) & 1023, axis=0)
    n_ninf = tl.sum(n_special >> 20, axis=0)
    c_min = tl.min(b_min, axis=0).to(tl.float64)
    c_max = tl.max(b_max, axis=0).to(tl.float64)
    return s_sum, s_sq, c_min, c_max, n_nan, n_pinf, n_ninf, tl.sum(n_zero, axis=0)


@triton.jit
def _chunk_fast(p_x, start, end, DECODE: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Sums, min, max and #zeros of ``x = t[start:end]`` assuming every element finite and
    ``2^-50 <= |x| <= 2^60`` or 0: per-lane fp32 sums over ``UNROLL`` blocks (loads in flight
    together), added into per-lane fp64 sums; no per-element masks. ``ok`` is 0 when the
    assumption fails (a NaN/Inf reaches the sums, or the extremes fall outside the range);
    the caller then redoes the chunk with ``_chunk_exact``. Error of a sum: below ``UNROLL *
    2^-24`` of the sum of magnitudes, as the fp32 terms are exact products of narrow inputs."""
    d_s = tl.zeros((BLOCK,), tl.float64)
    d_q = tl.zeros((BLOCK,), tl.float64)
    b_min = tl.full((BLOCK,), float("inf"), tl.float32)
    b_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    n_zero = tl.zeros((BLOCK,), tl.int32)
    o_b = tl.arange(0, BLOCK)
    n_groups = ((end - start) // (BLOCK * UNROLL)).to(tl.int32)
    for i in range(0, n_groups):
        f_s = tl.zeros((BLOCK,), tl.float32)
        f_q = tl.zeros((BLOCK,), tl.float32)
        for u in tl.static_range(UNROLL):
            b_raw = tl.load(p_x + (start + (i * UNROLL + u) * BLOCK + o_b))
            b_x = _decode(b_raw, tl.float32, DECODE)
            f_s += b_x
            f_q += b_x * b_x
            b_min = tl.minimum(b_min, b_x)
            b_max = tl.maximum(b_max, b_x)
            n_zero += (b_x == 0).to(tl.int32)
        d_s += f_s.to(tl.float64)
        d_q += f_q.to(tl.float64)
    n_blocks = tl.cdiv(end - start, BLOCK).to(tl.int32)
    for k in range(n_groups * UNROLL, n_blocks):  # the last blocks, the tail masked
        o_x = start + k * BLOCK + o_b  # int64: start is
        m_x = o_x < end
        b_x = tl.where(m_x, _decode(tl.load(p_x + o_x, mask=m_x, other=0), tl.float32, DECODE), 0)
        d_s += b_x.to(tl.float64)
        d_q += (b_x * b_x).to(tl.float64)
        b_min = tl.minimum(b_min, tl.where(m_x, b_x, float("inf")))
        b_max = tl.maximum(b_max, tl.where(m_x, b_x, float("-inf")))
        n_zero += (m_x & (b_x == 0)).to(tl.int32)
    s_sum = tl.sum(d_s, axis=0)
    s_sq = tl.sum(d_q, axis=0)
    c_min = tl.min(b_min, axis=0).to(tl.float64)
    c_max = tl.max(b_max, axis=0).to(tl.float64)
    amax = tl.maximum(c_max, -c_min)
    ok = (tl.abs(s_sum) < float("inf")) & (s_sq < float("inf"))  # False for NaN too
    ok = ok & (amax <= 2.0**60) & ((amax == 0) | (amax >= 2.0**-50))
    return ok.to(tl.int32), s_sum, s_sq, c_min, c_max, tl.sum(n_zero, axis=0)


@triton.jit
def _stats_chunks_kernel(
    p_chunks,
    p_partials,
    ELEM: tl.constexpr,
    ACC: tl.constexpr,
    DECODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr = 4,
):
    """Partial row of chunk ``c = (address, start, end)``: over finite ``x = t[start:end]``,
    ``count, sum x, sum x^2, min x, max x, max |x| = max(max x, -min x, 0)``, then ``#nan,
    #+inf, #-inf, #zeros`` over all of it. fp32 inputs (``ACC`` fp32) take ``_chunk_fast``
    and fall back to ``_chunk_exact`` when it reports a non-finite or extreme value; fp64
    ``ACC`` always takes ``_chunk_exact``. ``ALIGNED``: 16-byte aligned addresses (vector loads).
    """
    i_c = tl.program_id(0).to(tl.int64)
    address = tl.load(p_chunks + 3 * i_c)
    start = tl.load(p_chunks + 3 * i_c + 1)  # int64: tensors over 2^31 elements
    end = tl.load(p_chunks + 3 * i_c + 2)
    start = tl.multiple_of(start, BLOCK)  # chunks are whole multiples of BLOCK
    p_x = address.to(tl.pointer_type(ELEM))
    if ALIGNED:
        p_x = tl.multiple_of(p_x, 16)
    if ACC == tl.float32:  # noqa: SIM300 - ACC is a constexpr parameter
        ok, s_sum, s_sq, c_min, c_max, n_zero = _chunk_fast(p_x, start, end, DECODE, BLOCK, UNROLL)
        n_nan = n_zero * 0
        n_pinf = n_zero * 0
        n_ninf = n_zero * 0
        if ok == 0:  # rare: NaN/Inf or extreme magnitudes in this chunk
            s_sum, s_sq, c_min, c_max, n_nan, n_pinf, n_ninf, n_zero = _chunk_exact(
                p_x, start, end, ACC, DECODE, BLOCK
            )
    else:
        s_sum, s_sq, c_min, c_max, n_nan, n_pinf, n_ninf, n_zero = _chunk_exact(
            p_x, start, end, ACC, DECODE, BLOCK
        )
    p_row = p_partials + 10 * i_c
    tl.store(p_row + 0, ((end - start) - n_nan - n_pinf - n_ninf).to(tl.float64))
    tl.store(p_row + 1, s_sum)
    tl.store(p_row + 2, s_sq)
    tl.store(p_row + 3, c_min)
    tl.store(p_row + 4, c_max)
    tl.store(p_row + 5, tl.maximum(tl.maximum(c_max, -c_min), 0.0))
    tl.store(p_row + 6, n_nan.to(tl.float64))
    tl.store(p_row + 7, n_pinf.to(tl.float64))
    tl.store(p_row + 8, n_ninf.to(tl.float64))
    tl.store(p_row + 9, n_zero.to(tl.float64))


@triton.jit
def _stats_finish_kernel(p_rows, p_partials, p_out, BLOCK_C: tl.constexpr):
    """Row ``r`` of the result from partial rows ``lo..hi`` of ``rows[r] = (lo, hi)``: fp64
    sums of columns 0-2 and 6-9, min of column 3, max of columns 4-5, each a tree over
    ``BLOCK_C`` rows in a fixed order. No rows gives the identities (0, +inf, -inf, 0).
    """
    i_r = tl.program_id(0).to(tl.int64)
    lo = tl.load(p_rows + 2 * i_r)
    hi = tl.load(p_rows + 2 * i_r + 1)
    o_k = tl.arange(0, 16)  # the 10 columns, padded to a power of two
    m_k = o_k < 10
    b_sum = tl.zeros((16,), tl.float64)
    b_min = tl.full((16,), float("inf"), tl.float64)
    b_max = tl.where(o_k == 5, 0.0, float("-inf")).to(tl.float64)  # abs_max of nothing is 0
    for i in range(0, tl.cdiv((hi - lo).to(tl.int32), BLOCK_C)):
        o_c = lo + i * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (o_c < hi)[:, None] & m_k[None, :]
        b_p = tl.load(p_partials + o_c[:, None] * 10 + o_k[None, :], mask=m, other=0.0)
        b_sum += tl.sum(b_p, axis=0)
        b_min = tl.minimum(b_min, tl.min(tl.where(m, b_p, float("inf")), axis=0))
        b_max = tl.maximum(b_max, tl.max(tl.where(m, b_p, float("-inf")), axis=0))
    b_out = tl.where(o_k == 3, b_min, tl.where((o_k == 4) | (o_k == 5), b_max, b_sum))
    tl.store(p_out + 10 * i_r + o_k, b_out, mask=m_k)


class _Plan(NamedTuple):
    table: torch.Tensor  # int64 (3 * n_chunks + 2 * n_rows,) on the device
    groups: tuple  # (ELEM, ACC, DECODE, ALIGNED, first chunk, chunk count) per launch
    n_chunks: int


_plans: OrderedDict = OrderedDict()
_plans_lock = threading.Lock()  # hooks may run on several threads (FSDP's streams)


def _new_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Output/partial buffers; every element is written by a kernel (tests poison it)."""
    return torch.empty(shape, dtype=torch.float64, device=device)


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr`` in some
    order (contiguous, transposed, permuted): statistics ignore order, so no copy is needed."""
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _source(t, i: int) -> torch.Tensor:
    """The tensor to read for ``tensors[i]``: itself, or a copy when it must be one."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"tensors[{i}]: complex tensors are not supported (got {t.dtype})")
    t = t.detach().resolve_neg()  # resolve_neg copies only a lazily negated view
    if t.dtype not in _ELEMENT:  # rare real dtypes (fp8 fnuz, e8m0): one widening copy
        t = t.to(torch.float64)
    if t.numel() and not _is_dense(t):
        t = t.contiguous()  # copy: views with gaps (x[::2]) or repeats (expand)
    return t


def _variant(dtype: torch.dtype) -> tuple:
    """The kernel's constexprs ``(ELEM, ACC, DECODE)`` for ``dtype``: dtypes that share them
    (bool and uint8) share a launch."""
    elem, wide = _ELEMENT[dtype]
    return elem, tl.float64 if wide else tl.float32, _DECODE.get(dtype, 0)


def _build_table(sources: list[torch.Tensor], chunk: int):
    """Host int64 table and launch groups, from shapes and addresses only (no sync)."""
    order: dict[tuple, list[int]] = {}
    for r, t in enumerate(sources):
        order.setdefault(_variant(t.dtype), []).append(r)
    rows = [r for members in order.values() for r in members]  # grouped by kernel variant
    numel = np.array([sources[r].numel() for r in rows], dtype=np.int64)
    address = np.array([sources[r].data_ptr() for r in rows], dtype=np.int64)
    n_chunks = -(-numel // chunk)  # 0 for zero-size tensors
    first = np.concatenate(([0], np.cumsum(n_chunks)))
    total = int(first[-1])
    owner = np.repeat(np.arange(len(rows)), n_chunks)  # chunk -> position in `rows`
    start = (np.arange(total, dtype=np.int64) - first[owner]) * chunk
    chunks = np.stack([address[owner], start, np.minimum(start + chunk, numel[owner])], axis=1)
    row_ranges = np.empty((len(rows), 2), dtype=np.int64)
    row_ranges[rows, 0] = first[:-1]
    row_ranges[rows, 1] = first[1:]
    groups, pos = [], 0
    for variant, members in order.items():
        lo, hi = int(first[pos]), int(first[pos + len(members)])
        read = slice(pos, pos + len(members))
        aligned = bool(np.all((address[read] % 16 == 0) | (numel[read] == 0)))
        pos += len(members)
        if hi > lo:
            groups.append((*variant, aligned, lo, hi - lo))
    return np.concatenate((chunks.reshape(-1), row_ranges.reshape(-1))), tuple(groups), total


def _plan(sources: list[torch.Tensor], device: torch.device, chunk: int) -> _Plan:
    """The device metadata table for these tensors, from the cache when their addresses and
    sizes repeat (gradients every step)."""
    key = (device, chunk, tuple((t.dtype, t.data_ptr(), t.numel()) for t in sources))
    if device.type == "cuda":  # a table copied on one stream is only known ready on that one
        key += (torch.cuda.current_stream(device).cuda_stream,)
    with _plans_lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    host, groups, n_chunks = _build_table(sources, chunk)
    table = torch.from_numpy(host)
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is queued on the stream, the host does not wait.
        # The caching host allocator keeps the pinned block until the copy has run.
        pinned = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        pinned.copy_(table)
        table = pinned.to(device, non_blocking=True)
    elif table.device != device:
        table = table.to(device)
    plan = _Plan(table, groups, n_chunks)
    with _plans_lock:
        _plans[key] = plan
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _tensor_stats(tensors, block: int = _BLOCK, chunk_blocks: int = _CHUNK_BLOCKS):
    """``tensor_stats`` with the launch sizes exposed, so tests can force many chunks."""
    if not 1 <= chunk_blocks < 1024:  # the kernel packs per-lane counts in 10-bit fields
        raise ValueError(f"chunk_blocks: expected 1..1023, got {chunk_blocks}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors: expected at least one tensor")
    sources = [_source(t, i) for i, t in enumerate(tensors)]
    device = sources[0].device
    for i, t in enumerate(sources):
        if t.device != device:
            raise ValueError(f"tensors[{i}]: on {t.device}, expected every tensor on {device}")
    plan = _plan(sources, device, block * chunk_blocks)
    partials = _new_buffer((max(plan.n_chunks, 1), _N_STATS), device)  # (n_chunks, 10)
    for elem, acc, decode, aligned, lo, n in plan.groups:
        _stats_chunks_kernel[(n,)](
            plan.table[3 * lo :],
            partials[lo:],
            ELEM=elem,
            ACC=acc,
            DECODE=decode,
            ALIGNED=aligned,
            BLOCK=block,
            num_warps=8,
        )
    out = _new_buffer((len(sources), _N_STATS), device)  # (N, 10)
    _stats_finish_kernel[(len(sources),)](
        plan.table[3 * plan.n_chunks :], partials, out, BLOCK_C=_FINISH_BLOCK
    )
    return out


def tensor_stats(tensors) -> torch.Tensor:
    """float64 ``(len(tensors), len(STAT_NAMES))`` statistics, one row per tensor, in order.

    Same contract as ``reference.tensor_stats``: moments over finite elements, NaN/±Inf
    counted. Each tensor is read once; the whole list takes one launch per dtype plus one
    small fold, with no host sync. Tensors with gaps between elements (``x[::2]``) are
    copied first; transposed or permuted dense tensors are read in place.

    Example::

        grads = [p.grad for p in model.parameters()]
        rows = tensor_stats(grads)  # (len(grads), 10), on the grads' device
    """
    return _tensor_stats(tensors)
