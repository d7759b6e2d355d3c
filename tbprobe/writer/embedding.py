"""Embedding projector files for ``add_embedding``, laid out as tensorboardX 2.6.5 writes them.

``<logdir>/<step:05d>/<encoded tag>/`` receives ``tensors.tsv`` (one row per point, values as
Python prints them), ``metadata.tsv`` (labels, or a header row and columns) and ``sprite.png``
(the label images on a square grid); an ``embeddings { ... }`` entry pointing at them is
appended to ``<logdir>/projector_config.pbtxt``, which the projector reads.

Differences from tensorboardX, all where it would write something broken: the tag is encoded
so that no tag can leave the log directory (``..``, NUL), the pbtxt entry is written with
``text_format`` (quotes in tags are escaped), everything is validated before any file is
written, a label containing a tab or newline raises instead of shifting every later row,
``uint8`` label images keep their values (tensorboardX multiplies them by 255 too) and the
sprite's unused area is black rather than uninitialised memory.
"""

from __future__ import annotations

import math
import os
import posixpath
import warnings

import numpy as np
from google.protobuf import text_format

from tbprobe.writer.image import encode_png
from tbprobe.writer.naming import _check_step as check_step
from tbprobe.writer.proto import projector_pb2
from tbprobe.writer.values import is_tensor, to_numpy

MAX_SPRITE_SIZE = 8192  # the projector frontend's limit on the sprite's side, in pixels
CONFIG_NAME = "projector_config.pbtxt"
_MAX_NAME_BYTES = 255  # one path component on common file systems
_TSV_BREAKERS = ("\t", "\n", "\r")


def encode_tag(tag) -> str:
    """The directory name for ``tag``: tensorboardX's escapes (``%`` -> ``%25``, ``/`` ->
    ``%2f``, ``\\`` -> ``%5c``) plus ``NUL`` -> ``%00`` and ``.``/``..`` -> ``%2e``/``%2e%2e``,
    so the name is always one component inside its parent.

    Example: ``encode_tag("a/../b")`` -> ``"a%2f..%2fb"``.
    """
    if not isinstance(tag, str):
        raise TypeError(f"tag: expected a str, got {type(tag).__name__}")
    if not tag:
        raise ValueError("tag: must not be empty")
    name = tag.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")
    name = name.replace("\x00", "%00")
    if name in (".", ".."):
        name = name.replace(".", "%2e")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"tag: not encodable as UTF-8: {tag!r}") from None
    if size > _MAX_NAME_BYTES:
        raise ValueError(f"tag: too long for a directory name ({size} bytes encoded)")
    return name


def _check_step(global_step) -> int:
    """The step as every ``add_*`` takes it (``int(step)``, int64), None as 0; >= 0 here, as
    it names a directory."""
    step = check_step(global_step)
    if step is None:
        return 0
    if step < 0:
        raise ValueError(f"global_step: must be >= 0, got {step}")
    return step


def _check_mat(mat) -> np.ndarray:
    arr = to_numpy(mat, "mat")
    if arr.ndim != 2:
        raise ValueError(f"mat: expected shape (N, D), got {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"mat: must not be empty, got shape {tuple(arr.shape)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("mat: contains NaN or infinity")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)  # the projector parses numbers, not True/False
    return arr


def _cell(value, name: str) -> str:
    text = str(value)
    if any(c in text for c in _TSV_BREAKERS):
        raise ValueError(f"{name}: {text!r} contains a tab or line break")
    return text


def metadata_lines(metadata, count: int, metadata_header=None) -> list[str]:
    """The lines of ``metadata.tsv``: ``count`` labels, or a header row then ``count`` rows of
    ``len(metadata_header)`` columns. Cells are ``str()`` of each element.

    Example: ``metadata_lines([["a", 1]], 1, ["name", "id"])`` -> ``["name\\tid", "a\\t1"]``.
    """
    if is_tensor(metadata):
        metadata = to_numpy(metadata, "metadata")
    if isinstance(metadata, (str, bytes)) or not hasattr(metadata, "__len__"):
        raise TypeError(f"metadata: expected a sequence of labels, got {type(metadata).__name__}")
    if len(metadata) != count:
        raise ValueError(f"metadata: {len(metadata)} labels for {count} points in mat")
    if not metadata_header:
        return [_cell(x, f"metadata[{i}]") for i, x in enumerate(metadata)]
    if isinstance(metadata_header, str):
        raise TypeError("metadata_header: expected a sequence of column names, got str")
    header = [_cell(h, "metadata_header") for h in metadata_header]
    lines = ["\t".join(header)]
    for i, row in enumerate(metadata):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            raise TypeError(f"metadata[{i}]: expected a row of {len(header)} columns")
        if len(row) != len(header):
            raise ValueError(
                f"metadata[{i}]: {len(row)} columns, metadata_header has {len(header)}"
            )
        lines.append("\t".join(_cell(x, f"metadata[{i}]") for x in row))
    return lines


def sprite_image(label_img, count: int) -> np.ndarray:
    """The projector's sprite: ``(S, S, 3)`` uint8 from ``(N, C, H, W)`` images, C in {1, 3},
    square (``H == W``), laid out row-major on ``ceil(sqrt(N))`` columns.

    Float images are scaled by 255 (NaN -> 0), clipped and truncated; uint8 stays as is.

    Example: ``sprite_image(np.zeros((10, 3, 8, 8)), 10).shape`` -> ``(32, 32, 3)``.
    """
    imgs = to_numpy(label_img, "label_img")
    if imgs.ndim != 4:
        raise ValueError(f"label_img: expected shape (N, C, H, W), got {tuple(imgs.shape)}")
    n, c, h, w = imgs.shape
    if n != count:
        raise ValueError(f"label_img: {n} images for {count} points in mat")
    if c not in (1, 3):
        raise ValueError(f"label_img: expected 1 or 3 channels, got {c}")
    if h != w or h == 0:
        raise ValueError(f"label_img: images must be square and non-empty, got {h}x{w}")
    # Same float expression as tensorboardX, so both pick the same number of columns.
    cols = min(n, int(math.ceil((n * h * w) ** 0.5 / w)))
    rows = int(math.ceil(n / cols))
    side = cols * w
    if side > MAX_SPRITE_SIZE:
        raise ValueError(
            f"label_img: the sprite would be {side} pixels wide, over the projector's "
            f"{MAX_SPRITE_SIZE}; use fewer or smaller images"
        )
    if imgs.dtype != np.uint8:
        scaled = imgs.astype(np.float64) * 255.0
        np.nan_to_num(scaled, copy=False, nan=0.0)
        imgs = np.clip(scaled, 0, 255).astype(np.uint8)
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=1)
    sprite = np.zeros((side, side, 3), np.uint8)
    padded = np.zeros((rows * cols, h, w, 3), np.uint8)
    padded[:n] = imgs.transpose(0, 2, 3, 1)  # (N, H, W, 3)
    grid = padded.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4)  # (rows, H, cols, W, 3)
    sprite[: rows * h] = grid.reshape(rows * h, side, 3)
    return sprite


def _tensors_tsv(mat: np.ndarray) -> str:
    # str() of Python scalars, exactly what tensorboardX writes (float32 widened to float64).
    return "".join("\t".join(map(str, row)) + "\n" for row in mat.tolist())


def write_embedding(
    logdir,
    mat,
    metadata=None,
    label_img=None,
    global_step=None,
    tag: str = "default",
    metadata_header=None,
    write: bool = True,
) -> str:
    """Write one embedding for the projector and register it in ``projector_config.pbtxt``.

    ``mat`` is ``(N, D)``, finite; ``metadata`` N labels (or N rows with ``metadata_header``);
    ``label_img`` ``(N, C, H, W)`` with ``H == W``; ``global_step`` an int >= 0 (None is 0).
    Returns the directory written, ``<logdir>/<step:05d>/<encode_tag(tag)>``. An existing
    directory (same step and tag) is overwritten with a warning, as in tensorboardX. With
    ``write=False`` everything is checked and nothing is written (``write_to_disk=False``).

    Example: ``write_embedding("runs/a", np.random.randn(100, 5), metadata=list(range(100)))``.
    """
    step = _check_step(global_step)
    name = encode_tag(tag)
    data = _check_mat(mat)
    count = data.shape[0]
    lines = None if metadata is None else metadata_lines(metadata, count, metadata_header)
    sprite = None
    if label_img is not None:
        imgs = to_numpy(label_img, "label_img")
        sprite = sprite_image(imgs, count)
        image_dim = [imgs.shape[3], imgs.shape[2]]  # W, H

    logdir = os.fspath(logdir)
    subdir = posixpath.join(f"{step:05d}", name)
    save_path = os.path.join(logdir, f"{step:05d}", name)
    if not write:
        return save_path
    root = os.path.realpath(logdir)
    if os.path.commonpath([root, os.path.realpath(save_path)]) != root:  # a symlinked step dir
        raise ValueError(f"tag: {tag!r} at step {step} leads outside logdir")
    if os.path.isdir(save_path):
        warnings.warn(
            f"add_embedding: {save_path} exists and is overwritten; pass a new global_step "
            "or tag for each embedding",
            stacklevel=2,
        )
    os.makedirs(save_path, exist_ok=True)

    info = projector_pb2.EmbeddingInfo(
        tensor_name=f"{tag}:{step:05d}", tensor_path=posixpath.join(subdir, "tensors.tsv")
    )
    if lines is not None:
        with open(os.path.join(save_path, "metadata.tsv"), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        info.metadata_path = posixpath.join(subdir, "metadata.tsv")
    if sprite is not None:
        with open(os.path.join(save_path, "sprite.png"), "wb") as f:
            f.write(encode_png(sprite))
        info.sprite.image_path = posixpath.join(subdir, "sprite.png")
        info.sprite.single_image_dim.extend(image_dim)
    with open(os.path.join(save_path, "tensors.tsv"), "w", encoding="utf-8") as f:
        f.write(_tensors_tsv(data))
    entry = text_format.MessageToString(projector_pb2.ProjectorConfig(embeddings=[info]))
    with open(os.path.join(logdir, CONFIG_NAME), "a", encoding="utf-8") as f:
        f.write(entry)
    return save_path
