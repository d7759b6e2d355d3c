"""Triton histograms equal to ``np.histogram(x.double(), edges)``, on the device, no host sync.

This module holds the counting kernel and its host side: the public ``histogram``,
``histogram_many`` and ``bin_counts``, the launch configuration and the batched launch. The
kernel finds each element's bin with ``triton_bins.bin_index`` (``"tensorflow"``, ``"linear"``
or ``"edges"``, picked by the caller's ``kind``); bf16 and fp8 elements are decoded from their
raw bits here first.

Every comparison is ``x`` in float64 against the float64 edges, as numpy compares ``x.double()``.
A program counts its blocks in registers with ``tl.histogram`` (one extra bin takes NaN and
out-of-range values) and adds its non-zero bins to the int64 counts with atomics once, at the
end; the grid is a few programs per SM, so the atomic traffic is ``n_bins x programs`` whatever
the size of ``x``, and no second launch reduces partials. More than ``_MAX_REGISTER_BINS`` bins
do not fit in registers: then each element adds itself to the counts with an atomic.
``histogram`` reads ``x`` twice: ``triton_stats.tensor_stats`` (the stats row and, for int bins,
the range), then this kernel.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from tbprobe.kernels import triton_edges
from tbprobe.kernels.triton_bins import bin_index  # called by the kernel: a module global
from tbprobe.kernels.triton_stats import sm_count, tensor_stats

__all__ = ["KINDS", "bin_counts", "histogram", "histogram_many"]

KINDS = ("tensorflow", "linear", "edges")
# torch dtype -> (element type loaded, widen through fp32, format decoded from the raw bits).
# bf16 and fp8 are read as integers and decoded exactly in the kernel: the interpreter's own
# conversions flush bf16 subnormals and turn fp8 NaN/Inf into finite numbers, and the decode is
# a few integer ops on every GPU.
_ELEMENT = {
    torch.float32: (tl.float32, False, ""),
    torch.float64: (tl.float64, False, ""),
    torch.float16: (tl.float16, True, ""),
    torch.bfloat16: (tl.int16, False, "bf16"),
    torch.float8_e4m3fn: (tl.uint8, False, "e4m3fn"),
    torch.float8_e5m2: (tl.uint8, False, "e5m2"),
    torch.int8: (tl.int8, False, ""),
    torch.int16: (tl.int16, False, ""),
    torch.int32: (tl.int32, False, ""),
    torch.int64: (tl.int64, False, ""),
    torch.uint8: (tl.uint8, False, ""),
    torch.bool: (tl.uint8, False, ""),  # one byte holding 0 or 1
}
_VIEW = {  # the raw bits of the dtypes decoded in the kernel
    torch.bool: torch.uint8,
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
}
_MAX_REGISTER_BINS = 2048  # 1548 "tensorflow" bins pad to 2048; more would spill registers
_N_TF_EDGES = 1549
_WINDOW = 256  # bins of the moving window (the cost of tl.histogram grows with its bins);
# TensorBoard's bins take a folded window of 2 * _WINDOW: _WINDOW - 1 bins of |x| per sign
_INT32_SAFE = 1 << 30  # elements per program at most, so its int32 counts cannot overflow
_TABLE_CACHE_SIZE = 64


@triton.jit
def _bits_to_f32(b_bits, FORMAT: tl.constexpr):
    """bf16 / fp8 bits -> fp32 exactly. bf16: the top half of an fp32; e5m2: the top byte of an
    fp16; e4m3fn (bias 7, no Inf): ``(-1)^s * 2^(e-7) * (1 + m/8)``, ``m * 2^-9`` when
    ``e == 0``, NaN when ``e`` and ``m`` are all ones."""
    b = b_bits.to(tl.int32)  # int16 sign-extends (shifted out below), uint8 zero-extends
    if FORMAT == "bf16":
        return (b << 16).to(tl.float32, bitcast=True)
    if FORMAT == "e5m2":
        return (b << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    e = (b >> 3) & 15
    m = b & 7
    b_mag = ((e + 120) << 23 | m << 20).to(tl.float32, bitcast=True)
    b_mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, b_mag)
    b_mag = tl.where((b & 127) == 127, float("nan"), b_mag)
    return tl.where(b >= 128, -b_mag, b_mag)


@triton.jit
def _histogram_kernel(
    x_ptr, numel, edges_ptr, edges_stride, counts_ptr, n_bins,
    X_DTYPE: tl.constexpr, MULTI: tl.constexpr, WIDEN_F32: tl.constexpr, BITS: tl.constexpr,
    KIND: tl.constexpr, N_STEPS: tl.constexpr, IN_REGISTERS: tl.constexpr,
    NUM_BINS: tl.constexpr, WINDOW: tl.constexpr, FOLD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``counts[r, i] += #{x in t : e_i <= x < e_{i+1}}`` (last bin closed), ``x`` in float64.
    Program ``(t, p)`` reads blocks ``p, p + P, ...`` of tensor ``t`` (``MULTI``: row ``t`` of an
    int64 table ``(address, numel, r)``; else ``x_ptr``, ``numel``, ``r = 0``), counts them in
    int32 registers (bin ``n_bins`` takes NaN and out-of-range) and atomically adds its non-zero
    bins to the int64 row ``r`` once. Edges of row ``r`` start at ``edges_ptr + r * stride``.
    ``WINDOW > 0``: a block whose bins span < WINDOW - 1 is counted in a WINDOW-bin histogram
    based at ``w_lo`` (flushed with atomics when a block falls outside it), far cheaper per
    element than a NUM_BINS one (``tl.histogram`` costs about NUM_BINS / 32 bit operations
    per element and thread). ``FOLD`` (TensorBoard's bins, mirrored around 0): the window is
    over the bins of ``|x|`` (``m``, 0 for ``|x| < 1e-12``), its lower half counting negative
    values and its upper half positive ones, so a block of values of both signs fits; the
    two bins of ``m == 0`` (exact zeros, common after a ReLU) are counted apart, so they do
    not stretch the window. Blocks are visited last first (the stats pass read them first to
    last, so the last ones may still be in L2)."""
    i_t = tl.program_id(0)
    i_p = tl.program_id(1)
    if MULTI:
        p_row = x_ptr + i_t * 3
        p_x = tl.load(p_row).to(tl.pointer_type(X_DTYPE))
        n_x = tl.load(p_row + 1)
        i_r = tl.load(p_row + 2)
    else:
        p_x = x_ptr
        n_x = numel
        i_r = 0
    p_edges = edges_ptr + i_r * edges_stride
    p_counts = counts_ptr + i_r * n_bins
    e_first = tl.load(p_edges)
    e_last = tl.load(p_edges + n_bins)
    b_hist = tl.zeros((NUM_BINS,), tl.int32)
    b_win = tl.zeros((max(WINDOW, 2),), tl.int32)
    o_w = tl.arange(0, max(WINDOW, 2))
    w_lo = n_bins * 0  # int32 base of the window
    half = n_bins // 2  # FOLD: bin ``half`` is [0, 1e-12), bin ``half - 1`` is [-1e-12, 0)
    n_zero = tl.zeros((), tl.int64)  # FOLD: #(m == 0, x >= 0) + #(m == 0, x < 0) << 32
    n_blk = tl.cdiv(n_x, BLOCK)  # int64: over 2^31 elements
    for i_j in range(i_p.to(tl.int64), n_blk, tl.num_programs(1)):
        o_x = (n_blk - 1 - i_j) * BLOCK + tl.arange(0, BLOCK)
        m_x = o_x < n_x
        b_x = tl.load(p_x + o_x, mask=m_x, other=0)
        if BITS != "":
            b_x = _bits_to_f32(b_x, BITS)
        if WIDEN_F32:  # fp16 -> fp32 -> fp64, both exact
            b_x = b_x.to(tl.float32)
        b_x = b_x.to(tl.float64)
        m_ok = m_x & (b_x >= e_first) & (b_x <= e_last)  # NaN fails both
        b_i = bin_index(b_x, m_ok, p_edges, n_bins, KIND, N_STEPS)
        if IN_REGISTERS:
            if FOLD:
                m_pos = b_x >= 0  # -0.0 too: numpy puts it in [0, 1e-12)
                b_m = tl.where(m_pos, b_i - half, half - 1 - b_i)  # the bin of |x|
                m_zero = m_ok & (b_m == 0)
                b_z = tl.where(m_pos, 1, tl.full((BLOCK,), 1 << 32, tl.int64))
                n_zero += tl.sum(tl.where(m_zero, b_z, 0), axis=0)
                m_win = m_ok & (b_m > 0)
                i_lo = tl.min(tl.where(m_win, b_m, n_bins), axis=0)
                i_hi = tl.max(tl.where(m_win, b_m, -1), axis=0)
                if i_hi - i_lo < WINDOW // 2 - 1:  # also true when no lane is counted
                    if (i_lo < w_lo) | (i_hi >= w_lo + WINDOW // 2 - 1):
                        _flush_folded(p_counts, b_win, w_lo, half, WINDOW)
                        b_win = tl.zeros((max(WINDOW, 2),), tl.int32)
                        w_lo = tl.maximum(i_lo - (WINDOW // 2 - 1 - (i_hi - i_lo)) // 2, 0)
                    b_h = b_m - w_lo + tl.where(m_pos, WINDOW // 2, 0)
                    b_win += tl.histogram(tl.where(m_win, b_h, WINDOW // 2 - 1), WINDOW)
                else:
                    b_hist += tl.histogram(tl.where(m_win, b_i, n_bins), NUM_BINS)
            elif WINDOW > 0:
                i_lo = tl.min(tl.where(m_ok, b_i, n_bins), axis=0)
                i_hi = tl.max(tl.where(m_ok, b_i, -1), axis=0)
                if i_hi - i_lo < WINDOW - 1:  # also true when no lane is counted
                    if (i_lo < w_lo) | (i_hi >= w_lo + WINDOW - 1):
                        m_w = (o_w < WINDOW - 1) & (b_win > 0)
                        p_w = p_counts + w_lo + o_w
                        tl.atomic_add(p_w, b_win.to(tl.int64), mask=m_w, sem="relaxed")
                        b_win = tl.zeros((max(WINDOW, 2),), tl.int32)
                        w_lo = tl.maximum(i_lo - (WINDOW - 1 - (i_hi - i_lo)) // 2, 0)
                    b_win += tl.histogram(tl.where(m_ok, b_i - w_lo, WINDOW - 1), WINDOW)
                else:
                    b_hist += tl.histogram(tl.where(m_ok, b_i, n_bins), NUM_BINS)
            else:
                b_hist += tl.histogram(tl.where(m_ok, b_i, n_bins), NUM_BINS)
        else:
            b_one = tl.full((BLOCK,), 1, tl.int64)
            tl.atomic_add(p_counts + b_i, b_one, mask=m_ok, sem="relaxed")
    if IN_REGISTERS:
        o_bin = tl.arange(0, NUM_BINS)
        m_bin = (o_bin < n_bins) & (b_hist > 0)
        tl.atomic_add(p_counts + o_bin, b_hist.to(tl.int64), mask=m_bin, sem="relaxed")
        if FOLD:
            _flush_folded(p_counts, b_win, w_lo, half, WINDOW)
            o_2 = tl.arange(0, 2)  # bins half ([0, 1e-12)) and half - 1 ([-1e-12, 0))
            n_neg = n_zero >> 32
            b_n = tl.where(o_2 == 0, n_zero - (n_neg << 32), n_neg)
            tl.atomic_add(p_counts + half - o_2, b_n, mask=b_n > 0, sem="relaxed")
        elif WINDOW > 0:
            m_w = (o_w < WINDOW - 1) & (b_win > 0)
            tl.atomic_add(p_counts + w_lo + o_w, b_win.to(tl.int64), mask=m_w, sem="relaxed")


@triton.jit
def _flush_folded(p_counts, b_win, w_lo, half, WINDOW: tl.constexpr):
    """Add a folded window to the counts: slot ``j`` of the lower half is the bin of ``-x``
    with ``m = w_lo + j`` (bin ``half - 1 - m``), of the upper half the bin of ``+x`` (bin
    ``half + m``); the top slot of each half is the dump of lanes not counted."""
    o_w = tl.arange(0, WINDOW)
    m_up = o_w >= WINDOW // 2
    b_m = w_lo + o_w - tl.where(m_up, WINDOW // 2, 0)
    m_w = (o_w % (WINDOW // 2) < WINDOW // 2 - 1) & (b_win > 0)
    b_bin = tl.where(m_up, half + b_m, half - 1 - b_m)
    tl.atomic_add(p_counts + b_bin, b_win.to(tl.int64), mask=m_w, sem="relaxed")


def _flat(x, name: str) -> torch.Tensor:
    """Contiguous 1-D view (a copy only when needed)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (got {x.dtype})")
    if x.dtype not in _ELEMENT:  # rarer dtypes: widened exactly, as the oracle reads them
        if x.dtype.is_floating_point:
            if x.element_size() != 1:
                raise TypeError(f"{name}: unsupported dtype {x.dtype}")
            x = x.float()  # fp8 variants (fnuz, e8m0): every value is an fp32
        else:
            x = x.double()  # uint16/32/64: np.histogram(x.double(), ...) is the contract
    return x.detach().reshape(-1).contiguous()


def _element_args(dtype: torch.dtype) -> dict:
    element, widen, bits = _ELEMENT[dtype]
    return dict(X_DTYPE=element, WIDEN_F32=widen, BITS=bits)


PROGRAMS_PER_SM = 4  # a launch's programs, together, per SM (bench_kernels sweeps it)


def _target_programs(device: torch.device) -> int:
    return PROGRAMS_PER_SM * (sm_count(device) or 1)  # the interpreter: one after another


def _config(n_bins: int, kind: str, device: torch.device) -> dict:
    num_bins = triton.next_power_of_2(n_bins + 1)  # + the bin for NaN and out-of-range
    in_registers = num_bins <= _MAX_REGISTER_BINS
    fold = in_registers and kind == "tensorflow"  # mirrored bins: the folded window
    block = 2048 if num_bins >= 1024 else 1024
    if device.type != "cuda":  # the interpreter pays per operation, not per element
        block = 8192
    return dict(
        KIND=kind,
        N_STEPS=max(1, n_bins.bit_length()),  # 2**N_STEPS > n: reaches every index 0..n
        IN_REGISTERS=in_registers,
        NUM_BINS=num_bins if in_registers else 32,
        WINDOW=(2 * _WINDOW if fold else _WINDOW) if in_registers and num_bins > _WINDOW else 0,
        FOLD=fold,
        BLOCK=block,
        num_warps=max(1, min(8, block // 256)),  # 8 elements a thread: no register spills
    )


def _programs(numel: int, n_tensors: int, device: torch.device, block: int) -> int:
    """Programs per tensor: together a few per SM, each at most ``_INT32_SAFE`` elements."""
    per_tensor = max(1, triton.cdiv(_target_programs(device), n_tensors))
    return max(min(triton.cdiv(numel, block), per_tensor), triton.cdiv(numel, _INT32_SAFE))


def _check_edges(edges, device: torch.device, kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if not isinstance(edges, torch.Tensor) or edges.dtype != torch.float64 or edges.dim() != 1:
        raise TypeError("edges: expected a 1-D float64 tensor")
    if edges.numel() < 2 or edges.device != device:
        raise ValueError(f"edges: expected >= 2 edges on {device}, got {edges.numel()}")
    if kind == "tensorflow" and edges.numel() != _N_TF_EDGES:
        raise ValueError(f"edges: 'tensorflow' expects {_N_TF_EDGES} edges, got {edges.numel()}")
    return edges.numel() - 1


def _launch_one(flat: torch.Tensor, edges: torch.Tensor, kind: str, counts: torch.Tensor) -> None:
    """``counts += `` the bins of ``flat``; ``counts`` int64 ``(n_bins,)``, zeroed by the caller."""
    if flat.numel() == 0:
        return
    n_bins = edges.numel() - 1
    cfg = _config(n_bins, kind, flat.device)
    grid = (1, _programs(flat.numel(), 1, flat.device, cfg["BLOCK"]))
    x = flat.view(_VIEW.get(flat.dtype, flat.dtype))
    _histogram_kernel[grid](
        x, flat.numel(), edges, 0, counts, n_bins, MULTI=False, **_element_args(flat.dtype), **cfg
    )


_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _device_table(rows: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """int64 ``(len(rows), 3)`` on ``device``, built in pinned memory and copied non_blocking;
    cached, since parameters and gradients keep their addresses from step to step."""
    key = (device, tuple(rows))
    if device.type == "cuda":  # a table copied on one stream is only known ready on that one
        key += (torch.cuda.current_stream(device).cuda_stream,)
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
    else:
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        table = _tables[key] = host.to(device, non_blocking=True)
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    return table


def _launch_many(flats, edges, edges_stride, kind, counts) -> None:
    """Row ``r`` of ``counts`` (int64 ``(T, n_bins)``, zeroed) ``+=`` the bins of ``flats[r]``;
    one launch per dtype."""
    n_bins = counts.shape[1]
    cfg = _config(n_bins, kind, counts.device)
    groups: dict[torch.dtype, list[int]] = {}
    for r, flat in enumerate(flats):
        if flat.numel():
            groups.setdefault(flat.dtype, []).append(r)
    for dtype, rows in groups.items():
        table = _device_table(
            [(flats[r].data_ptr(), flats[r].numel(), r) for r in rows], counts.device
        )
        largest = max(flats[r].numel() for r in rows)
        grid = (len(rows), _programs(largest, len(rows), counts.device, cfg["BLOCK"]))
        _histogram_kernel[grid](
            table, 0, edges, edges_stride, counts, n_bins, MULTI=True, **_element_args(dtype), **cfg
        )


def bin_counts(x: torch.Tensor, edges: torch.Tensor, kind: str = "edges") -> torch.Tensor:
    """int64 ``(n_bins,)`` counts of ``x`` (any shape, flattened) with numpy's rule: bins
    ``[e_i, e_{i+1})``, the last one closed, NaN never counted, ±Inf only on an infinite edge.

    ``edges``: float64 ``(n_bins + 1,)`` on ``x``'s device, increasing. ``kind`` says how the
    kernel finds a bin: ``"tensorflow"`` (``edges`` must be ``tensorflow_edges()``),
    ``"linear"`` (``edges`` must be ``linear_edges(lo, hi, n_bins)``) or ``"edges"`` (any).

    Example::

        bin_counts(x, torch.tensor([0.0, 0.5, 1.0], device=x.device))  # (2,)
    """
    flat = _flat(x, "x")
    n_bins = _check_edges(edges, flat.device, kind)
    counts = torch.zeros(n_bins, dtype=torch.int64, device=flat.device)
    _launch_one(flat, edges.contiguous(), kind, counts)
    return counts


def _edges_for(kind, payload, range_, stats, device):
    """(kind, edges, stride): edges ``(T, n + 1)`` with stride ``n + 1`` for per-row linear
    edges, or one shared row ``(n + 1,)`` with stride 0."""
    from tbprobe.kernels import _tensorflow_edges_np

    if kind == "linear" and range_ is None:
        edges = triton_edges.linear_edges_from_stats(stats, payload)  # one launch, every row
        return "linear", edges, edges.shape[1]
    if kind == "linear":
        edges, _ = triton_edges.host_edges(triton_edges.uniform_range(range_, payload), device)
        return "linear", edges, 0
    if payload is _tensorflow_edges_np():
        edges, _ = triton_edges.host_edges(payload, device, name="tensorflow")
        return "tensorflow", edges, 0
    edges, uniform = triton_edges.host_edges(payload, device)
    return ("linear" if uniform else "edges"), edges, 0


def histogram_many(tensors, bins="tensorflow", range=None) -> list:  # noqa: A002 - numpy's name
    """One ``Histogram`` per tensor, with the same ``bins``: one kernel launch per dtype.

    ``tensors``: a sequence of real tensors on one device (any shapes). ``bins`` and ``range``
    as in ``histogram``; with an int and no range each tensor gets its own finite min..max.
    ``counts`` int64 ``(n_bins,)``, ``edges`` float64 ``(n_bins + 1,)`` and ``stats`` float64
    ``(10,)`` of each result are views of stacked device tensors.

    Example::

        hs = histogram_many([w.grad for w in model.parameters()], bins=64)
    """
    from tbprobe.kernels import Histogram, _check_bins

    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors: expected at least one tensor")
    flats = [_flat(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    device = flats[0].device
    if any(f.device != device for f in flats):
        raise ValueError("tensors: expected every tensor on one device")
    kind, payload = _check_bins(bins, range)
    stats = tensor_stats(flats)  # (T, 10): the first pass over the tensors
    kind, edges, stride = _edges_for(kind, payload, range, stats, device)
    n_bins = edges.shape[-1] - 1
    counts = torch.zeros(len(flats), n_bins, dtype=torch.int64, device=device)
    _launch_many(flats, edges, stride, kind, counts)
    rows = edges if stride else edges.expand(len(flats), -1)
    return [Histogram(c, e, s) for c, e, s in zip(counts, rows, stats, strict=True)]


def histogram(x, bins="tensorflow", range=None):  # noqa: A002 - numpy's name
    """``Histogram(counts, edges, stats)`` of ``x``, equal to ``np.histogram(x.double(), edges)``.

    ``x``: a real tensor, any shape and dtype. ``bins``: ``"tensorflow"`` (TensorBoard's 1548
    bins), an int (that many equal bins over ``range``, default the finite min..max of ``x``)
    or increasing edges. ``counts`` int64 ``(n_bins,)``, ``edges`` float64 ``(n_bins + 1,)``,
    ``stats`` float64 ``(10,)``: all on ``x``'s device, computed with no host sync.

    Example::

        h = histogram(torch.randn(1000, device="cuda"), bins=10)
        h.counts.sum()  # 1000
    """
    from tbprobe.kernels import Histogram, _check_bins

    flat = _flat(x, "x")
    kind, payload = _check_bins(bins, range)
    stats = tensor_stats([flat])  # (1, 10): the first pass over x; the histogram is the second
    kind, edges, _ = _edges_for(kind, payload, range, stats, flat.device)
    edges = edges.view(-1)
    counts = torch.zeros(edges.numel() - 1, dtype=torch.int64, device=flat.device)
    _launch_one(flat, edges, kind, counts)
    return Histogram(counts, edges, stats[0])
