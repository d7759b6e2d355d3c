"""Boxes for ``add_image_with_boxes``: tensorboardX 2.6.5's red boxes and labels, drawn with
Pillow, then the optional ``rescale``.

As in tensorboardX: labels whose count differs from the boxes' are dropped with a warning (the
boxes are still drawn), and ``rescale`` resizes the drawn image (Lanczos), so boxes and labels
scale with it. Differences: a box with a NaN or infinite coordinate is skipped with a warning
(tensorboardX crashes in Pillow), a ``None`` label draws its box without a label, and the
``Summary.Image`` sizes are those of the rescaled image (tensorboardX keeps the original's).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings

import numpy as np

from tbprobe.writer.image import _check_hwc
from tbprobe.writer.values import to_numpy

# Pillow draws any finite coordinate up to ~3e9 but fails on text far beyond; boxes are
# axis-aligned, so clipping their corners to this never changes the visible pixels.
_MAX_COORD = float(1 << 24)
_MAX_PIXELS = 1 << 28  # the largest rescaled image (268 M pixels)


@functools.lru_cache(maxsize=1)
def _label_font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _check_labels(labels, count: int):
    """``count`` labels (str or None), or None: a label list of the wrong length is dropped
    with a RuntimeWarning, as tensorboardX does."""
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [labels]
    try:
        labels = list(labels)
    except TypeError:
        raise TypeError(
            f"labels: expected a list of strings, got {type(labels).__name__}"
        ) from None
    if not all(s is None or isinstance(s, str) for s in labels):
        raise TypeError("labels: expected a list of strings (or None for no label)")
    if len(labels) != count:
        warnings.warn(
            f"labels: {len(labels)} labels for {count} boxes; the boxes are drawn without labels",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return labels


def _check_rescale(rescale, height: int, width: int) -> tuple[int, int] | None:
    """The ``(width, height)`` after ``rescale`` (tensorboardX's ``int(size * rescale)``), or
    None when the size does not change."""
    if isinstance(rescale, bool) or not isinstance(rescale, numbers.Real):
        raise TypeError(f"rescale: expected a positive number, got {type(rescale).__name__}")
    factor = float(rescale)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"rescale: expected a positive finite number, got {rescale!r}")
    size = (int(width * factor), int(height * factor))
    if min(size) < 1 or size[0] * size[1] > _MAX_PIXELS:
        raise ValueError(
            f"rescale: {rescale!r} turns a {height}x{width} image into {size[1]}x{size[0]} "
            f"pixels; expected at least 1x1 and at most {_MAX_PIXELS} pixels"
        )
    return None if size == (width, height) else size


def draw_boxes(hwc_uint8, boxes, labels=None, rescale=1, name: str = "box_tensor") -> np.ndarray:
    """``hwc_uint8`` (``(H, W, C)`` uint8) with red boxes drawn on it, as a new uint8 array.

    ``boxes``: ``(N, 4)`` rows of ``(xmin, ymin, xmax, ymax)`` in pixels (rows with NaN or
    infinity are skipped with a RuntimeWarning); ``labels``: ``N`` strings or None (or one
    string when ``N == 1``) written in a red tag at each box's bottom-left; ``rescale``: the
    drawn image is resized by this factor. Gray comes back as RGB, gray + alpha as RGBA.

    Example: ``draw_boxes(img, [[10, 10, 40, 30]], labels=["cat"], rescale=2)``.
    """
    from PIL import Image, ImageDraw

    img = _check_hwc(hwc_uint8, "img_tensor")
    box_arr = to_numpy(boxes, name)
    if box_arr.ndim != 2 or box_arr.shape[1] != 4:
        raise ValueError(
            f"{name}: expected shape (N, 4) of (xmin, ymin, xmax, ymax), got {tuple(box_arr.shape)}"
        )
    box_arr = box_arr.astype(np.float64)
    texts = _check_labels(labels, box_arr.shape[0])
    new_size = _check_rescale(rescale, img.shape[0], img.shape[1])
    finite = np.isfinite(box_arr).all(axis=1)
    if not finite.all():
        warnings.warn(
            f"{name}: skipped {int((~finite).sum())} box(es) with NaN or infinite coordinates",
            RuntimeWarning,
            stacklevel=3,
        )
    np.clip(box_arr, -_MAX_COORD, _MAX_COORD, out=box_arr)
    canvas = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
    if canvas.mode in ("L", "LA"):
        canvas = canvas.convert("RGB" if canvas.mode == "L" else "RGBA")
    draw = ImageDraw.Draw(canvas)
    font = _label_font()
    for i, (left, top, right, bottom) in enumerate(box_arr.tolist()):
        if not finite[i]:
            continue
        outline = [(left, top), (left, bottom), (right, bottom), (right, top), (left, top)]
        draw.line(outline, width=2, fill="red")
        if not texts or not texts[i]:
            continue
        x0, y0, x1, y1 = font.getbbox(texts[i])
        text_w, text_h = x1 - x0, y1 - y0
        margin = math.ceil(0.05 * text_h)
        draw.rectangle([(left, bottom - text_h - 2 * margin), (left + text_w, bottom)], fill="red")
        draw.text((left + margin, bottom - text_h - margin), texts[i], fill="black", font=font)
    if new_size is not None:
        lanczos = getattr(Image, "Resampling", Image).LANCZOS  # Pillow < 9.1 has no Resampling
        canvas = canvas.resize(new_size, lanczos)
    return np.asarray(canvas).copy()
