"""Record framing, CRC-32C vectors and hand-encoded events against protobuf."""

import struct

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from tbprobe.writer.proto import event_pb2
from tbprobe.writer.record import frame, masked_crc, scalar_event, scalar_head


@pytest.mark.parametrize(
    "data, crc",
    [
        (b"123456789", 0xE3069283),
        (b"\x00" * 32, 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (b"abcd", 0x92C80A31),
    ],
)
def test_crc32c_vectors(data, crc):
    """The native CRC-32C matches the published test vectors."""
    assert crc32c(data) == crc


def test_frame_layout():
    """A 24-byte record starts with TensorBoard's known header bytes and round-trips."""
    rec = frame(b"x" * 24)
    assert rec[:12].hex() == "1800000000000000a37f4b22"
    assert len(rec) == 24 + 16
    assert struct.unpack("<I", rec[-4:])[0] == masked_crc(b"x" * 24)


@settings(max_examples=200, deadline=None)
@given(
    tag=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300),
    value=st.floats(allow_nan=False, width=32),
    wall=st.floats(min_value=0, max_value=4e9),
    step=st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
)
def test_scalar_event_equals_protobuf(tag, value, wall, step):
    """Hand-encoded scalar events parse to the same Event protobuf would build."""
    ev = event_pb2.Event.FromString(scalar_event(scalar_head(tag), value, wall, step))
    assert ev.wall_time == wall
    assert ev.step == (step or 0)
    (v,) = ev.summary.value
    assert v.tag == tag and v.simple_value == value


def test_scalar_overflow_becomes_infinity():
    """Values beyond float32 become ±inf instead of raising."""
    for value, expected in ((1e300, float("inf")), (-(10**40), float("-inf"))):
        ev = event_pb2.Event.FromString(scalar_event(scalar_head("x"), value, 1.0, 1))
        assert ev.summary.value[0].simple_value == expected
