"""Videos for ``add_video``: tensorboardX 2.6.5's frame grid, encoded as a GIF with Pillow.

tensorboardX needs moviepy (and writes an image-less value without it); Pillow, already a
dependency, writes the same animated GIF that TensorBoard's image dashboard plays.
"""

from __future__ import annotations

import io
import math
import numbers

import numpy as np

from tbprobe.writer.image import scale_to_uint8
from tbprobe.writer.proto import summary_pb2
from tbprobe.writer.values import to_numpy

_VIDEO_LETTERS = "NTCHW"


def _check_dataformats(dataformats, shape, name: str) -> str:
    if not isinstance(dataformats, str):
        raise TypeError(
            f"dataformats: expected a string such as 'NTCHW', got {type(dataformats).__name__}"
        )
    fmt = dataformats.upper()
    if sorted(fmt) != sorted(_VIDEO_LETTERS):
        raise ValueError(
            f"dataformats: expected an ordering of the letters 'NTCHW' (e.g. 'NTHWC'), "
            f"got {dataformats!r}"
        )
    shape = tuple(shape)
    if len(shape) != 5:
        raise ValueError(f"{name}: dataformats {dataformats!r} needs a 5-D array, got {shape}")
    if 0 in shape:
        raise ValueError(f"{name}: empty video, shape {shape}")
    if shape[fmt.index("C")] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected 1, 3 or 4 channels on axis 'C' of {dataformats!r}, got {shape}"
        )
    return fmt


def video_grid_shape(n: int) -> tuple[int, int]:
    """``(rows, cols)`` of the video grid for ``n`` clips: ``n`` is padded with black clips to
    the next power of two, ``rows = 2 ** ((n.bit_length() - 1) // 2)``."""
    padded = n if n & (n - 1) == 0 else 1 << n.bit_length()
    rows = 1 << ((n.bit_length() - 1) // 2)
    return rows, padded // rows


def video_frames(array, dataformats: str = "NTCHW", name: str = "vid_tensor") -> np.ndarray:
    """Clips ``(N, T, C, H, W)`` (any order of those letters) as ``(T, rows*H, cols*W, C)``
    uint8 frames, the clips tiled row by row (`video_grid_shape`), scaled like images.

    Example: ``video_frames(np.random.rand(3, 5, 3, 8, 8)).shape`` -> ``(5, 8, 32, 3)``.
    """
    arr = to_numpy(array, name)
    fmt = _check_dataformats(dataformats, arr.shape, name)
    clips = scale_to_uint8(arr, name).transpose([fmt.index(c) for c in _VIDEO_LETTERS])
    n, t, c, h, w = clips.shape
    rows, cols = video_grid_shape(n)
    if rows * cols > n:
        black = np.zeros((rows * cols - n, t, c, h, w), np.uint8)
        clips = np.concatenate([clips, black])
    grid = clips.reshape(rows, cols, t, c, h, w).transpose(2, 0, 4, 1, 5, 3)  # (T, r, H, c, W, C)
    return np.ascontiguousarray(grid.reshape(t, rows * h, cols * w, c))


def _check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise TypeError(f"fps: expected a positive number, got {type(fps).__name__}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps: expected a positive finite number, got {fps}")
    return float(fps)


def _frame_duration_ms(fps: float) -> int:
    # GIF stores centiseconds (Pillow truncates ms to them): round to the nearest one, and to
    # at least 2, since browsers show shorter delays as 100 ms.
    return 10 * max(2, math.floor(100.0 / fps + 0.5))


def encode_gif(frames, fps: float = 4) -> bytes:
    """An endlessly looping animated GIF of ``frames`` (``(T, H, W, C)`` uint8, C in
    {1, 3, 4}) shown at ``fps`` frames per second (to the centisecond; 50 at most). Alpha is
    dropped; a frame with more than 256 colours is quantised (GIF's palette limit).

    Example: ``encode_gif(video_frames(clips), fps=8)``.
    """
    from PIL import Image

    fps = _check_fps(fps)
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3, 4) or arr.size == 0:
        raise ValueError(
            "frames: expected a non-empty (T, H, W, C) uint8 array with C in {1, 3, 4}, "
            f"got dtype {arr.dtype} shape {arr.shape}"
        )
    arr = arr[..., 0] if arr.shape[3] == 1 else arr[..., :3]
    images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in arr]
    out = io.BytesIO()
    images[0].save(
        out,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=_frame_duration_ms(fps),
        loop=0,
    )
    return out.getvalue()


def video_value(
    tag: str, array, fps: float = 4, dataformats: str = "NTCHW", name: str = "vid_tensor"
) -> summary_pb2.Summary.Value:
    """A ``Summary.Value`` whose image is the animated GIF of ``array`` (``(N, T, C, H, W)``,
    see `video_frames`), ``fps`` frames per second.

    Example: ``video_value("clip", torch.rand(2, 16, 3, 32, 32), fps=8)``.
    """
    fps = _check_fps(fps)
    frames = video_frames(array, dataformats, name)
    _, h, w, c = frames.shape
    image = summary_pb2.Summary.Image(
        height=h, width=w, colorspace=c, encoded_image_string=encode_gif(frames, fps)
    )
    return summary_pb2.Summary.Value(tag=tag, image=image)
