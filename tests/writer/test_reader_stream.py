"""The reader streams: memory bounded by the largest record, not the file; a CRC-valid record
that is not an ``Event`` is reported as damage with its offset and skipped."""

import re
import struct
import tracemalloc
import warnings

import pytest

from tbprobe.writer import EventFileError, iter_records, read_events
from tbprobe.writer.proto import event_pb2
from tbprobe.writer.reader import NOT_AN_EVENT
from tbprobe.writer.record import frame, masked_crc

NOT_EVENT_PAYLOAD = b"\xff\xff\xff\x07garbage"  # CRC-valid framing, not an Event proto


def _event(step: int) -> bytes:
    return event_pb2.Event(step=step, wall_time=1.0).SerializeToString()


def _write(tmp_path, records: list[bytes]) -> str:
    path = tmp_path / "events.out.tfevents.0000000000.host.1.0"
    path.write_bytes(b"".join(frame(r) for r in records))
    return str(path)


def test_memory_bounded_by_the_largest_record(tmp_path):
    """Reading a 24 MiB file of 1 MiB records peaks far below the file size."""
    record = bytes(range(256)) * 4096  # 1 MiB
    path = _write(tmp_path, [record] * 24)
    n = 0
    tracemalloc.start()
    try:
        for data in iter_records(path, errors="raise"):
            n += len(data) == len(record)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 24
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB reading a 24 MiB file"


def test_huge_length_is_truncation_without_allocating_it(tmp_path):
    """A CRC-valid length far beyond the file's end is a truncated record, not a MemoryError."""
    header = struct.pack("<Q", 1 << 50)
    path = tmp_path / "events.out.tfevents.0000000000.host.1.0"
    good = frame(_event(1))
    path.write_bytes(good + header + struct.pack("<I", masked_crc(header)) + b"x" * 100)
    with pytest.raises(EventFileError) as info:
        list(iter_records(str(path), errors="raise"))
    assert (info.value.reason, info.value.offset) == ("truncated record", len(good))


@pytest.mark.parametrize("errors", ["raise", "warn", "ignore"])
def test_record_that_is_not_an_event_is_damage(tmp_path, errors):
    """A CRC-valid record that does not decode is an EventFileError with its offset ("raise"),
    or a warning / silence with the records around it still read."""
    records = [_event(1), NOT_EVENT_PAYLOAD, _event(2)]
    path = _write(tmp_path, records)
    offset = len(frame(records[0]))
    got = []
    if errors == "raise":
        with pytest.raises(EventFileError) as info:
            got += [ev.step for ev in read_events(path, errors="raise")]
        assert (info.value.path, info.value.offset, info.value.reason) == (
            path,
            offset,
            NOT_AN_EVENT,
        )
        return
    if errors == "warn":
        with pytest.warns(
            RuntimeWarning, match=re.escape(f"{NOT_AN_EVENT} at byte offset {offset}")
        ):
            got += [ev.step for ev in read_events(path, errors="warn")]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got += [ev.step for ev in read_events(path, errors="ignore")]
    assert got == [1, 2]


def test_crc_failure_says_whether_data_follows(tmp_path):
    """A CRC failure on the last record has no data after it; one mid-file has."""
    records = [_event(1), _event(2), _event(3)]
    framed = [bytearray(frame(r)) for r in records]
    for bad, data_after in ((2, False), (1, True)):
        damaged = [bytearray(f) for f in framed]
        damaged[bad][-1] ^= 0x01  # the data CRC of record `bad`
        path = tmp_path / f"events.out.tfevents.{bad}"
        path.write_bytes(b"".join(damaged))
        with pytest.raises(EventFileError) as info:
            list(iter_records(str(path), errors="raise"))
        assert info.value.reason == "record data CRC mismatch"
        assert info.value.data_after is data_after


def test_damage_warning_and_file_reader_are_public(tmp_path):
    """A user filtering the reader's damage warnings imports them from ``tbprobe.writer``."""
    from tbprobe.writer import EventFileWarning, file_events

    path = _write(tmp_path, [_event(1), NOT_EVENT_PAYLOAD, _event(2)])
    with pytest.warns(EventFileWarning, match="offset"):
        steps = [e.step for e in file_events(path, errors="warn")]
    assert steps == [1, 2]
