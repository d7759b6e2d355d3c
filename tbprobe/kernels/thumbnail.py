"""Activation thumbnails: a small uint8 grayscale image of a tensor, computed on its device.

Every kind reduces to a stack of ``n`` 2-D maps ``(n, h, w)`` laid out on a grid:

- ``"conv"`` ``(B, C, H, W)``: the first ``min(C, max_tiles)`` channels of batch item ``sample``;
- ``"attention"`` ``(B, heads, T, S)``: the first ``min(heads, max_tiles)`` heads, the same way;
- ``"sequence"`` ``(B, T, D)``: one token × feature map of batch item ``sample``;
- ``"heatmap"`` ``(H, W)``: the tensor itself.

``kind="auto"`` looks at ``x.ndim`` only: 2 -> heatmap, 3 -> sequence, 4 -> conv.

Layout (a function of shapes and arguments only, see :func:`thumbnail_shape`): ``n`` tiles go
on ``rows × cols`` cells with ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)``, row-major,
with ``sep = 1`` pixel between cells. A cell holds at most ``cap_h = (max_size -
(rows-1)*sep) // rows`` by ``cap_w = (max_size - (cols-1)*sep) // cols`` pixels, and at most
``tile`` a side. Tiles are never enlarged. Single maps (sequence, heatmap) shrink each side
on its own: ``th = min(h, cap_h)``, ``tw = min(w, cap_w)``. Grid maps (conv, attention) keep
their aspect ratio: if ``h > cap_h`` or ``w > cap_w``, the binding side takes its cap and the
other ``max(1, other * cap // side)``. The image is ``rows*th + (rows-1)*sep`` by
``cols*tw + (cols-1)*sep``, at most ``max_size`` per side.

Pixels: a tile pixel is the mean of the *finite* input pixels in its adaptive-average-pooling
window (rows ``floor(i*h/th)`` to ``ceil((i+1)*h/th)``, likewise columns), accumulated in
fp32 (fp64 for fp64/int32/int64 input). It is scaled with its map's finite min ``lo`` and max
``hi`` taken over the full-resolution map: ``floor((m - lo) * (255 / (hi - lo)) + 0.5)`` in
fp64, clamped to 0..255. A map whose finite values are all equal is mid-grey (128); a window
with no finite pixel (NaN/±Inf only) is black (0). Separators and unused cells are
``background`` (default 255, white).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from tbprobe.kernels.dispatch import use_triton

__all__ = ["KINDS", "grid_shape", "thumbnail", "thumbnail_reference", "thumbnail_shape"]

KINDS = ("auto", "conv", "attention", "sequence", "heatmap")
SEP = 1  # pixels between grid cells
CONSTANT_GREY = 128  # value of a map whose finite values are all equal
_NDIM = {"conv": 4, "attention": 4, "sequence": 3, "heatmap": 2}
_AUTO = {2: "heatmap", 3: "sequence", 4: "conv"}
_WIDE = (torch.float64, torch.int32, torch.int64)  # accumulate these in fp64


def grid_shape(n_tiles: int) -> tuple[int, int]:
    """``(rows, cols)`` of the grid for ``n_tiles`` tiles: ``cols = ceil(sqrt(n))``,
    ``rows = ceil(n / cols)``. 1 -> (1, 1), 3 -> (2, 2), 16 -> (4, 4), 64 -> (8, 8)."""
    if n_tiles < 1:
        raise ValueError(f"n_tiles: expected at least 1, got {n_tiles}")
    cols = math.isqrt(n_tiles - 1) + 1
    return -(-n_tiles // cols), cols


def _resolve_kind(shape, kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    ndim = len(shape)
    if kind == "auto":
        if ndim not in _AUTO:
            raise ValueError(
                f"x: expected a 2-D heatmap, 3-D (B, T, D) or 4-D (B, C, H, W) tensor, "
                f"got shape {tuple(shape)}"
            )
        return _AUTO[ndim]
    if ndim != _NDIM[kind]:
        raise ValueError(f"x: kind={kind!r} expects a {_NDIM[kind]}-D tensor, got {tuple(shape)}")
    return kind


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: expected at least {low}, got {value}")


def _layout(shape, kind, max_tiles, tile, max_size):
    """(kind, n, h, w, rows, cols, th, tw, H, W) from the shape and arguments alone; cached,
    as a thumbnail per step of the same activation repeats its arguments."""
    try:
        return _layout_cached(shape, kind, max_tiles, tile, max_size)
    except TypeError:  # an unhashable argument: computed again, to raise the naming error
        return _compute_layout(shape, kind, max_tiles, tile, max_size)


def _compute_layout(shape, kind, max_tiles, tile, max_size):
    kind = _resolve_kind(shape, kind)
    _check_int("max_tiles", max_tiles)
    _check_int("max_size", max_size)
    if tile is not None:
        _check_int("tile", tile)
    if any(d == 0 for d in shape):
        raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(shape)}")
    if kind in ("conv", "attention"):
        n, h, w = min(shape[1], max_tiles), shape[2], shape[3]
    else:
        n, h, w = 1, shape[-2], shape[-1]
    rows, cols = grid_shape(n)
    cap_h = (max_size - (rows - 1) * SEP) // rows
    cap_w = (max_size - (cols - 1) * SEP) // cols
    if min(cap_h, cap_w) < 1:
        raise ValueError(
            f"max_size: {max_size} pixels cannot hold a {rows}x{cols} grid; "
            f"raise max_size or lower max_tiles"
        )
    if tile is not None:
        cap_h, cap_w = min(cap_h, tile), min(cap_w, tile)
    th, tw = _tile_size(h, w, cap_h, cap_w, keep_aspect=kind in ("conv", "attention"))
    H, W = rows * th + (rows - 1) * SEP, cols * tw + (cols - 1) * SEP
    return kind, n, h, w, rows, cols, th, tw, H, W


# typed: True == 1 and 2.0 == 2 as keys, but bools and floats must still be refused
_layout_cached = functools.lru_cache(maxsize=512, typed=True)(_compute_layout)


def _tile_size(h, w, cap_h, cap_w, keep_aspect):
    if not keep_aspect or (h <= cap_h and w <= cap_w):
        return min(h, cap_h), min(w, cap_w)
    if h * cap_w >= w * cap_h:  # h / cap_h >= w / cap_w: the height binds
        return cap_h, max(1, w * cap_h // h)
    return max(1, h * cap_w // w), cap_w


def thumbnail_shape(shape, *, kind="auto", max_tiles=64, tile=None, max_size=512):
    """``(H, W)`` of ``thumbnail(x)`` for a tensor of ``shape``, without touching data.

    Example::

        thumbnail_shape((32, 256, 56, 56))  # (455, 455): 8x8 tiles of 56x56 + separators
        thumbnail_shape((8, 12, 224, 224))  # (383, 511): 3x4 tiles of 127x127
    """
    return _layout(tuple(shape), kind, max_tiles, tile, max_size)[-2:]


def _check_sample(x: torch.Tensor, kind: str, sample) -> None:
    if kind == "heatmap":
        return
    _check_int("sample", sample, low=-x.shape[0])
    if sample >= x.shape[0]:
        raise ValueError(f"sample: batch item {sample} is out of range for batch {x.shape[0]}")


def _maps(x: torch.Tensor, kind: str, n: int, sample: int) -> torch.Tensor:
    """The ``(n, h, w)`` maps to draw: a view of ``x``, no copy."""
    if kind == "heatmap":
        return x.unsqueeze(0)
    _check_sample(x, kind, sample)
    if kind == "sequence":
        return x[sample].unsqueeze(0)
    return x[sample, :n]


def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"x: complex tensors are not supported (got {x.dtype})")


def _check_background(background) -> None:
    _check_int("background", background, low=0)
    if background > 255:
        raise ValueError(f"background: expected 0..255, got {background}")


def _prepare(x, kind, max_tiles, tile, max_size, sample, background):
    _check_x(x)
    _check_background(background)
    layout = _layout(tuple(x.shape), kind, max_tiles, tile, max_size)
    return _maps(x.detach(), layout[0], layout[1], sample), layout


def thumbnail_reference(
    x: torch.Tensor,
    *,
    kind: str = "auto",
    max_tiles: int = 64,
    tile: int | None = None,
    max_size: int = 512,
    sample: int = 0,
    background: int = 255,
) -> torch.Tensor:
    """Pure-torch :func:`thumbnail`: same arguments and result (within 1 grey level where the
    fp32 window sums round differently), on ``x``'s device, with no host sync."""
    maps, (_, n, h, w, rows, cols, th, tw, _, _) = _prepare(
        x, kind, max_tiles, tile, max_size, sample, background
    )
    acc = torch.float64 if maps.dtype in _WIDE else torch.float32
    maps = maps.to(acc)  # (n, h, w)
    finite = torch.isfinite(maps)
    lo = torch.where(finite, maps, math.inf).amin((1, 2)).double()[:, None, None]  # (n, 1, 1)
    hi = torch.where(finite, maps, -math.inf).amax((1, 2)).double()[:, None, None]
    # Window means of the finite-masked values and of the mask: their ratio is
    # sum(finite values) / count(finite values), NaN where the window has none.
    total = F.adaptive_avg_pool2d(torch.where(finite, maps, 0.0), (th, tw))  # (n, th, tw)
    count = F.adaptive_avg_pool2d(finite.to(acc), (th, tw))
    mean = (total / count).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo)  # not `255.0 / t`: that is 255 * (1 / t)
    q = torch.floor((mean - lo) * scale + 0.5).clamp_(0, 255)
    q = torch.where(hi == lo, float(CONSTANT_GREY), q)
    q = torch.where(count > 0, q, 0.0).to(torch.uint8)
    cells = torch.full(
        (rows * cols, th + SEP, tw + SEP), background, dtype=torch.uint8, device=maps.device
    )
    cells[:n, :th, :tw] = q
    grid = cells.view(rows, cols, th + SEP, tw + SEP).permute(0, 2, 1, 3)
    return grid.reshape(rows * (th + SEP), cols * (tw + SEP))[: rows * (th + SEP) - SEP, :-SEP]


_TRITON_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # triton_thumbnail._FP8_DECODE's


def _triton_launcher(x: torch.Tensor):
    """``thumbnail_triton`` when this call should use Triton, else None (the reference)."""
    if not use_triton(x.device):
        return None
    from tbprobe.kernels.triton_thumbnail import thumbnail_triton  # lazy: import is slow

    return thumbnail_triton


def thumbnail(
    x: torch.Tensor,
    *,
    kind: str = "auto",
    max_tiles: int = 64,
    tile: int | None = None,
    max_size: int = 512,
    sample: int = 0,
    background: int = 255,
) -> torch.Tensor:
    """A uint8 grayscale ``(H, W)`` thumbnail of an activation, on ``x``'s device, no host sync.

    ``x``: ``(B, C, H, W)`` feature maps (``kind="conv"``), ``(B, heads, T, S)`` attention
    (``kind="attention"``), ``(B, T, D)`` sequence activations (``"sequence"``) or an
    ``(H, W)`` heatmap; any real dtype, any strides. ``kind="auto"`` picks from ``x.ndim``
    (2 heatmap, 3 sequence, 4 conv). Grid maps draw the first ``max_tiles`` channels/heads of
    batch item ``sample``; each tile is area-downsampled to at most ``tile`` pixels a side
    (default: as large as fits) so the image is at most ``max_size`` a side, and min-max
    scaled over its map's finite values (constant map: 128; all-NaN window: 0). The output
    shape is :func:`thumbnail_shape` of ``x.shape``; the module docstring gives the formulas.

    CUDA tensors use the Triton kernels, others the torch reference; ``TBPROBE_KERNELS=torch``
    or ``=triton`` forces one (read at each call).

    Example::

        img = thumbnail(torch.randn(8, 16, 32, 32))  # 4x4 tiles of 32x32: uint8 (131, 131)
    """
    _check_x(x)
    launch = _triton_launcher(x)
    if launch is None:
        return thumbnail_reference(
            x,
            kind=kind,
            max_tiles=max_tiles,
            tile=tile,
            max_size=max_size,
            sample=sample,
            background=background,
        )
    # The Triton path reads x in place through its strides: no view or detach per call.
    if x.is_neg():  # a lazily negated view (e.g. .conj().imag): its memory holds -x
        x = x.resolve_neg()
    if x.element_size() == 1 and x.is_floating_point() and x.dtype not in _TRITON_FP8:
        x = x.float()  # fp8 variants the kernel cannot decode (fnuz, e8m0): exact in fp32
    _check_background(background)
    layout = _layout(x.shape, kind, max_tiles, tile, max_size)
    _check_sample(x, layout[0], sample)
    return launch(x, layout, sample, background, wide=x.dtype in _WIDE)
