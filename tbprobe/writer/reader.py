"""Reading event files back: records, CRC checks, truncated tails.

Used by the tests and the CLI, and independent of TensorBoard's own readers.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator

from tbprobe.writer.proto import event_pb2
from tbprobe.writer.record import FOOTER_SIZE, HEADER_SIZE, masked_crc

_ERRORS = ("raise", "warn", "ignore")


class EventFileError(Exception):
    """A damaged event file: ``path``, the byte ``offset`` of the bad record, and ``reason``."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"{path}: {reason} at byte offset {offset}")
        self.path = path
        self.offset = offset
        self.reason = reason


def _report(err: EventFileError, errors: str) -> None:
    if errors == "raise":
        raise err
    if errors == "warn":
        warnings.warn(str(err), RuntimeWarning, stacklevel=3)


def iter_records(path: str, errors: str = "warn") -> Iterator[bytes]:
    """Yield the data of each whole, CRC-valid record of one event file.

    A truncated tail (a file still being written, or a killed writer) or a CRC failure ends
    the file; it is reported as an :class:`EventFileError` with the path and offset, raised
    (``errors="raise"``), warned about (``"warn"``, the default) or ignored (``"ignore"``).
    """
    if errors not in _ERRORS:
        raise ValueError(f"errors: expected one of {_ERRORS}, got {errors!r}")
    with open(path, "rb") as f:  # opened now: a missing file raises here, not at iteration
        data = f.read()
    return _records(path, data, errors)


def _records(path: str, data: bytes, errors: str) -> Iterator[bytes]:
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < HEADER_SIZE:
            _report(EventFileError(path, offset, "truncated record header"), errors)
            return
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc(header) != length_crc:
            _report(EventFileError(path, offset, "record length CRC mismatch"), errors)
            return
        body_end = offset + HEADER_SIZE + length
        if body_end + FOOTER_SIZE > end:
            _report(EventFileError(path, offset, "truncated record"), errors)
            return
        body = data[offset + HEADER_SIZE : body_end]
        (body_crc,) = struct.unpack("<I", data[body_end : body_end + FOOTER_SIZE])
        if masked_crc(body) != body_crc:
            _report(EventFileError(path, offset, "record data CRC mismatch"), errors)
            return
        yield body
        offset = body_end + FOOTER_SIZE


def event_files(path: str, recursive: bool = False) -> list[str]:
    """Event files of a run directory (sorted by name, i.e. creation time), or ``[path]``."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path_or_dir: no such file or directory: {path!r}")
    found = []
    if recursive:
        for root, _dirs, files in os.walk(path):
            found += [os.path.join(root, f) for f in files if "tfevents" in f]
    else:
        found = [os.path.join(path, f) for f in os.listdir(path) if "tfevents" in f]
    return sorted(found)


def read_events(
    path_or_dir: str, *, recursive: bool = False, errors: str = "warn"
) -> Iterator[event_pb2.Event]:
    """Yield the ``Event`` protos of one event file or of every event file in a run directory.

    Damage is reported with the file and offset (see :func:`iter_records`). A bad ``errors``
    or a missing path raises at the call, not at the first iteration.

    Example::

        for event in read_events("runs/exp"):
            for value in event.summary.value:
                print(event.step, value.tag, value.simple_value)
    """
    if errors not in _ERRORS:
        raise ValueError(f"errors: expected one of {_ERRORS}, got {errors!r}")
    paths = event_files(os.fspath(path_or_dir), recursive)
    return _events(paths, errors)


def _events(paths: list[str], errors: str) -> Iterator[event_pb2.Event]:
    for path in paths:
        for data in iter_records(path, errors):
            yield event_pb2.Event.FromString(data)
