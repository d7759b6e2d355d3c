"""Triton thumbnail: per-map finite min/max partials, then one kernel that writes the image.

Two launches and no host sync. ``_minmax_kernel`` reduces each map in ``n_chunks`` pieces
to partial (min, max) pairs; ``_grid_kernel`` gives each program one grid cell (one map) and
a block of its pixels: it finishes the map's min/max from the partials, averages each
pixel's pooling window and writes uint8, separators and unused cells included. The maps are
read through their strides, so a non-contiguous input is never copied. The image equals
the torch reference's within 1 grey level: window sums are added in another order, and the
compiler may fuse the fp64 scaling into an FMA.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # elements per min/max step, and output pixels per grid program
_MIN_CHUNK = 4096  # fewest elements a min/max program reduces
_MAX_PROGRAMS = 1024  # min/max programs across all maps, at most
_FP8 = {getattr(torch, n) for n in dir(torch) if n.startswith("float8_")}


@triton.jit
def _minmax_kernel(
    x_ptr, part_ptr, hw, w, stride_c, stride_h, stride_w, chunk, n_chunks,
    FLAT: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """part[0, c, k] = min and part[1, c, k] = max of the finite ``x[c].flat[k*chunk:(k+1)*chunk]``
    (+inf / -inf when there is none); fp32, or fp64 when WIDE."""
    i_c = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    acc = tl.float64 if WIDE else tl.float32
    b_lo = tl.full((BLOCK,), float("inf"), acc)
    b_hi = tl.full((BLOCK,), float("-inf"), acc)
    start = i_k * chunk
    for off in range(start, start + chunk, BLOCK):
        o_i = off + tl.arange(0, BLOCK)
        m_i = (o_i < hw) & (o_i < start + chunk)
        if FLAT:  # rows follow each other: no division per element
            p_x = x_ptr + i_c * stride_c + o_i * stride_w
        else:
            p_x = x_ptr + i_c * stride_c + (o_i // w) * stride_h + (o_i % w) * stride_w
        b_x = tl.load(p_x, mask=m_i, other=0).to(acc)
        m_f = m_i & (b_x == b_x) & (tl.abs(b_x) != float("inf"))
        b_lo = tl.minimum(b_lo, tl.where(m_f, b_x, float("inf")))
        b_hi = tl.maximum(b_hi, tl.where(m_f, b_x, float("-inf")))
    i_o = i_c * n_chunks + i_k
    tl.store(part_ptr + i_o, tl.min(b_lo, 0))
    tl.store(part_ptr + tl.num_programs(0) * n_chunks + i_o, tl.max(b_hi, 0))


@triton.jit
def _grid_kernel(
    x_ptr, part_ptr, out_ptr, n, h, w, stride_c, stride_h, stride_w, n_chunks,
    cols, th, tw, kh, kw, H, W, background,
    WIDE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[Y, X] for the pixels of grid cell i_t (map i_t; its right/bottom separators too):
    m = mean of the finite x[c, y0:y1, x0:x1] (adaptive-avg-pool window), then
    floor((m - lo) * (255 / (hi - lo)) + 0.5) in fp64, clamped; 128 if lo == hi, 0 if the
    window has no finite pixel; ``background`` off the tiles."""
    i_t = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    acc = tl.float64 if WIDE else tl.float32
    on_map = i_t < n
    c = tl.minimum(i_t, n - 1)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < n_chunks
    lo = tl.min(tl.load(part_ptr + c * n_chunks + o_k, mask=m_k, other=float("inf")), 0)
    p_hi = part_ptr + n * n_chunks + c * n_chunks + o_k
    hi = tl.max(tl.load(p_hi, mask=m_k, other=float("-inf")), 0)
    lo = lo.to(tl.float64)
    hi = hi.to(tl.float64)
    scale = 255.0 / tl.where(hi > lo, hi - lo, 1.0)

    cell_w = tw + 1
    o_p = i_b * BLOCK + tl.arange(0, BLOCK)
    yy = o_p // cell_w  # pixel row and column inside the cell
    xx = o_p % cell_w
    o_y = (i_t // cols) * (th + 1) + yy
    o_x = (i_t % cols) * cell_w + xx
    m_out = (yy < th + 1) & (o_y < H) & (o_x < W)
    m_tile = m_out & (yy < th) & (xx < tw) & on_map
    y0 = yy * h // th
    y1 = ((yy + 1) * h + th - 1) // th
    x0 = xx * w // tw
    x1 = ((xx + 1) * w + tw - 1) // tw
    p_c = x_ptr + c * stride_c
    b_sum = tl.zeros((BLOCK,), acc)
    b_cnt = tl.zeros((BLOCK,), tl.int32)
    for k in range(0, kh * kw):
        y = y0 + k // kw
        x = x0 + k % kw
        m_w = m_tile & (y < y1) & (x < x1)
        b_x = tl.load(p_c + y * stride_h + x * stride_w, mask=m_w, other=0).to(acc)
        m_f = m_w & (b_x == b_x) & (tl.abs(b_x) != float("inf"))
        b_sum += tl.where(m_f, b_x, 0.0)
        b_cnt += m_f.to(tl.int32)
    mean = b_sum.to(tl.float64) / tl.maximum(b_cnt, 1).to(tl.float64)
    q = tl.floor((mean - lo) * scale + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 255.0)
    q = tl.where(hi == lo, 128.0, q)
    q = tl.where(b_cnt > 0, q, 0.0)
    q = tl.where(m_tile, q, background)
    tl.store(out_ptr + o_y * W + o_x, q.to(tl.uint8), mask=m_out)


def thumbnail_triton(
    maps: torch.Tensor, rows, cols, th, tw, H, W, background, *, wide: bool
) -> torch.Tensor:
    """uint8 ``(H, W)`` image of ``maps`` ``(n, h, w)`` (any strides) on the given grid."""
    if maps.dtype in _FP8:  # exact in fp16; Triton's fp8e4nv loads need sm89+
        maps = maps.to(torch.float16)
    elif maps.dtype == torch.bool:
        maps = maps.view(torch.uint8)
    n, h, w = maps.shape
    hw = h * w
    n_chunks = max(1, min(triton.cdiv(hw, _MIN_CHUNK), _MAX_PROGRAMS // n))
    chunk = triton.cdiv(triton.cdiv(hw, n_chunks), _BLOCK) * _BLOCK
    n_chunks = triton.cdiv(hw, chunk)
    part = torch.empty(
        (2, n, n_chunks), dtype=torch.float64 if wide else torch.float32, device=maps.device
    )
    out = torch.empty((H, W), dtype=torch.uint8, device=maps.device)
    strides = maps.stride()
    flat = h == 1 or strides[1] == w * strides[2]
    kh = triton.cdiv(h, th) + (h % th != 0)  # longest pooling window, in input rows
    kw = triton.cdiv(w, tw) + (w % tw != 0)
    grid = (rows * cols, triton.cdiv((th + 1) * (tw + 1), _BLOCK))
    on_device = torch.cuda.device(maps.device) if maps.is_cuda else contextlib.nullcontext()
    with on_device:  # launch on the tensor's GPU, not the current one
        # fmt: off
        _minmax_kernel[(n, n_chunks)](
            maps, part, hw, w, *strides, chunk, n_chunks, flat, wide, _BLOCK
        )
        _grid_kernel[grid](
            maps, part, out, n, h, w, *strides, n_chunks, cols, th, tw, kh, kw, H, W,
            background, wide, _BLOCK, triton.next_power_of_2(n_chunks),
        )
        # fmt: on
    return out
