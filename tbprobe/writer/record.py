"""Record framing of TensorBoard event files, and hand encoding of the hottest events.

A record is ``uint64 length | uint32 masked_crc(length) | data | uint32 masked_crc(data)``,
little-endian, with CRC-32C (Castagnoli). Scalars are encoded by hand because building a
protobuf message per call costs more than the whole rest of ``add_scalar``.
"""

from __future__ import annotations

import math
import struct

from crc32c import crc32c

_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")

HEADER_SIZE = 12  # length + its CRC
FOOTER_SIZE = 4  # CRC of the data


def masked_crc(data: bytes) -> int:
    """TensorBoard's masked CRC-32C of ``data``."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


_header_cache: dict[int, bytes] = {}


def frame_header(length: int) -> bytes:
    """The 12 bytes before a record of ``length`` bytes (cached: lengths repeat)."""
    h = _header_cache.get(length)
    if h is None:
        packed = _U64.pack(length)
        h = packed + _U32.pack(masked_crc(packed))
        if len(_header_cache) < 4096:
            _header_cache[length] = h
    return h


def frame_into(parts: list, data: bytes) -> int:
    """Append the framed record of ``data`` to ``parts``; returns its size."""
    c = crc32c(data)
    parts.append(frame_header(len(data)))
    parts.append(data)
    parts.append(_U32.pack((((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF))
    return len(data) + 16


def frame(data: bytes) -> bytes:
    """One framed record holding ``data``."""
    header = _U64.pack(len(data))
    return b"".join((header, _U32.pack(masked_crc(header)), data, _U32.pack(masked_crc(data))))


def _varint(n: int) -> bytes:
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF  # int64 fields encode negatives as 10-byte two's complement
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _step_varint(step: int) -> bytes:
    """The varint of ``Event.step``, an int64: anything wider would be written wrapped or as
    an over-long varint, which makes TensorBoard's Rust reader drop the rest of the file."""
    if not -0x8000000000000000 <= step <= 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"global_step: must lie in [-2**63, 2**63 - 1] (int64), got {step}")
    return _varint(step)


def _len_field(key: int, payload: bytes) -> bytes:
    return b"".join((bytes((key,)), _varint(len(payload)), payload))


def scalar_value_prefix(tag: str) -> bytes:
    """``Summary.Value`` bytes up to the float: field 1 (tag) and the key of field 2."""
    return _len_field(0x0A, tag.encode("utf-8")) + b"\x15"


def scalar_field_head(tag: str) -> bytes:
    """A ``Summary.value`` field holding a ``simple_value`` of ``tag``, up to its 4 float
    bytes: the field key and length, then :func:`scalar_value_prefix`."""
    value = scalar_value_prefix(tag)
    return b"\x0a" + _varint(len(value) + 4) + value


def scalar_values(heads: list[bytes], values) -> bytes:
    """A serialised ``Summary`` of ``simple_value`` scalars: ``heads`` from
    :func:`scalar_field_head`, ``values`` numbers (beyond float32: ±inf, as for one scalar)."""
    import numpy as np

    with np.errstate(over="ignore"):
        raw = np.asarray(values, dtype=np.float64).astype("<f4").tobytes()
    return b"".join([h + raw[4 * i : 4 * i + 4] for i, h in enumerate(heads)])


def event_bytes(wall_time: float, step: int | None, summary_values: bytes) -> bytes:
    """``Event{wall_time, step, summary{value...}}`` from already-encoded ``Summary`` bytes.

    ``summary_values`` is the concatenation of ``Summary.value`` fields (key 0x0A + length +
    ``Summary.Value`` bytes), i.e. a serialised ``Summary``.
    """
    if not math.isfinite(wall_time):  # the Rust reader marks a file with a NaN wall time dead
        raise ValueError(f"walltime: must be finite, got {wall_time!r}")
    parts = [b"\x09", _DOUBLE.pack(wall_time)]
    if step:
        parts += (b"\x10", _step_varint(step))
    parts.append(_len_field(0x2A, summary_values))
    return b"".join(parts)


def scalar_head(tag: str) -> bytes:
    """The constant middle of a scalar ``Event`` for ``tag``: the ``summary`` field's key and
    length, the ``Summary.value`` key and length, the tag, and the ``simple_value`` key."""
    value = scalar_value_prefix(tag)
    n_value = len(value) + 4
    summary = b"\x0a" + _varint(n_value) + value
    return b"\x2a" + _varint(len(summary) + 4) + summary


_WALL = struct.Struct("<Bd").pack  # key of Event.wall_time (field 1, fixed64) and the double
_pack_float = _FLOAT.pack


def scalar_event(head: bytes, value: float, wall_time: float, step: int | None) -> bytes:
    """``Event`` bytes for one ``simple_value`` scalar; ``head`` from :func:`scalar_head`."""
    try:
        packed = _pack_float(value)
    except (OverflowError, struct.error):  # beyond float32: the infinity rounding gives
        packed = _pack_float(math.inf if value > 0 else -math.inf)
    if not step:  # proto3 leaves a zero step out
        return _WALL(9, wall_time) + head + packed
    if 0 < step < 0x80:
        return _WALL(9, wall_time) + _SMALL_STEPS[step] + head + packed
    if 0 < step < 0x200000:  # two or three varint bytes, without a loop
        if step < 0x4000:
            s = bytes((0x10, (step & 0x7F) | 0x80, step >> 7))
        else:
            s = bytes((0x10, (step & 0x7F) | 0x80, ((step >> 7) & 0x7F) | 0x80, step >> 14))
        return _WALL(9, wall_time) + s + head + packed
    return _WALL(9, wall_time) + b"\x10" + _step_varint(step) + head + packed


_SMALL_STEPS = [b"\x10" + bytes((i,)) for i in range(0x80)]


def summary_bytes(values) -> bytes:
    """A serialised ``Summary`` holding the serialised ``Summary.Value`` messages ``values``."""
    return b"".join(_len_field(0x0A, v) for v in values)
