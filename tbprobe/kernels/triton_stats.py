"""Triton ``tensor_stats``: every tensor of a list read once, one launch per dtype, no host sync.

Design. The host side (``triton_stats_plan``) cuts the tensors into chunks of ``BLOCK *
CHUNK_BLOCKS`` elements (``chunk_blocks_for``: longer chunks for calls large enough to fill
the GPU with them) and caches a device table of ``(address, start, end, row, first, count)``
per chunk. ``_stats_chunks_kernel`` runs one program per chunk, one launch per
dtype group; it casts the address to a typed pointer and computes the chunk's statistics.
A tensor of one chunk (every small tensor) has its row written directly. Otherwise each
chunk stores a partial row and increments its row's arrival counter; the program that
arrives last folds the row's partials in chunk order (a fixed tree, whatever the arrival
order: results are bitwise deterministic, with no float atomics) and resets the counter.
A call is one launch per dtype group and one output allocation; a repeated call (same
addresses) allocates and copies nothing else.

Transposed/permuted tensors are read in place (statistics ignore order); views with gaps or
repeats are copied once with ``.contiguous()``."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from tbprobe.kernels import triton_stats_plan as plans
from tbprobe.kernels.reference import STAT_NAMES

__all__ = ["tensor_stats"]

_N_STATS = len(STAT_NAMES)
_BLOCK = 2048  # elements per loop step of a program
_CHUNK_BLOCKS = 16  # loop steps per chunk: a program reads at most BLOCK * CHUNK_BLOCKS elements
_MAX_CHUNK_BLOCKS = 512  # below the 1024 the kernel's packed lane counts allow
_PER_SM = 4  # a large call's chunks grow while every SM still gets this many programs
_FOLD_BLOCK = 128  # partial rows per loop step of the fold


def chunk_blocks_for(total: int, sms: int | None, block: int = _BLOCK) -> int:
    """Loop steps per chunk for a call reading ``total`` elements on a GPU of ``sms`` SMs.

    Each program pays a fixed cost besides its reads (its table record, five block-wide
    reductions, the partial row and its counter), so a call large enough to give every SM
    ``_PER_SM`` programs of longer chunks gets them: the largest power of two from
    ``_CHUNK_BLOCKS`` to ``_MAX_CHUNK_BLOCKS`` that still does. ``sms=None`` (the
    interpreter, which runs programs one after another): ``_CHUNK_BLOCKS``.

    Example::

        chunk_blocks_for(1 << 30, 132)  # 512: 1G elements in ~1000 programs of 1M
    """
    if not sms:
        return _CHUNK_BLOCKS
    fit = total // (block * _PER_SM * sms)
    if fit <= _CHUNK_BLOCKS:
        return _CHUNK_BLOCKS
    return min(1 << (fit.bit_length() - 1), _MAX_CHUNK_BLOCKS)


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int | None:
    """The GPU's streaming multiprocessors; None off CUDA (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


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
    """One block ``x`` (lanes ``m_x``) into the running state: ``s_sum += sum x`` (in fp64:
    a sum can cancel, so narrower partials would cost relative accuracy), ``s_sq += sum x^2``
    over finite x (a tree in ACC, added in fp64), lane-wise min/max, packed counts."""
    b_x = _decode(b_raw, ACC, DECODE)
    m_fin = m_x & (tl.abs(b_x) < float("inf"))  # False for NaN and ±Inf
    b_f = tl.where(m_fin, b_x, 0.0)
    b_s = tl.sum(b_f.to(tl.float64), axis=0)
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
    ``2^-50 <= |x| <= 2^60`` or 0: per-lane fp64 sums of x (a sum can cancel: fp32 partials
    would be off by ``2^-24`` of the sum of magnitudes, far more than 1e-6 of a zero-mean
    tensor's sum), per-lane fp32 sums of squares over ``UNROLL`` blocks (loads in flight
    together; non-negative terms: within ``UNROLL * 2^-24`` relative) added into fp64; no
    per-element masks. ``ok`` is 0 when the assumption fails (a NaN/Inf reaches the sums, or
    the extremes fall outside the range); the caller then redoes the chunk with
    ``_chunk_exact``."""
    d_s = tl.zeros((BLOCK,), tl.float64)
    d_q = tl.zeros((BLOCK,), tl.float64)
    b_min = tl.full((BLOCK,), float("inf"), tl.float32)
    b_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    n_zero = tl.zeros((BLOCK,), tl.int32)
    o_b = tl.arange(0, BLOCK)
    n_groups = ((end - start) // (BLOCK * UNROLL)).to(tl.int32)
    for i in range(0, n_groups):
        f_q = tl.zeros((BLOCK,), tl.float32)
        for u in tl.static_range(UNROLL):
            b_raw = tl.load(p_x + (start + (i * UNROLL + u) * BLOCK + o_b))
            b_x = _decode(b_raw, tl.float32, DECODE)
            d_s += b_x.to(tl.float64)
            f_q += b_x * b_x
            b_min = tl.minimum(b_min, b_x)
            b_max = tl.maximum(b_max, b_x)
            n_zero += (b_x == 0).to(tl.int32)
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
def _fold_rows(p_partials, lo, n_rows, p_dst, BLOCK_C: tl.constexpr):
    """``dst`` = partial rows ``lo .. lo + n_rows`` folded: fp64 sums of columns 0-2 and 6-9,
    min of column 3, max of columns 4-5, each a tree over ``BLOCK_C`` rows in a fixed order.
    The loads skip L1 (``.cg``): other programs, on other SMs, wrote these rows."""
    o_k = tl.arange(0, 16)  # the 10 columns, padded to a power of two
    m_k = o_k < 10
    b_sum = tl.zeros((16,), tl.float64)
    b_min = tl.full((16,), float("inf"), tl.float64)
    b_max = tl.where(o_k == 5, 0.0, float("-inf")).to(tl.float64)  # abs_max of nothing is 0
    for i in range(0, tl.cdiv(n_rows.to(tl.int32), BLOCK_C)):
        o_c = lo + i * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (o_c < lo + n_rows)[:, None] & m_k[None, :]
        p_p = p_partials + o_c[:, None] * 10 + o_k[None, :]
        b_p = tl.load(p_p, mask=m, other=0.0, cache_modifier=".cg")
        b_sum += tl.sum(b_p, axis=0)
        b_min = tl.minimum(b_min, tl.min(tl.where(m, b_p, float("inf")), axis=0))
        b_max = tl.maximum(b_max, tl.max(tl.where(m, b_p, float("-inf")), axis=0))
    b_out = tl.where(o_k == 3, b_min, tl.where((o_k == 4) | (o_k == 5), b_max, b_sum))
    tl.store(p_dst + o_k, b_out, mask=m_k)


@triton.jit
def _stats_chunks_kernel(
    p_table,
    p_partials,
    p_counts,
    p_out,
    first,
    ELEM: tl.constexpr,
    ACC: tl.constexpr,
    DECODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNROLL: tl.constexpr = 4,
):
    """Chunk ``c = first + program``, record ``(address, start, end, row, lo, n)``: finite
    ``count, sum x, sum x^2, min, max, max(max, -min, 0)``, then ``#nan, #+inf, #-inf, #0``
    of ``x = t[start:end]`` (fp32 ACC: ``_chunk_fast``, ``_chunk_exact`` if it fails). It is
    ``out[row]`` when ``n == 1``; else ``partials[c]``, and the last of the row's ``n`` chunks
    to finish sets ``out[row]`` to the fold of ``partials[lo:lo + n]``."""
    i_c = first + tl.program_id(0).to(tl.int64)
    p_rec = p_table + 6 * i_c  # triton_stats_plan.RECORD numbers per chunk
    address = tl.load(p_rec)
    start = tl.load(p_rec + 1)  # int64: tensors over 2^31 elements
    end = tl.load(p_rec + 2)
    row = tl.load(p_rec + 3)
    lo = tl.load(p_rec + 4)
    n_row = tl.load(p_rec + 5)
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
    count = ((end - start) - n_nan - n_pinf - n_ninf).to(tl.float64)
    abs_max = tl.maximum(tl.maximum(c_max, -c_min), 0.0)
    o_k = tl.arange(0, 16)  # the row's 10 columns, padded to a power of two
    b_row = tl.where(o_k == 0, count, s_sum)
    b_row = tl.where(o_k == 2, s_sq, b_row)
    b_row = tl.where(o_k == 3, c_min, b_row)
    b_row = tl.where(o_k == 4, c_max, b_row)
    b_row = tl.where(o_k == 5, abs_max, b_row)
    b_row = tl.where(o_k == 6, n_nan.to(tl.float64), b_row)
    b_row = tl.where(o_k == 7, n_pinf.to(tl.float64), b_row)
    b_row = tl.where(o_k == 8, n_ninf.to(tl.float64), b_row)
    b_row = tl.where(o_k == 9, n_zero.to(tl.float64), b_row)
    if n_row == 1:  # the tensor's only chunk: its row is the result
        tl.store(p_out + 10 * row + o_k, b_row, mask=o_k < 10)
    else:
        tl.store(p_partials + 10 * i_c + o_k, b_row, mask=o_k < 10)
        tl.debug_barrier()  # all of this program's stores are issued before it is counted
        # acq_rel: this row's partials are visible to whoever sees the count, and the last
        # program sees every other program's partials.
        done = tl.atomic_add(p_counts + row, 1, sem="acq_rel")
        if done == n_row - 1:  # every other chunk of the row has stored its partial
            _fold_rows(p_partials, lo, n_row, p_out + 10 * row, BLOCK_C)
            tl.store(p_counts + row, 0)  # ready for the next call with this plan


def _tensor_stats(tensors, block: int = _BLOCK, chunk_blocks: int | None = None):
    """``tensor_stats`` with the launch sizes exposed, so tests can force many chunks (and
    benchmarks compare chunk sizes); ``chunk_blocks=None``: :func:`chunk_blocks_for`."""
    if chunk_blocks is not None and not 1 <= chunk_blocks < 1024:  # 10-bit lane counts
        raise ValueError(f"chunk_blocks: expected 1..1023, got {chunk_blocks}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors: expected at least one tensor")
    sources = [plans.source(t, i) for i, t in enumerate(tensors)]
    device = sources[0].device
    for i, t in enumerate(sources):
        if t.device != device:
            raise ValueError(f"tensors[{i}]: on {t.device}, expected every tensor on {device}")
    if chunk_blocks is None:
        total = sum(t.numel() for t in sources)
        chunk_blocks = chunk_blocks_for(total, sm_count(device), block)
    plan = plans.plan_for(sources, device, block * chunk_blocks)
    out = plans.new_buffer((len(sources), _N_STATS), device)  # (N, 10)
    guard = contextlib.nullcontext()
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        guard = torch.cuda.device(device)  # launch on the tensors' GPU, not the current one
    with guard:
        for elem, acc, decode, aligned, lo, n in plan.groups:
            _stats_chunks_kernel[(n,)](
                plan.table,
                plan.partials,
                plan.counts,
                out,
                lo,
                ELEM=elem,
                ACC=acc,
                DECODE=decode,
                ALIGNED=aligned,
                BLOCK=block,
                BLOCK_C=_FOLD_BLOCK,
                num_warps=8,
            )
    return out


def tensor_stats(tensors) -> torch.Tensor:
    """float64 ``(len(tensors), len(STAT_NAMES))`` statistics, one row per tensor, in order.

    Same contract as ``reference.tensor_stats``: moments over finite elements, NaN/±Inf
    counted. Each tensor is read once; the whole list takes one launch per dtype (the fold
    of a multi-chunk tensor is done by its last chunk's program), with no host sync.
    Tensors with gaps between elements (``x[::2]``) are copied first; transposed or
    permuted dense tensors are read in place.

    Example::

        grads = [p.grad for p in model.parameters()]
        rows = tensor_stats(grads)  # (len(grads), 10), on the grads' device
    """
    return _tensor_stats(tensors)
