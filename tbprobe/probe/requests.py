"""Snapshot requests from outside the training process: request files and SIGUSR1.

``tbprobe snapshot LOGDIR`` (or :func:`request_snapshot`) drops a small JSON file into
``<logdir>/.tbprobe/requests/``, written atomically (temporary file + ``os.replace``)::

    {"version": 1, "modules": ["layer1.*"] | null, "steps": 1}

A :class:`RequestWatcher` in the training process notices it from a background thread that
does one ``os.stat`` of that directory per interval and lists it only when the directory
changed. Each request is claimed by an atomic rename (so exactly one watcher consumes it, even
across processes), validated by :func:`parse_request` (size, schema, no path outside the log
dir), deleted, and handed to the probe through the non-blocking :meth:`RequestWatcher.poll`.
Nothing here runs on the training hot path, and nothing touches a device.
The request file format, its writer and its parser are in :mod:`tbprobe.probe.request_files`.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings

from tbprobe.probe.request_files import (
    _SUFFIX,
    MAX_REQUEST_BYTES,
    MAX_STEPS,
    REQUESTS_DIR,
    SnapshotRequest,
    _check_logdir,
    _requests_dir,
    parse_request,
    request_snapshot,
    run_snapshot_cli,
)

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_STEPS",
    "REQUESTS_DIR",
    "RequestWatcher",
    "SnapshotRequest",
    "install_sigusr1",
    "parse_request",
    "request_snapshot",
    "run_snapshot_cli",
]

_CLAIM_PREFIX = ".claimed-"  # a dot-name: never listed as a request
_MAX_PER_SCAN = 32  # requests handled per wake-up; the rest wait for the next one
_RACY_NS = 2_000_000_000  # a directory changed this recently may change again in the same mtime


# ---------------------------------------------------------------------------- watcher


class RequestWatcher:
    """Finds request files of run directory ``logdir`` on a daemon thread; ``poll()`` hands
    them over. The thread does one ``os.stat`` per ``interval`` seconds and lists the directory
    only when it changed; a bad request is deleted with one warning, never raised.

    A forked child inherits an inert watcher (no thread, nothing pending) until it calls
    ``start()`` itself.

    Example::

        with RequestWatcher(writer.logdir) as watcher:  # starts the thread
            for batch in loader:
                for req in watcher.poll():  # non-blocking, each request exactly once
                    probe.snapshot(modules=req.modules, steps=req.steps)
    """

    def __init__(self, logdir, interval: float = 0.5):
        self.logdir = _check_logdir(logdir)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"interval: expected seconds as a number, got {type(interval)}")
        if not (math.isfinite(interval) and 0 < interval <= 60):
            raise ValueError(f"interval: expected 0 < interval <= 60 seconds, got {interval}")
        self.interval = float(interval)
        self._reqdir = self.logdir / REQUESTS_DIR
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[SnapshotRequest] = []
        self._seen: tuple | None = None  # (inode, mtime_ns, ctime_ns) at the last listing
        self._ignored: set[str] = set()  # bad names we could not remove: warned once already
        self._failed = False
        self._closed = False

    def _own(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's thread and lock are not ours
            self._reset()

    def start(self) -> RequestWatcher:
        """Start the daemon thread (idempotent); returns self."""
        self._own()
        if self._closed:
            raise RuntimeError("RequestWatcher: start() after close()")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tbprobe-requests", daemon=True)
            self._thread.start()
        return self

    def poll(self) -> list[SnapshotRequest]:
        """The requests found since the last call, oldest first; never blocks on I/O."""
        if self._pid != os.getpid():
            self._reset()
        if not self._pending:  # the common case: no lock taken
            return []
        with self._lock:
            found, self._pending = self._pending, []
        return found

    def close(self) -> None:
        """Stop the thread promptly (it waits on an Event, not a sleep); idempotent."""
        self._own()
        self._closed = True
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def __enter__(self) -> RequestWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        stop = self._stop
        while True:
            try:
                self.scan()
            except Exception as e:  # never take training down; report the first failure
                if not self._failed:
                    self._failed = True
                    warnings.warn(
                        f"tbprobe: checking {self._reqdir} for snapshot requests failed: {e!r}",
                        RuntimeWarning,
                        stacklevel=1,
                    )
            if stop.wait(self.interval):
                return

    def scan(self) -> None:
        """One check: a ``stat`` of the requests directory, a listing only if it changed."""
        try:
            st = os.stat(self._reqdir)
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if key == self._seen:
            return
        _requests_dir(self.logdir, create=False)  # a symlinked-away directory is not ours
        names = sorted(n for n in os.listdir(self._reqdir) if n.endswith(_SUFFIX) and n[0] != ".")
        names = [n for n in names if n not in self._ignored]
        # A change within the mtime granularity after this listing would leave mtime as is:
        # keep listing while the directory's mtime is that recent (as git does for racy files).
        racy = time.time_ns() - st.st_mtime_ns < _RACY_NS
        self._seen = None if racy or len(names) > _MAX_PER_SCAN else key
        for name in names[:_MAX_PER_SCAN]:
            if self._stop.is_set():
                return
            self._consume(name)

    def _consume(self, name: str) -> None:
        src = self._reqdir / name
        claimed = self._reqdir / f"{_CLAIM_PREFIX}{os.getpid()}-{name}"
        try:
            os.rename(src, claimed)  # atomic: exactly one watcher wins each request
        except FileNotFoundError:
            return  # another watcher took it
        except OSError as e:
            self._ignore(name, f"cannot claim it: {e}")
            return
        try:
            req = parse_request(claimed, self.logdir)
        except (OSError, ValueError) as e:
            req = None
            warnings.warn(
                f"tbprobe: ignored snapshot request {name}: {e}", RuntimeWarning, stacklevel=1
            )
        try:
            os.unlink(claimed)
        except OSError as e:
            self._ignore(name, f"cannot delete {claimed.name}: {e}")
        if req is not None:
            req = SnapshotRequest(req.modules, req.steps, str(src))
            with self._lock:
                self._pending.append(req)

    def _ignore(self, name: str, why: str) -> None:
        self._ignored.add(name)
        warnings.warn(f"tbprobe: snapshot request {name}: {why}", RuntimeWarning, stacklevel=1)


# ---------------------------------------------------------------------------- SIGUSR1


def install_sigusr1(callback):
    """Opt in: on SIGUSR1 call ``callback()`` (in the main thread, between bytecodes), then any
    handler that was installed before. Returns ``restore()``, which puts the previous handler
    back (idempotent; from another thread, or if someone replaced ours since, it only disables
    ours). Keep ``callback`` short and lock-free, e.g. set a flag that arms a snapshot.

    Raises TypeError if ``callback`` is not callable, RuntimeError off the main thread or
    where SIGUSR1 does not exist.

    Example::

        restore = install_sigusr1(lambda: probe.snapshot())  # then: kill -USR1 <pid>
    """
    if not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")
    if not hasattr(signal, "SIGUSR1"):
        raise RuntimeError("install_sigusr1: this platform has no SIGUSR1")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "install_sigusr1: signal handlers can only be installed from the main thread"
        )
    previous = signal.getsignal(signal.SIGUSR1)
    active = [True]

    def _on_sigusr1(signum, frame):
        if active[0]:
            try:
                callback()
            except Exception as e:  # a logging aid must not kill the run
                warnings.warn(
                    f"tbprobe: SIGUSR1 callback failed: {e!r}", RuntimeWarning, stacklevel=1
                )
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGUSR1, _on_sigusr1)

    def restore() -> None:
        active[0] = False
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGUSR1) is _on_sigusr1:
            signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)

    return restore
