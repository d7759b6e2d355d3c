"""Event files on disk: the unique ``events.out.tfevents.*`` name, and the file itself.

Only the writer thread of ``AsyncEventWriter`` (in ``event_file``) writes to an
``EventFile``. A write that fails part-way is cut back to the last whole record, so a file
only ever holds whole records; a forked child forgets the parent's descriptor without
touching the file.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import time

from tbprobe.writer.record import frame

# torch's and tensorboardX's writers name their files the same way, each with its own
# counter from 0 in the process: a writer of theirs opened in the same directory in the
# same second would take (and truncate) ours. Ours count from here instead.
FIRST_COUNTER = 1 << 20
_file_counter = itertools.count(FIRST_COUNTER)


def event_file_name(suffix: str = "") -> str:
    """``events.out.tfevents.<time>.<host>.<pid>.<counter><suffix>``: unique per process."""
    return (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        f".{os.getpid()}.{next(_file_counter)}{suffix}"
    )


class EventFile:
    """One event file. Only the writer thread writes to it (the constructor aside)."""

    def __init__(self, directory: str, suffix: str, header: list[bytes]):
        self.directory = directory
        self.suffix = suffix
        self.header = header
        self.fd = -1
        self.path = ""
        self.offset = 0  # bytes of whole records written
        self.open()

    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for attempt in range(100):  # a name taken (another process with our pid): the next
            self.path = os.path.join(self.directory, event_file_name(self.suffix))
            try:
                self.fd = os.open(self.path, flags, 0o644)
                break
            except FileExistsError:
                if attempt == 99:
                    raise
        self.offset = 0
        self.write(b"".join(frame(h) for h in self.header))

    def write(self, data: bytes) -> None:
        """Write whole records; on failure cut the file back to its last whole record."""
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                n = os.write(self.fd, view[written:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
                written += n
        except OSError:
            if written:
                try:
                    os.ftruncate(self.fd, self.offset)
                    os.lseek(self.fd, self.offset, os.SEEK_SET)
                except OSError:
                    pass
            raise
        self.offset += written

    def unlinked(self) -> bool:
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def forget(self) -> None:
        """In a forked child: drop the parent's descriptor without touching the file."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
