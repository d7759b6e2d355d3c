"""Reading event files back: records, CRC checks, truncated tails.

Used by the tests and the CLI, and independent of TensorBoard's own readers. Files are read
record by record, so memory stays bounded by the largest record, not the file.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator

from google.protobuf.message import DecodeError

from tbprobe.writer.proto import event_pb2
from tbprobe.writer.record import FOOTER_SIZE, HEADER_SIZE, masked_crc

_ERRORS = ("raise", "warn", "ignore")
_READ_BUFFER = 1 << 20  # bytes buffered per read() from the OS; records are sliced from it
NOT_AN_EVENT = "record is not an Event proto"


class EventFileError(Exception):
    """A damaged event file: ``path``, the byte ``offset`` of the bad record, and ``reason``.

    For a CRC failure, ``data_after`` is True when the file holds bytes after the bad record
    (damage inside the file, rather than a last record cut or garbled by a kill).
    """

    def __init__(self, path: str, offset: int, reason: str, *, data_after: bool = False):
        super().__init__(f"{path}: {reason} at byte offset {offset}")
        self.path = path
        self.offset = offset
        self.reason = reason
        self.data_after = data_after


class EventFileWarning(RuntimeWarning):
    """The warning form of an :class:`EventFileError` (``errors="warn"``); ``error`` is it."""

    def __init__(self, error: EventFileError):
        super().__init__(str(error))
        self.error = error


def _report(err: EventFileError, errors: str) -> None:
    if errors == "raise":
        raise err
    if errors == "warn":
        warnings.warn(EventFileWarning(err), stacklevel=3)


def iter_records(path: str, errors: str = "warn") -> Iterator[bytes]:
    """Yield the data of each whole, CRC-valid record of one event file.

    A truncated tail (a file still being written, or a killed writer) or a CRC failure ends
    the file; it is reported as an :class:`EventFileError` with the path and offset, raised
    (``errors="raise"``), warned about (``"warn"``, the default) or ignored (``"ignore"``).
    """
    if errors not in _ERRORS:
        raise ValueError(f"errors: expected one of {_ERRORS}, got {errors!r}")
    return (data for _, data in _checked_records(path, errors))


def _checked_records(path: str, errors: str) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` of each record of ``path``; opened at the call, read lazily."""
    open(path, "rb").close()  # a missing or unreadable file raises here, not at iteration
    return _records(path, errors)


def _records(path: str, errors: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb", buffering=_READ_BUFFER) as f:
        offset = 0
        while True:
            header = f.read(HEADER_SIZE)
            if not header:
                return
            if len(header) < HEADER_SIZE:
                _report(EventFileError(path, offset, "truncated record header"), errors)
                return
            (length,) = struct.unpack_from("<Q", header)
            (length_crc,) = struct.unpack_from("<I", header, 8)
            if masked_crc(header[:8]) != length_crc:
                err = EventFileError(
                    path, offset, "record length CRC mismatch", data_after=bool(f.read(1))
                )
                _report(err, errors)
                return
            # a damaged length passes its CRC once in 2^32: read in pieces, never trusting it
            # for an allocation larger than what the file holds
            body = _read_exactly(f, length + FOOTER_SIZE)
            if len(body) < length + FOOTER_SIZE:
                _report(EventFileError(path, offset, "truncated record"), errors)
                return
            data = body[:length]
            (body_crc,) = struct.unpack_from("<I", body, length)
            if masked_crc(data) != body_crc:
                err = EventFileError(
                    path, offset, "record data CRC mismatch", data_after=bool(f.read(1))
                )
                _report(err, errors)
                return
            yield offset, data
            offset += HEADER_SIZE + length + FOOTER_SIZE


def _read_exactly(f, n: int) -> bytes:
    """Up to ``n`` bytes of ``f`` (fewer only at the end of the file)."""
    if n <= _READ_BUFFER:
        return f.read(n)
    parts, left = [], n
    while left:
        part = f.read(min(left, _READ_BUFFER))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


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
        yield from file_events(path, errors)


def file_events(path: str, errors: str = "warn") -> Iterator[event_pb2.Event]:
    """Yield the ``Event`` protos of one event file, reporting damage like :func:`iter_records`.

    A CRC-valid record that does not decode as an ``Event`` is damage too, reported with its
    offset (reason :data:`NOT_AN_EVENT`); its framing is intact, so reading goes on after it.
    """
    if errors not in _ERRORS:
        raise ValueError(f"errors: expected one of {_ERRORS}, got {errors!r}")
    return _decoded(path, _checked_records(path, errors), errors)


def _decoded(path: str, records, errors: str) -> Iterator[event_pb2.Event]:
    for offset, data in records:
        try:
            event = event_pb2.Event.FromString(data)
        except DecodeError:
            _report(EventFileError(path, offset, NOT_AN_EVENT), errors)
            continue
        yield event
