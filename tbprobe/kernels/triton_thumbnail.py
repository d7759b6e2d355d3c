"""Triton thumbnail: per-map finite min/max partials, then one kernel that writes the image.

Two launches, two small allocations and no host sync per call. ``_minmax_kernel`` reduces
each map in ``n_chunks`` pieces of whole ``BLOCK``-element steps to partial (min, max)
pairs. ``_grid_kernel`` gives each program one grid cell (one map) and ``BLOCK_P`` of its
pixels: it finishes the map's min/max from the partials, averages every pixel's pooling
window and writes uint8, separators and unused cells included. A window is read as one
``(BLOCK_P, BLOCK_K)`` block of (pixel, window element) addresses, so all of a program's
loads are in flight together (a loop over window elements waits on memory once per element).

The input is read through its strides from the drawn batch item's offset: no view, copy or
cast is made, except a same-size ``view(uint8)`` for bool and fp8 (decoded in the kernel).
Everything that depends only on shapes, strides, dtype and arguments is computed once per
signature and cached. The grid kernel is compiled without FMA contraction, so its fp64
scaling rounds as the torch reference's does: unpooled images equal the reference exactly;
pooled ones may differ by 1 grey level where a window sum, added in another order, rounds
across a .5 boundary.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tbprobe.kernels.triton_stats import _decode

_MM_BLOCK = 4096  # elements per min/max step, at most
_MM_MAX_CHUNKS = 512  # min/max partials per map, at most (each grid program folds them)
_MM_MAX_PROGRAMS = 2048  # min/max programs across all maps, at most
_LANES = 4096  # (pixel, window element) lanes per grid program and step
_MAX_BLOCK_K = 512  # window elements per step; longer windows loop
_CACHE_SIZE = 256
_FP8_DECODE = {torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}  # triton_stats._decode's codes


@triton.jit
def _load_acc(p_x, m_x, ACC: tl.constexpr, DECODE: tl.constexpr):
    """``x`` at ``p_x`` in ``ACC`` (masked lanes ``~m_x`` read as 0): a plain cast, or fp8
    decoded from its bits by ``triton_stats._decode`` (``DECODE`` 2 or 3)."""
    return _decode(tl.load(p_x, mask=m_x, other=0), ACC, DECODE)


@triton.jit
def _minmax_kernel(
    x_ptr, part_ptr, base, hw, w, stride_c, stride_h, stride_w, chunk,
    FLAT: tl.constexpr, WIDE: tl.constexpr, DECODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """part[0, c, k] = min and part[1, c, k] = max of the finite values of map ``c`` at flat
    indices ``k*chunk .. (k+1)*chunk`` (+inf / -inf when there is none), the map's element
    ``(y, x)`` at ``base + c*stride_c + y*stride_h + x*stride_w``; fp32, or fp64 when WIDE."""
    i_c = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    acc = tl.float64 if WIDE else tl.float32
    b_lo = tl.full((BLOCK,), float("inf"), acc)
    b_hi = tl.full((BLOCK,), float("-inf"), acc)
    p_c = x_ptr + base + i_c * stride_c
    for off in range(0, chunk, BLOCK):  # chunk is a multiple of BLOCK
        o_i = i_k * chunk + off + tl.arange(0, BLOCK)
        m_i = o_i < hw
        if FLAT:  # noqa: SIM108 - constexpr: rows follow each other, no division per element
            p_x = p_c + o_i * stride_w
        else:
            p_x = p_c + (o_i // w) * stride_h + (o_i % w) * stride_w
        b_x = _load_acc(p_x, m_i, acc, DECODE)
        m_f = m_i & (tl.abs(b_x) < float("inf"))  # False for NaN and ±Inf
        b_lo = tl.minimum(b_lo, tl.where(m_f, b_x, float("inf")))
        b_hi = tl.maximum(b_hi, tl.where(m_f, b_x, float("-inf")))
    i_o = i_c * tl.num_programs(1) + i_k
    tl.store(part_ptr + i_o, tl.min(b_lo, 0))
    tl.store(part_ptr + tl.num_programs(0) * tl.num_programs(1) + i_o, tl.max(b_hi, 0))


@triton.jit
def _grid_kernel(
    x_ptr, part_ptr, out_ptr, base, n, h, w, stride_c, stride_h, stride_w, n_chunks,
    cols, th, tw, kh, kw, H, W, background,
    WIDE: tl.constexpr, DECODE: tl.constexpr, POOL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[Y, X] for pixels of grid cell i_t (map i_t, with its right/bottom separators):
    m = mean of the finite x[c, y0:y1, x0:x1] (adaptive-avg-pool window, at most kh x kw),
    then floor((m - lo) * (255 / (hi - lo)) + 0.5) in fp64, clamped; 128 if lo == hi, 0 if
    the window has no finite pixel; ``background`` off the tiles. POOL False: 1x1 windows."""
    i_t = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    acc = tl.float64 if WIDE else tl.float32
    on_map = i_t < n
    c = tl.minimum(i_t, n - 1)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < n_chunks
    lo = tl.min(tl.load(part_ptr + c * n_chunks + o_c, mask=m_c, other=float("inf")), 0)
    p_hi = part_ptr + (n + c) * n_chunks + o_c
    hi = tl.max(tl.load(p_hi, mask=m_c, other=float("-inf")), 0)
    lo = lo.to(tl.float64)
    hi = hi.to(tl.float64)
    scale = 255.0 / tl.where(hi > lo, hi - lo, 1.0)

    cell_w = tw + 1
    o_p = i_b * BLOCK_P + tl.arange(0, BLOCK_P)
    yy = o_p // cell_w  # pixel row and column inside the cell
    xx = o_p % cell_w
    o_y = (i_t // cols) * (th + 1) + yy
    o_x = (i_t % cols) * cell_w + xx
    m_out = (yy < th + 1) & (o_y < H) & (o_x < W)
    m_tile = m_out & (yy < th) & (xx < tw) & on_map
    p_c = x_ptr + base + c * stride_c
    if POOL:
        y0 = yy * h // th
        x0 = xx * w // tw
        n_y = ((yy + 1) * h + th - 1) // th - y0  # window rows, at most kh
        n_x = ((xx + 1) * w + tw - 1) // tw - x0  # window columns, at most kw
        p_w = p_c + y0 * stride_h + x0 * stride_w  # (BLOCK_P,) window corners
        b_sum = tl.zeros((BLOCK_P,), acc)
        b_cnt = tl.zeros((BLOCK_P,), tl.int32)
        for k0 in range(0, kh * kw, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)  # window element k: row k // kw, column k % kw
            d_y = (o_k // kw).to(tl.int64)
            d_x = (o_k % kw).to(tl.int64)
            m_w = m_tile[:, None] & (d_y[None, :] < n_y[:, None]) & (d_x[None, :] < n_x[:, None])
            p_x = p_w[:, None] + (d_y * stride_h + d_x * stride_w)[None, :]
            b_x = _load_acc(p_x, m_w, acc, DECODE)  # (BLOCK_P, BLOCK_K)
            m_f = m_w & (tl.abs(b_x) < float("inf"))
            b_sum += tl.sum(tl.where(m_f, b_x, 0.0), axis=1)
            b_cnt += tl.sum(m_f.to(tl.int32), axis=1)
        mean = b_sum.to(tl.float64) / tl.maximum(b_cnt, 1).to(tl.float64)
    else:
        b_x = _load_acc(p_c + yy * stride_h + xx * stride_w, m_tile, acc, DECODE)
        m_f = m_tile & (tl.abs(b_x) < float("inf"))
        b_cnt = m_f.to(tl.int32)
        mean = tl.where(m_f, b_x, 0.0).to(tl.float64)
    q = tl.floor((mean - lo) * scale + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 255.0)
    q = tl.where(hi == lo, 128.0, q)
    q = tl.where(b_cnt > 0, q, 0.0)
    q = tl.where(m_tile, q, background)
    tl.store(out_ptr + o_y * W + o_x, q.to(tl.uint8), mask=m_out)


class _Launch(NamedTuple):
    """Everything but the tensors, for one signature (shapes, strides, dtype, arguments)."""

    as_bytes: bool  # read through x.view(torch.uint8): bool and fp8
    part_shape: tuple[int, int, int]  # (2, n, n_chunks)
    part_dtype: torch.dtype
    mm_grid: tuple[int, int]
    mm_args: tuple
    grid: tuple[int, int]
    args: tuple
    mm_warps: int
    warps: int


_launches: dict = {}
_launches_lock = threading.Lock()


def _pow2(v: int) -> int:
    """The smallest power of two >= v (plain Python: ``triton.next_power_of_2`` is slower)."""
    return 1 << max(v - 1, 0).bit_length()


def _map_strides(x: torch.Tensor, kind: str, sample: int) -> tuple[int, int, int, int]:
    """(base, stride_c, stride_h, stride_w) of the drawn maps inside ``x``, in elements."""
    st = x.stride()
    if kind == "heatmap":
        return 0, 0, st[0], st[1]
    base = (sample % x.shape[0]) * st[0]
    if kind == "sequence":
        return base, 0, st[1], st[2]
    return base, st[1], st[2], st[3]


def _new_launch(x, layout, sample, background, wide) -> _Launch:
    """The launch parameters of one signature: pure arithmetic on shapes (no device work)."""
    kind, n, h, w, rows, cols, th, tw, H, W = layout
    base, stride_c, stride_h, stride_w = _map_strides(x, kind, sample)
    decode = _FP8_DECODE.get(x.dtype, 0)
    hw = h * w
    block = max(128, min(_MM_BLOCK, _pow2(hw)))
    steps = -(-hw // block)
    n_chunks = min(steps, _MM_MAX_CHUNKS, max(1, _MM_MAX_PROGRAMS // n))
    chunk_steps = -(-steps // n_chunks)
    n_chunks = -(-steps // chunk_steps)
    flat = h == 1 or stride_h == w * stride_w
    mm_args = (base, hw, w, stride_c, stride_h, stride_w, chunk_steps * block, flat, wide, decode)
    mm_args += (block,)
    kh = -(-h // th) + (h % th != 0)  # longest pooling window, in input rows
    kw = -(-w // tw) + (w % tw != 0)
    pool = kh * kw > 1
    block_k = min(_pow2(kh * kw), _MAX_BLOCK_K) if pool else 1
    cell = (th + 1) * (tw + 1)
    block_p = min(max(8, _LANES // block_k), _pow2(cell))
    args = (base, n, h, w, stride_c, stride_h, stride_w, n_chunks, cols, th, tw, kh, kw, H, W)
    args += (background, wide, decode, pool, block_p, block_k, _pow2(n_chunks))
    return _Launch(
        as_bytes=x.dtype == torch.bool or decode != 0,
        part_shape=(2, n, n_chunks),
        part_dtype=torch.float64 if wide else torch.float32,
        mm_grid=(n, n_chunks),
        mm_args=mm_args,
        grid=(rows * cols, -(-cell // block_p)),
        args=args,
        mm_warps=8 if block >= 2048 else 4,
        warps=8 if block_p * block_k >= 2048 else 4,
    )


def _launch_for(x, layout, sample, background, wide) -> _Launch:
    """The cached :class:`_Launch` of this signature (built on first use)."""
    key = (layout, x.shape, x.stride(), x.dtype, sample, background)
    launch = _launches.get(key)
    if launch is None:
        launch = _new_launch(x, layout, sample, background, wide)
        with _launches_lock:
            if len(_launches) >= _CACHE_SIZE:
                _launches.clear()  # signatures are few in practice; never grow without bound
            _launches[key] = launch
    return launch


def thumbnail_triton(x: torch.Tensor, layout: tuple, sample: int, background: int, *, wide: bool):
    """uint8 ``(H, W)`` image of the maps of ``x`` that ``layout`` (``thumbnail._layout``)
    describes, batch item ``sample`` (already validated), any strides, on ``x``'s device."""
    launch = _launch_for(x, layout, sample, background, wide)
    if launch.as_bytes:
        x = x.view(torch.uint8)
    device = x.device
    part = torch.empty(launch.part_shape, dtype=launch.part_dtype, device=device)
    out = torch.empty(layout[-2:], dtype=torch.uint8, device=device)
    guard = contextlib.nullcontext()
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        guard = torch.cuda.device(device)  # launch on the tensor's GPU, not the current one
    with guard:
        _minmax_kernel[launch.mm_grid](x, part, *launch.mm_args, num_warps=launch.mm_warps)
        _grid_kernel[launch.grid](
            x, part, out, *launch.args, num_warps=launch.warps, enable_fp_fusion=False
        )
    return out
