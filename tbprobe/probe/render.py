"""Host-side rendering of a device thumbnail into an RGB image worth looking at.

The device sends a uint8 grayscale ``(H, W)`` thumbnail (``kernels.thumbnail``); its layout is
a function of the activation's shape and the thumbnail arguments only, so the host recovers
every tile from ``kernels.thumbnail.thumbnail_shape``/``grid_shape`` without metadata:

- ``conv`` ``(B, C, H, W)`` and ``attention`` ``(B, heads, T, S)``: a grid of tiles, each
  labelled with its channel index (``0, 1, …``) or head (``h0, h1, …``) above it;
- ``sequence`` ``(B, T, D)``: one token × feature heatmap with ticks in token/feature units;
- ``heatmap`` ``(H, W)``: the same, with row/column ticks.

The device scales each map to its own min..max, so colours compare within a tile, not across
tiles; a window with no finite value arrives as 0 and shows as the colormap's darkest colour.
Tiles are enlarged by an integer factor (nearest neighbour) when small and shrunk (nearest)
only when needed, so the result is at most ``max_side`` a side.

This module lays the picture out (tiles, labels, ticks, caption, colorbar) as indices into
the 256-colour palette of ``render_palette``, which colours it and encodes it:
:func:`render_snapshot_png` writes a palette PNG, half the bytes of RGB.
"""

from __future__ import annotations

import functools

import numpy as np

from tbprobe.kernels.thumbnail import KINDS, SEP, grid_shape, thumbnail_shape
from tbprobe.probe.render_palette import (
    GRID,
    INK,
    LEVELS,
    WHITE,
    _grey_to_index,
    colormap,
    encode_indexed_png,
    palette,
)

__all__ = [
    "colormap",
    "encode_indexed_png",
    "palette",
    "render_indexed",
    "render_snapshot",
    "render_snapshot_png",
]

_AUTO = {2: "heatmap", 3: "sequence", 4: "conv"}  # the rule of kernels.thumbnail kind="auto"
GAP = 2  # grid-line pixels between and around cells
PAD = 3  # text padding
TARGET_TILE = 96  # small tiles are enlarged up to about this many pixels a side
TARGET_MAP = 384  # small sequence/heatmap axes likewise
MIN_WIDTH = 240  # room for the caption under a small image


@functools.lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    load = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)  # bitmap font
    return load()


@functools.lru_cache(maxsize=2048)
def _text_mask(text: str) -> np.ndarray:
    """``(h, w)`` bool mask of ``text`` in the default bitmap font."""
    from PIL import Image, ImageDraw

    font = _font()
    _, _, w, h = font.getbbox(text)
    img = Image.new("L", (max(w, 1), max(h, 1)), 0)
    ImageDraw.Draw(img).text((0, 0), text, fill=255, font=font)
    mask = np.asarray(img) > 127
    mask.flags.writeable = False
    return mask


_LINE = _text_mask("0").shape[0]  # text line height in pixels (11 for the bitmap font)


def _clean(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def _fit(text: str, width: int) -> str:
    """``text``, cut with ``..`` to at most ``width`` pixels."""
    text = _clean(text)
    if _text_mask(text).shape[1] <= width:
        return text
    while text and _text_mask(text + "..").shape[1] > width:
        text = text[:-1]
    return text + ".." if text else ""


def _put(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, color=INK) -> None:
    """Paint ``mask`` at ``(y, x)``, clipped to the canvas."""
    h, w = canvas.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + mask.shape[0], h), min(x + mask.shape[1], w)
    if y1 > y0 and x1 > x0:
        region = canvas[y0:y1, x0:x1]
        region[mask[y0 - y : y1 - y, x0 - x : x1 - x]] = color


def _resample(a: np.ndarray, dh: int, dw: int) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes (an exact repeat for integer factors)."""
    rows = np.arange(dh) * a.shape[-2] // dh
    cols = np.arange(dw) * a.shape[-1] // dw
    return a[..., rows[:, None], cols[None, :]]


def _scale(length: int, avail: int, target: int) -> int:
    """Display pixels for ``length`` source pixels: an integer enlargement up to ``target``,
    or a reduction to ``avail`` when it does not fit."""
    if length > avail:
        return avail
    return length * max(1, min(avail, target) // length)


def _colorbar(canvas: np.ndarray, y: int, x: int, label: str) -> None:
    lo, hi = _text_mask("min"), _text_mask(f"max {label}")
    _put(canvas, lo, y, x)
    x += lo.shape[1] + PAD
    bar = np.linspace(0, LEVELS - 1, 64).astype(np.uint8)  # (64,) palette indices
    canvas[y + 2 : y + _LINE - 1, x : x + 64] = bar[None]
    _put(canvas, hi, y, x + 64 + PAD)


def _frame(body_h: int, body_w: int, title: str | None, caption: str, max_side: int):
    """A white canvas with the title above and the caption + colorbar below the body;
    returns ``(canvas, body_y, footer_y)``."""
    head = _LINE + 2 * PAD if title else 0
    foot = 2 * _LINE + 3 * PAD
    width = min(max(body_w, MIN_WIDTH), max_side)
    canvas = np.full((head + body_h + foot, width), WHITE, np.uint8)  # palette indices
    if title:
        _put(canvas, _text_mask(_fit(title, width - 2 * PAD)), PAD, PAD)
    _put(canvas, _text_mask(_fit(caption, width - 2 * PAD)), head + body_h + PAD, PAD)
    return canvas, head, head + body_h + _LINE + 2 * PAD


def _check(image, shape, kind, sample, max_side):
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image: expected a 2-D uint8 array, got {image.dtype} {image.shape}")
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise TypeError(f"shape: expected a tuple of positive ints, got {shape!r}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    for name, value, low in (("sample", sample, 0), ("max_side", max_side, 64)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name}: expected at least {low}, got {value}")


def render_indexed(
    image: np.ndarray,
    *,
    shape: tuple,
    kind: str,
    title: str | None = None,
    max_tiles: int = 64,
    tile: int | None = None,
    max_size: int = 512,
    sample: int = 0,
    max_side: int = 600,
) -> np.ndarray:
    """:func:`render_snapshot` as ``(H', W')`` uint8 indices into :func:`palette`.

    Example: ``palette()[render_indexed(img, shape=s, kind="conv")]`` is the RGB picture.
    """
    _check(image, shape, kind, sample, max_side)
    shape = tuple(shape)
    try:
        H, W = thumbnail_shape(shape, kind=kind, max_tiles=max_tiles, tile=tile, max_size=max_size)
    except ValueError as e:
        raise ValueError(f"shape: {str(e).removeprefix('x: ')}") from None
    kind = _AUTO[len(shape)] if kind == "auto" else kind
    if image.shape != (H, W):
        raise ValueError(
            f"image: a {kind} thumbnail of {shape} with max_tiles={max_tiles}, tile={tile}, "
            f"max_size={max_size} is {(H, W)}, got {image.shape}"
        )
    if kind in ("conv", "attention"):
        return _render_grid(image, shape, kind, title, min(shape[1], max_tiles), sample, max_side)
    return _render_map(image, shape, kind, title, sample, max_side)


def render_snapshot(
    image: np.ndarray,
    *,
    shape: tuple,
    kind: str,
    title: str | None = None,
    max_tiles: int = 64,
    tile: int | None = None,
    max_size: int = 512,
    sample: int = 0,
    max_side: int = 600,
) -> np.ndarray:
    """An RGB ``(H', W', 3)`` uint8 picture of the device thumbnail ``image`` (``(H, W)`` uint8).

    ``shape``, ``kind``, ``max_tiles``, ``tile``, ``max_size``: what ``kernels.thumbnail`` was
    called with for an activation of ``shape`` (``image.shape`` must equal
    ``thumbnail_shape(shape, ...)``); ``title``: e.g. the module name, drawn on top;
    ``sample``: the batch item shown, only printed; ``H'`` and ``W'`` are at most
    ``max_side``. Conv feature maps become a grid of channels labelled ``0, 1, …``,
    attention maps a grid of heads ``h0, h1, …``, sequence activations a token × feature
    heatmap with axis ticks; the shape and a colorbar go below.

    Example::

        img = kernels.thumbnail(x)  # x: (8, 32, 28, 28) -> uint8 (173, 173), a 6x6 grid
        rgb = render_snapshot(img.cpu().numpy(), shape=x.shape, kind="conv", title="conv1")
        rgb.shape  # (476, 350, 3): each side <= 600
    """
    index = render_indexed(
        image,
        shape=shape,
        kind=kind,
        title=title,
        max_tiles=max_tiles,
        tile=tile,
        max_size=max_size,
        sample=sample,
        max_side=max_side,
    )
    return palette()[index]


def render_snapshot_png(image: np.ndarray, **kwargs) -> bytes:
    """PNG bytes of :func:`render_snapshot` (same keywords), as an 8-bit palette PNG: it
    decodes to the same RGB pixels and is about half the size of an RGB PNG.

    Example: ``PIL.Image.open(io.BytesIO(render_snapshot_png(img, shape=s, kind="conv")))``.
    """
    return encode_indexed_png(render_indexed(image, **kwargs))


def _render_grid(image, shape, kind, title, n, sample, max_side):
    rows, cols = grid_shape(n)
    th = (image.shape[0] - (rows - 1) * SEP) // rows
    tw = (image.shape[1] - (cols - 1) * SEP) // cols
    padded = np.zeros((rows * (th + SEP), cols * (tw + SEP)), np.uint8)
    padded[: image.shape[0], : image.shape[1]] = image
    tiles = padded.reshape(rows, th + SEP, cols, tw + SEP).transpose(0, 2, 1, 3)
    tiles = tiles[:, :, :th, :tw].reshape(rows * cols, th, tw)[:n]  # (n, th, tw)

    labels = [f"h{i}" if kind == "attention" else str(i) for i in range(n)]
    label_w = max(_text_mask(s).shape[1] for s in labels)
    head = _LINE + 2 * PAD if title else 0
    fixed_h = head + 2 * _LINE + 3 * PAD + (rows + 1) * GAP
    avail_w = (max_side - (cols + 1) * GAP) // cols
    avail_h = (max_side - fixed_h) // rows
    strip = _LINE + 2  # a label strip above each tile, unless it would cost device pixels
    if min(avail_w, avail_h) < 1:
        raise ValueError(f"max_side: {max_side} pixels cannot hold a {rows}x{cols} grid")
    label_h = strip if min(avail_w / tw, (avail_h - strip) / th) >= 1 else 0
    factor = min(avail_w / tw, (avail_h - label_h) / th)
    if factor >= 1:
        k = max(1, min(int(factor), TARGET_TILE // max(th, tw)))
        dh, dw = th * k, tw * k
    else:
        dh, dw = max(1, int(th * factor)), max(1, int(tw * factor))
    if dw < label_w + 2:
        label_h = 0
    overlay = not label_h and dw >= label_w + 2 and dh >= 2 * strip  # label on the tile
    cells = _grey_to_index()[_resample(tiles, dh, dw)]  # (n, dh, dw) palette indices

    cell_h, cell_w = label_h + dh, dw
    body_h, body_w = rows * cell_h + (rows + 1) * GAP, cols * cell_w + (cols + 1) * GAP
    what = "heads" if kind == "attention" else "channels"
    caption = f"{kind} {shape}: {what} 0-{n - 1} of {shape[1]}, batch item {sample}"
    caption += ", query x key" if kind == "attention" else ""
    canvas, y0, foot_y = _frame(body_h, body_w, title, caption, max_side)
    x0 = (canvas.shape[1] - body_w) // 2
    canvas[y0 : y0 + body_h, x0 : x0 + body_w] = GRID
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        y, x = y0 + GAP + r * (cell_h + GAP), x0 + GAP + c * (cell_w + GAP)
        if i >= n:
            canvas[y : y + cell_h, x : x + cell_w] = WHITE  # unused cell
            continue
        canvas[y : y + label_h, x : x + cell_w] = WHITE
        canvas[y + label_h : y + cell_h, x : x + cell_w] = cells[i]
        if label_h or overlay:
            mask = _text_mask(labels[i])
            canvas[y : y + mask.shape[0] + 1, x : x + mask.shape[1] + 2] = WHITE
            _put(canvas, mask, y + 1, x + 1)
    _colorbar(canvas, foot_y, PAD, "(per tile)")
    return canvas


def _ticks(length: int, pixels: int) -> list[tuple[int, int]]:
    """``(index, pixel)`` pairs: up to 5 evenly spaced source indices and their centres."""
    k = max(2, min(5, length, pixels // 40 + 1))
    values = sorted({round(j * (length - 1) / (k - 1)) for j in range(k)})
    return [(v, min(pixels - 1, int((v + 0.5) * pixels / length))) for v in values]


def _render_map(image, shape, kind, title, sample, max_side):
    th, tw = image.shape
    length_y, length_x = shape[-2], shape[-1]
    name_y, name_x = ("token", "feature") if kind == "sequence" else ("row", "column")
    tick_w = max(_text_mask(str(v)).shape[1] for v in (0, length_y - 1))
    left = PAD + _LINE + PAD + tick_w + PAD + 3  # axis name, tick labels, tick marks
    bottom = 3 + _LINE + PAD + _LINE + PAD
    head = _LINE + 2 * PAD if title else 0
    avail_w = max_side - left - 2 * PAD
    avail_h = max_side - head - bottom - 2 * _LINE - 3 * PAD - PAD
    dh, dw = _scale(th, avail_h, TARGET_MAP), _scale(tw, avail_w, TARGET_MAP)
    body_h, body_w = PAD + dh + bottom, left + dw + 2 * PAD
    if kind == "sequence":
        caption = f"sequence {shape}: batch item {sample}, {length_y} tokens x {length_x} features"
    else:
        caption = f"heatmap {shape}"
    canvas, y0, foot_y = _frame(body_h, body_w, title, caption, max_side)
    x0 = (canvas.shape[1] - body_w) // 2
    my, mx = y0 + PAD, x0 + left  # top-left of the map
    canvas[my : my + dh, mx : mx + dw] = _grey_to_index()[_resample(image, dh, dw)]
    canvas[my - 1 : my + dh + 1, mx - 1] = GRID  # frame
    canvas[my - 1 : my + dh + 1, mx + dw] = GRID
    canvas[my - 1, mx - 1 : mx + dw + 1] = GRID
    canvas[my + dh, mx - 1 : mx + dw + 1] = GRID
    for value, p in _ticks(length_y, dh):
        canvas[my + p, mx - 4 : mx - 1] = INK
        mask = _text_mask(str(value))
        _put(canvas, mask, my + p - _LINE // 2, mx - 5 - mask.shape[1])
    for value, p in _ticks(length_x, dw):
        canvas[my + dh + 1 : my + dh + 4, mx + p] = INK
        mask = _text_mask(str(value))
        x = min(max(mx + p - mask.shape[1] // 2, x0), canvas.shape[1] - mask.shape[1])
        _put(canvas, mask, my + dh + 4, x)
    mask = _text_mask(name_x)
    _put(canvas, mask, my + dh + 4 + _LINE + PAD, mx + (dw - mask.shape[1]) // 2)
    mask = np.rot90(_text_mask(name_y))  # reads bottom to top
    _put(canvas, mask, my + (dh - mask.shape[0]) // 2, x0 + PAD)
    _colorbar(canvas, foot_y, PAD, "(of the map)")
    return canvas
