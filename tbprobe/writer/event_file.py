"""The asynchronous event-file writer: one background thread, a byte-bounded queue, files.

Producers (the training thread) append already-serialised ``Event`` bytes, or a deferred item
whose bytes depend on a device result, to a deque. The writer thread wakes at least every
``TICK`` seconds, frames and CRCs the records, and writes them with one ``os.write`` per file,
so a record reaches the OS within ~100 ms of its ``add_*`` call and a killed process leaves
only whole records (plus at most one truncated tail, which both TensorBoard readers accept).

Failure policy (DESIGN.md): a write error is stored and re-raised in the producer on its next
call (or warned about once with ``on_error="warn"``); events that could not be written are
counted in ``dropped``; a producer never blocks forever. After ``os.fork()`` the child gets a
fresh queue, thread and file of its own on first use and never touches the parent's file.

The files themselves are in ``event_file_disk``; the exit, SIGTERM and fork hooks in
``process_hooks``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import warnings

from tbprobe.writer import process_hooks
from tbprobe.writer.event_file_disk import EventFile
from tbprobe.writer.event_file_disk import event_file_name as event_file_name
from tbprobe.writer.process_hooks import (
    _install_process_hooks,
    _register_exit_finalizer,
    _writers,
    ensure_sigterm,
)
from tbprobe.writer.record import frame_into

TICK = 0.05  # seconds between writer wake-ups: the bound on event-to-OS latency is ~2 ticks
DEFAULT_MAX_QUEUE_BYTES = 256 << 20  # back-pressure threshold
STALL_TIMEOUT = 60.0  # a full queue and no write progress for this long: drop, don't hang
_BATCH_BYTES = 4 << 20  # write out once this much is framed
_BATCH_CPU_SECONDS = 0.005  # ... or once framing it took this much of the thread's CPU time
_LAG_BYTES = 16 << 10  # with this much pending, a producer checks that the writer thread runs
FILE_VERSION = "brain.Event:2"

_fork_generation = 0  # bumped in a forked child; cheaper to compare than os.getpid()


def _forked_child() -> None:
    global _fork_generation
    _fork_generation += 1


class Deferred:
    """A queued event whose bytes are computed on the writer thread (e.g. from a device)."""

    __slots__ = ()

    def resolve(self) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


class _Barrier:
    __slots__ = ("close", "done", "fsync")

    def __init__(self, fsync: bool, close=None):
        self.done = threading.Event()
        self.fsync = fsync
        self.close = close  # a (key,) whose file is closed at the barrier, or None


_STOP = object()


class AsyncEventWriter:
    """Event files of one run directory (and its sub-runs), fed through one background thread.

    ``put(key, item, nbytes)`` queues ``item`` (``bytes`` of a serialised ``Event``, or a
    :class:`Deferred`) for the file of sub-directory ``key`` (``None`` is the run itself).
    """

    def __init__(
        self,
        logdir: str,
        *,
        filename_suffix: str = "",
        header: list[bytes],
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        flush_secs: float = 120.0,
        on_error: str = "raise",
    ):
        self.logdir = logdir
        self._suffix = filename_suffix
        self._header = header
        self._max_bytes = max_queue_bytes
        self._fsync_every = flush_secs
        self._on_error = on_error
        self._files: dict[str | None, EventFile] = {}
        self.dropped = 0
        self._warned = False
        self._closed = False
        self._init_process_state()
        _install_process_hooks(_forked_child)
        self._files[None] = EventFile(logdir, filename_suffix, header)  # may raise OSError
        self._start_thread()
        # registered (for the exit close and SIGTERM flush) only once whole: a writer whose
        # file could not be created must not be closed at exit
        _writers.add(self)

    # ------------------------------------------------------------------ producer side
    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._generation = _fork_generation
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._bytes_in = 0
        self._bytes_out = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._dead = False
        self._stall_warned = False
        self._stalled_out: int | None = None
        self._progress = time.monotonic()  # when the writer thread last emptied the queue
        self._gave_up_at: float | None = None  # _progress when the writer seemed blocked
        self._next_yield = 0.0  # a writer slower than its producer is helped once per 2 ticks

    def _after_fork(self) -> None:
        """First use in a forked child: forget the parent's queue, thread and files."""
        for f in self._files.values():
            f.forget()
        self._files = {}
        self._init_process_state()
        _register_exit_finalizer()
        self._start_thread()

    def file_token(self, key: str | None) -> str | None:
        """The path of this process's file for ``key`` while it is open and still in its
        directory, else None: plugin metadata sent while the token was the same stands
        (else it must go out again: a forked child's new file, a file reopened after its
        run directory was deleted, a file not opened yet)."""
        if self._pid != os.getpid():
            return None
        f = self._files.get(key)
        return None if f is None or f.unlinked() else f.path

    @property
    def path(self) -> str:
        f = self._files.get(None)
        return f.path if f is not None else ""

    def put(self, key: str | None, item, nbytes: int) -> None:
        if self._generation != _fork_generation:
            self._after_fork()
        if not process_hooks._sigterm_installed:  # made off the main thread: maybe now
            ensure_sigterm()
        if self._error is not None:
            self._surface_error()
        if self._closed:
            raise ValueError("the writer is closed")
        if self._dead:  # the thread died (its error was surfaced above): nothing will drain
            self.dropped += 1
            return
        if self._bytes_in - self._bytes_out > self._max_bytes and not self._wait_for_space():
            self.dropped += 1  # the writer is stuck: keep memory bounded, never hang training
            return
        lock = self._lock
        lock.acquire()
        self._queue.append((key, item, nbytes))
        self._bytes_in += nbytes
        pending = self._bytes_in - self._bytes_out
        lock.release()
        if pending > _BATCH_BYTES:
            self._wake.set()
        if pending > _LAG_BYTES and time.monotonic() - self._progress > 2 * TICK:
            self._yield_to_writer()

    def _yield_to_writer(self) -> None:
        """The writer thread has not caught up for two ticks. A producer that holds the GIL and
        drops it only for moments (short I/O, many torch calls) starves the writer thread
        waiting for it, and SIGKILL would lose that growing backlog: let the writer catch up,
        for at most a tick. A writer that writes nothing even then is blocked in the OS (a slow
        disk): it is not waited for again until it catches up; one that is merely slower than
        the producer is helped at most once every two ticks."""
        progress = self._progress
        now = time.monotonic()
        if progress == self._gave_up_at or now < self._next_yield:
            return
        target, out = self._bytes_in, self._bytes_out
        deadline = now + TICK
        self._wake.set()
        while self._bytes_out < target and not self._dead:
            if time.monotonic() > deadline:
                if self._bytes_out == out:
                    self._gave_up_at = progress
                else:
                    self._next_yield = deadline + 2 * TICK
                return
            time.sleep(0.001)  # keeps the GIL released for a while: the writer takes it

    def _start_thread(self) -> None:
        t = threading.Thread(target=self._run, name="tbprobe-event-writer", daemon=True)
        self._thread = t
        t.start()

    def _wait_for_space(self) -> bool:
        """Back-pressure: wait while the writer thread makes progress. Returns False (the
        caller drops the event) when it is dead or has written nothing for STALL_TIMEOUT s."""
        if self._stalled_out is not None:  # already found stuck: drop at once until it moves
            if self._bytes_out == self._stalled_out:
                return False
            self._stalled_out = None
        last_out, last_change = self._bytes_out, time.monotonic()
        while self._bytes_in - self._bytes_out > self._max_bytes:
            if self._dead:
                self._surface_error()
                return False
            if self._bytes_out != last_out:
                last_out, last_change = self._bytes_out, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                self._stalled_out = last_out
                if not self._stall_warned:
                    self._stall_warned = True
                    warnings.warn(
                        f"tbprobe: the event writer for {self.logdir} made no progress for "
                        f"{STALL_TIMEOUT:.0f} s with a full queue; new events are dropped and "
                        "counted in dropped_events until it recovers",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                return False
            self._wake.set()
            time.sleep(0.001)
        return True

    def _surface_error(self) -> None:
        err, self._error = self._error, None
        if err is None:
            return
        if self._on_error == "raise":
            raise err
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"tbprobe: writing events to {self.logdir} failed ({err}); events are being "
                "dropped and counted in writer.dropped_events",
                RuntimeWarning,
                stacklevel=4,
            )

    def flush(self, fsync: bool = False, timeout: float | None = None) -> bool:
        """Barrier: return once everything put before it is written (True), or on timeout."""
        if self._generation != _fork_generation:
            self._after_fork()
        done = self._barrier(fsync, timeout)
        self._surface_error()
        return done

    def close_file(self, key: str | None) -> None:
        """Barrier, then fsync and close the file of ``key``; a later event for ``key`` goes to
        a new file in the same directory."""
        if self._closed:
            return
        if self._generation != _fork_generation:
            self._after_fork()
        self._barrier(fsync=True, timeout=None, close=(key,))
        self._surface_error()

    def _barrier(
        self, fsync: bool, timeout: float | None, lock_free: bool = False, close=None
    ) -> bool:
        b = _Barrier(fsync, close)
        if lock_free:  # from a signal handler: the interrupted frame may hold self._lock
            self._queue.append((None, b, 0))
        else:
            with self._lock:
                self._queue.append((None, b, 0))
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not b.done.wait(0.05):
            if self._dead or not self._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def close(self) -> None:
        """Flush, fsync and close every file, and stop the thread. Idempotent."""
        if self._closed:
            return
        if self._generation != _fork_generation:
            self._after_fork()
        try:
            self._barrier(fsync=True, timeout=None)
            self._queue.append((None, _STOP, 0))
            self._wake.set()
            self._thread.join()
        finally:
            self._closed = True
            for f in self._files.values():
                with contextlib.suppress(OSError):
                    f.close()
            _writers.discard(self)
        self._surface_error()

    def _fsync_files(self) -> None:
        for f in self._files.values():
            try:
                f.fsync()
            except OSError as e:
                self._record_error(e, 0)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        last_fsync, synced = time.monotonic(), 0
        try:
            while True:
                self._wake.wait(TICK)
                self._wake.clear()
                if self._drain():
                    return
                # every flush_secs (0: every tick), if anything was written since the last one
                if time.monotonic() - last_fsync > self._fsync_every and self._bytes_out != synced:
                    last_fsync, synced = time.monotonic(), self._bytes_out
                    self._fsync_files()
        except BaseException as e:  # never die silently: producers must see it
            self._record_error(e, 0)
            self._dead = True
            self._drop_queue()

    def _drain(self) -> bool:
        """Write out everything queued. Returns True when asked to stop."""
        batch: dict[str | None, list[bytes]] = {}
        counts: dict[str | None, int] = {}
        size = accounted = framed = 0
        queue = self._queue
        popleft = queue.popleft
        # A producer that never pauses keeps the queue non-empty: write out on a CPU-time budget
        # (not wall time, which includes waiting for the GIL and would make tiny writes), or
        # after a tick of wall time (a blocking Deferred), to keep the ~100 ms bound.
        cpu_deadline = time.thread_time() + _BATCH_CPU_SECONDS
        wall_deadline = time.monotonic() + TICK
        while queue:
            key, item, nbytes = popleft()
            accounted += nbytes
            if type(item) is not bytes:
                if item is _STOP:
                    self._write_batch(batch, counts)
                    self._bytes_out += accounted
                    return True
                if type(item) is _Barrier:
                    self._write_batch(batch, counts)
                    batch, counts, size = {}, {}, 0
                    if item.fsync:
                        self._fsync_files()
                    if item.close is not None:
                        f = self._files.pop(item.close[0], None)
                        if f is not None:
                            with contextlib.suppress(OSError):
                                f.close()
                    self._bytes_out += accounted
                    accounted = 0
                    item.done.set()
                    continue
                try:
                    item = item.resolve()
                except Exception as e:  # a bad deferred value must not stop the others
                    self._warn_resolve(e)
                    self.dropped += 1
                    continue
            parts = batch.get(key)
            if parts is None:
                parts = batch[key] = []
                counts[key] = 0
            counts[key] += 1
            size += frame_into(parts, item)
            framed += 1
            if size >= _BATCH_BYTES or (
                not framed & 255
                and (time.thread_time() > cpu_deadline or time.monotonic() > wall_deadline)
            ):
                self._write_batch(batch, counts)
                batch, counts, size = {}, {}, 0
                self._bytes_out += accounted
                accounted = 0
                cpu_deadline = time.thread_time() + _BATCH_CPU_SECONDS
                wall_deadline = time.monotonic() + TICK
        self._write_batch(batch, counts)
        self._bytes_out += accounted
        self._progress = time.monotonic()
        return False

    def _write_batch(self, batch: dict, counts: dict) -> None:
        for key, records in batch.items():
            try:
                f = self._file(key)
                if f.unlinked():  # the run directory was deleted under us: start a new file
                    f.close()
                    f.open()
                f.write(b"".join(records))
            except OSError as e:
                self._record_error(e, counts[key])

    def _file(self, key: str | None) -> EventFile:
        f = self._files.get(key)
        if f is None:
            directory = self.logdir if key is None else os.path.join(self.logdir, key)
            f = EventFile(directory, self._suffix, self._header[:1])
            self._files[key] = f
        return f

    def _record_error(self, e: BaseException, n_dropped: int) -> None:
        if self._error is None:  # before counting: whoever sees a drop can also see why
            self._error = e
        self.dropped += n_dropped

    def _warn_resolve(self, e: Exception) -> None:
        warnings.warn(
            f"tbprobe: dropped an event whose value failed: {e!r}", RuntimeWarning, stacklevel=2
        )

    def _drop_queue(self) -> None:
        while self._queue:
            _, item, nbytes = self._queue.popleft()
            self._bytes_out += nbytes
            if type(item) is _Barrier:
                item.done.set()
            elif item is not _STOP:
                self.dropped += 1
