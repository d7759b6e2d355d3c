"""Images for ``add_image``, ``add_images`` and ``add_figure`` (boxes are in ``boxes``).

Pixels follow tensorboardX 2.6.5, made total: ``uint8`` is taken as is; every other dtype is
multiplied by 255 in its own float dtype (bf16/fp8 in fp32, never fp16), NaN becomes 0, the
result is clipped to [0, 255] and truncated toward zero. Integers and bool therefore saturate
to 0 or 255. (tensorboardX does not clip: out-of-range values wrap or are undefined there.)

Layouts: ``HW`` is grayscale, ``CHW`` (any order of the letters) a single image, ``NCHW`` a grid
of 8 columns, no padding, unused cells black. Grayscale stays one channel (tensorboardX triples
it; the PNG decodes to the same pixels and is a third of the size).

Every function here has a numpy form and, where a device tensor may arrive, a torch twin that
stays on the tensor's device and never synchronises with it.
"""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np

from tbprobe.writer.proto import summary_pb2
from tbprobe.writer.values import is_tensor, to_numpy, widen_tensor

_CANONICAL = {2: "HW", 3: "HWC", 4: "NCHW"}  # target letter order per rank
_GRID_COLUMNS = 8
_CHANNELS = (1, 2, 3, 4)  # gray, gray + alpha, RGB, RGBA
# PNG: "Up" filter on every row and zlib level 1. Measured on 512x512 RGB: noise ~19 ms
# (Pillow's default encoder ~40 ms; its adaptive filter choice alone costs ~20 ms at any level),
# a photo 13 ms for +5% bytes vs Pillow's 77 ms; Z_RLE was faster on noise but 12x bigger on
# gradients.
_PNG_LEVEL = 1
_PNG_FILTER_UP = 2
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # gray, gray + alpha, RGB, RGBA; 8 bits a sample
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- scaling


def scale_to_uint8(array: np.ndarray, name: str = "img_tensor") -> np.ndarray:
    """Elementwise image scaling of a numeric numpy array to ``uint8``, same shape.

    ``uint8`` passes through; floats become ``trunc(clip(x * 255, 0, 255))`` computed in their
    own dtype with NaN as 0; integers and bool become 255 where ``x > 0``, else 0.

    Example: ``scale_to_uint8(np.array([0.5, 2.0, np.nan]))`` -> ``[127, 255, 0]``.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "biu":
        return np.where(array > 0, np.uint8(255), np.uint8(0))
    if array.dtype.kind != "f":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are handled next
        scaled = array * array.dtype.type(255)  # in the input's dtype, as tensorboardX does
    np.fmax(scaled, 0, out=scaled)  # fmax drops NaN
    np.minimum(scaled, 255, out=scaled)
    return scaled.astype(np.uint8)


def scale_to_uint8_torch(tensor, name: str = "img_tensor"):
    """The torch twin of `scale_to_uint8`: same bits, on the tensor's device, no sync.

    Example: ``scale_to_uint8_torch(torch.rand(3, 8, 8, device="cuda"))`` -> cuda ``uint8``.
    """
    torch = sys.modules["torch"]
    t = widen_tensor(tensor, name)  # bf16/fp8 -> fp32 exactly; unsigned -> int64/fp64
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        return (t > 0).to(torch.uint8) * 255
    return torch.nan_to_num(t * 255, nan=0.0).clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- layout


def _check_dataformats(dataformats, shape, name: str) -> str:
    """Upper-cased dataformats after checking it against ``shape`` (a host-side tuple)."""
    if not isinstance(dataformats, str):
        raise TypeError(
            f"dataformats: expected a string such as 'CHW', got {type(dataformats).__name__}"
        )
    fmt = dataformats.upper()
    canonical = _CANONICAL.get(len(fmt))
    if canonical is None or sorted(fmt) != sorted(canonical):
        raise ValueError(
            "dataformats: expected an ordering of the letters of 'HW', 'CHW' or 'NCHW' "
            f"(e.g. 'HWC', 'NHWC'), got {dataformats!r}"
        )
    shape = tuple(shape)
    if len(shape) != len(fmt):
        raise ValueError(
            f"{name}: dataformats {dataformats!r} needs a {len(fmt)}-D array, got shape {shape}"
        )
    if 0 in shape:
        raise ValueError(f"{name}: empty image, shape {shape}")
    if "C" in fmt and shape[fmt.index("C")] not in _CHANNELS:
        raise ValueError(
            f"{name}: expected 1, 2, 3 or 4 channels on axis 'C' of {dataformats!r}, got shape "
            f"{shape}"
        )
    return fmt


def _permute(x, dims):
    return x.transpose(dims) if isinstance(x, np.ndarray) else x.permute(dims)


def _pad_first_axis(x, count: int):
    """``x`` with ``count`` zero entries appended along axis 0."""
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.zeros((count, *x.shape[1:]), x.dtype)])
    return sys.modules["torch"].cat([x, x.new_zeros((count, *x.shape[1:]))])


def grid_shape(n: int) -> tuple[int, int]:
    """``(rows, cols)`` of the ``add_images`` grid for ``n`` images: 8 columns at most."""
    cols = min(n, _GRID_COLUMNS)
    return -(-n // cols), cols


def _arrange(u8, fmt: str):
    """A uint8 array or tensor laid out as ``fmt`` -> ``(H, W, C)``; a batch becomes a grid."""
    x = _permute(u8, tuple(fmt.index(letter) for letter in _CANONICAL[len(fmt)]))
    if len(fmt) == 2:
        return x[:, :, None]
    if len(fmt) == 3:
        return x
    n, c, h, w = x.shape
    rows, cols = grid_shape(n)
    if rows * cols > n:
        x = _pad_first_axis(x, rows * cols - n)
    x = _permute(x.reshape(rows, cols, c, h, w), (0, 3, 1, 4, 2))  # (rows, H, cols, W, C)
    return x.reshape(rows * h, cols * w, c)


def _is_image_list(images, dataformats) -> bool:
    """A list or tuple with a per-image (3-letter) format, e.g. ``CHW``, is a batch of images;
    with a 4-letter format it is a nested array as any other."""
    stack = isinstance(images, (list, tuple)) and isinstance(dataformats, str)
    return stack and len(dataformats) == 3


def _stack_images(images, dataformats: str, name: str, scale, stack):
    """``images`` (a list of same-shaped images laid out as ``dataformats``), each scaled to
    uint8 by ``scale`` and stacked by ``stack``, and the batch's dataformats ``N...``."""
    if not images:
        raise ValueError(f"{name}: empty list of images")
    parts = [scale(item, f"{name}[{i}]") for i, item in enumerate(images)]
    shapes = [tuple(p.shape) for p in parts]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"{name}: images in a list must share one shape, got {sorted(set(shapes))}"
        )
    _check_dataformats(dataformats, shapes[0], f"{name}[0]")
    return stack(parts), "N" + dataformats


def _scale_numpy(item, name: str) -> np.ndarray:
    return scale_to_uint8(to_numpy(item, name), name)


def _scale_torch(item, name: str):
    if not is_tensor(item):
        raise TypeError(f"{name}: expected a torch tensor, got {type(item).__name__}")
    return scale_to_uint8_torch(item, name)


def to_uint8_hwc(array, dataformats: str = "CHW", name: str = "img_tensor") -> np.ndarray:
    """An image (or batch, as a grid) as a contiguous ``(H, W, C)`` uint8 array, C in
    {1, 2, 3, 4} (2 is gray + alpha).

    ``array``: numbers, numpy array or host tensor shaped by ``dataformats``: ``HW``,
    ``CHW``/``HWC`` (any order of the letters) or ``NCHW``/``NHWC`` (grid, see
    `images_to_uint8_hwc`). Values are scaled as `scale_to_uint8` says. The result never
    shares memory with ``array``.

    Example: ``to_uint8_hwc(np.random.rand(3, 32, 48)).shape`` -> ``(32, 48, 3)``.
    """
    arr = to_numpy(array, name)
    fmt = _check_dataformats(dataformats, arr.shape, name)
    # Always a fresh array: the writer may encode it later, after the caller reused its buffer.
    return np.array(_arrange(scale_to_uint8(arr, name), fmt), order="C", copy=True)


def images_to_uint8_hwc(array, dataformats: str = "NCHW", name: str = "img_tensor") -> np.ndarray:
    """A batch ``(N, C, H, W)`` (or ``NHWC`` ...) as one ``(rows*H, cols*W, C)`` uint8 grid.

    ``cols = min(N, 8)``, ``rows = ceil(N / cols)``, filled row by row, no padding between
    images, unused cells black. A list or tuple of same-sized images with a per-image
    ``dataformats`` (``CHW``, ``HWC``, ...) is stacked first, each scaled by its own dtype.

    Example: ``images_to_uint8_hwc(np.zeros((10, 3, 4, 5))).shape`` -> ``(8, 40, 3)``.
    """
    if _is_image_list(array, dataformats):  # each image scaled by its own dtype, then stacked
        array, dataformats = _stack_images(array, dataformats, name, _scale_numpy, np.stack)
    return to_uint8_hwc(array, dataformats, name)


def to_uint8_hwc_torch(tensor, dataformats: str = "CHW", name: str = "img_tensor"):
    """The torch twin of `to_uint8_hwc`: a contiguous ``(H, W, C)`` uint8 tensor on the input's
    device, bit-identical to the numpy result, with no host synchronisation. The result never
    shares memory with ``tensor``.

    Example: ``to_uint8_hwc_torch(torch.rand(3, 32, 48, device="cuda"))`` -> cuda ``(32, 48, 3)``.
    """
    if not is_tensor(tensor):
        raise TypeError(f"{name}: expected a torch tensor, got {type(tensor).__name__}")
    if tensor.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (got dtype {tensor.dtype})")
    fmt = _check_dataformats(dataformats, tensor.shape, name)
    out = _arrange(scale_to_uint8_torch(tensor, name), fmt).contiguous()
    if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        out = out.clone()  # uint8 input already in HWC order: never alias the caller's buffer
    return out


def images_to_uint8_hwc_torch(tensor, dataformats: str = "NCHW", name: str = "img_tensor"):
    """The torch twin of `images_to_uint8_hwc` (a list of tensors is stacked on their device).

    Example: ``images_to_uint8_hwc_torch(torch.rand(10, 3, 4, 5)).shape`` -> ``(8, 40, 3)``.
    """
    if _is_image_list(tensor, dataformats):
        if len({t.device for t in tensor if is_tensor(t)}) > 1:
            raise ValueError(f"{name}: the images in a list must be on one device")
        stack = sys.modules["torch"].stack
        tensor, dataformats = _stack_images(tensor, dataformats, name, _scale_torch, stack)
    return to_uint8_hwc_torch(tensor, dataformats, name)


# ----------------------------------------------------------------------------- PNG


def _check_hwc(hwc, name: str) -> np.ndarray:
    arr = to_numpy(hwc, name)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in _CHANNELS or arr.size == 0:
        raise ValueError(
            f"{name}: expected a non-empty (H, W, C) uint8 array with C in {{1, 2, 3, 4}}, "
            f"got dtype {arr.dtype} shape {tuple(arr.shape)}"
        )
    return arr


def _png_chunk(kind: bytes, data) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)))


def encode_png(hwc_uint8) -> bytes:
    """PNG bytes (8-bit gray, gray + alpha, RGB or RGBA) of a ``(H, W, C)`` uint8 image, C in
    {1, 2, 3, 4}.

    Fast rather than small: "Up" row filter and zlib level 1 (see ``_PNG_LEVEL``).

    Example: ``PIL.Image.open(io.BytesIO(encode_png(img)))`` gives back ``img``'s pixels.
    """
    img = _check_hwc(hwc_uint8, "hwc_uint8")
    h, w, c = img.shape
    rows = img.reshape(h, w * c)
    filtered = np.empty((h, w * c + 1), np.uint8)  # one filter-type byte per row
    filtered[:, 0] = _PNG_FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first one counts as zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps mod 256, as PNG wants
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPE[c], 0, 0, 0)
    idat = zlib.compress(filtered, _PNG_LEVEL)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", idat),
            _png_chunk(b"IEND", b""),
        )
    )


def image_value(tag: str, hwc_uint8) -> summary_pb2.Summary.Value:
    """A ``Summary.Value`` holding ``hwc_uint8`` (``(H, W, C)`` uint8) as a PNG image.

    Example: ``image_value("img", to_uint8_hwc(x)).image.colorspace`` -> ``3`` for RGB.
    """
    img = _check_hwc(hwc_uint8, "hwc_uint8")
    h, w, c = img.shape
    image = summary_pb2.Summary.Image(
        height=h, width=w, colorspace=c, encoded_image_string=encode_png(img)
    )
    return summary_pb2.Summary.Value(tag=tag, image=image)


# ----------------------------------------------------------------------------- figures


def _render_rgb(figure, close: bool) -> np.ndarray:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ImportError("add_figure needs matplotlib: pip install matplotlib") from None
    if not hasattr(figure, "set_canvas"):
        raise TypeError(f"figure: expected a matplotlib Figure, got {type(figure).__name__}")
    previous = figure.canvas
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()  # (H, W, 3)
    pyplot = sys.modules.get("matplotlib.pyplot")  # a figure pyplot never saw is not open there
    if close and pyplot is not None:
        pyplot.close(figure)
    elif not close:
        figure.set_canvas(previous)  # keep an interactive figure usable
    return rgb


def figure_to_hwc(figure, close: bool = True) -> np.ndarray:
    """A matplotlib figure rendered with Agg as a ``(H, W, 3)`` uint8 array; a list of
    same-sized figures as a grid (`images_to_uint8_hwc`). ``close`` closes them in pyplot.

    Example: ``figure_to_hwc(plt.figure(figsize=(2, 1), dpi=100)).shape`` -> ``(100, 200, 3)``.
    """
    if isinstance(figure, (list, tuple)):
        if not figure:
            raise ValueError("figure: empty list of figures")
        images = [_render_rgb(f, close) for f in figure]
        if len({im.shape for im in images}) != 1:
            shapes = sorted({im.shape for im in images})
            raise ValueError(f"figure: figures in a list must have one size, got {shapes}")
        return images_to_uint8_hwc(np.stack(images), "NHWC", "figure")
    return _render_rgb(figure, close)
