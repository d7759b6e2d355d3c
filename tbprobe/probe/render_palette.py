"""The colours of a rendered thumbnail, and its PNG encoding.

Every picture ``render`` draws uses one 256-colour :func:`palette`: ``LEVELS`` entries of a
viridis-like colormap (a LUT interpolated linearly from nine viridis anchor colours), then
white, ink and grid grey. A picture is a 2-D array of indices into it, which
:func:`encode_indexed_png` writes as an 8-bit palette PNG, half the bytes of RGB.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

# viridis at 0, 1/8, ..., 1 (sRGB); the LUT interpolates linearly between them
_ANCHORS = (
    (0x44, 0x01, 0x54), (0x47, 0x2C, 0x7A), (0x3B, 0x51, 0x8B), (0x2C, 0x71, 0x8E),
    (0x21, 0x90, 0x8D), (0x27, 0xAD, 0x81), (0x5C, 0xC8, 0x63), (0xAA, 0xDC, 0x32),
    (0xFD, 0xE7, 0x25),
)  # fmt: skip
LEVELS = 253  # colormap entries; the last three palette slots are white, ink and grid lines
WHITE, INK, GRID = LEVELS, LEVELS + 1, LEVELS + 2  # palette indices
_UI_COLORS = ((255, 255, 255), (20, 20, 20), (190, 190, 190))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """The ``(256, 3)`` uint8 palette of every rendered picture: ``LEVELS`` viridis-like
    colormap entries (interpolated from nine viridis anchors), then white, ink, grid grey."""
    anchors = np.asarray(_ANCHORS, np.float64)  # (9, 3)
    x = np.linspace(0, len(anchors) - 1, LEVELS)
    lut = np.stack([np.interp(x, np.arange(len(anchors)), anchors[:, c]) for c in range(3)], 1)
    return _frozen(np.concatenate([np.rint(lut), _UI_COLORS]).astype(np.uint8))


@functools.lru_cache(maxsize=1)
def _grey_to_index() -> np.ndarray:
    return _frozen(np.rint(np.arange(256) * ((LEVELS - 1) / 255)).astype(np.uint8))  # (256,)


def colormap() -> np.ndarray:
    """The ``(256, 3)`` uint8 colour of each grey level of a device thumbnail.

    Example: ``colormap()[0]`` -> ``[68, 1, 84]`` (dark purple), ``colormap()[255]`` yellow.
    """
    return palette()[_grey_to_index()]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_indexed_png(index: np.ndarray, colors: np.ndarray | None = None) -> bytes:
    """PNG bytes (colour type 3) of ``index`` ``(H, W)`` uint8 into ``colors`` ``(K, 3)`` uint8,
    K <= 256 (default :func:`palette`). Same encoder choices as ``writer.image.encode_png``:
    "Up" row filter, zlib level 1.

    Example: ``encode_indexed_png(np.zeros((4, 4), np.uint8))`` -> a 4x4 dark-purple PNG.
    """
    colors = palette() if colors is None else colors
    if not isinstance(index, np.ndarray) or index.dtype != np.uint8 or index.ndim != 2:
        raise ValueError("index: expected a 2-D uint8 numpy array")
    if index.size == 0:
        raise ValueError(f"index: expected a non-empty image, got shape {index.shape}")
    if not isinstance(colors, np.ndarray) or colors.dtype != np.uint8 or colors.ndim != 2:
        raise ValueError("colors: expected a (K, 3) uint8 numpy array")
    if colors.shape[1] != 3 or not 1 <= len(colors) <= 256 or index.max() >= len(colors):
        raise ValueError(f"colors: {colors.shape} does not cover indices up to {index.max()}")
    h, w = index.shape
    filtered = np.empty((h, w + 1), np.uint8)  # one filter-type byte per row
    filtered[:, 0] = 2  # "Up"
    filtered[0, 1:] = index[0]
    np.subtract(index[1:], index[:-1], out=filtered[1:, 1:])  # wraps mod 256, as PNG wants
    header = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", colors.tobytes()),
            _png_chunk(b"IDAT", zlib.compress(filtered, 1)),
            _png_chunk(b"IEND", b""),
        )
    )
