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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import stat
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

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

REQUESTS_DIR = os.path.join(".tbprobe", "requests")  # relative to the log dir
REQUEST_VERSION = 1
MAX_REQUEST_BYTES = 4096
MAX_STEPS = 100
MAX_GLOBS = 64
MAX_GLOB_CHARS = 256
_SUFFIX = ".json"
_CLAIM_PREFIX = ".claimed-"  # a dot-name: never listed as a request
_MAX_PER_SCAN = 32  # requests handled per wake-up; the rest wait for the next one
_RACY_NS = 2_000_000_000  # a directory changed this recently may change again in the same mtime
_KEYS = frozenset(("version", "modules", "steps"))


@dataclass(frozen=True)
class SnapshotRequest:
    """A validated request: module-name globs (None: every hooked module), how many steps to
    capture (1..``MAX_STEPS``), and the request file it came from."""

    modules: tuple[str, ...] | None
    steps: int
    path: str


# ---------------------------------------------------------------------------- validation


def _check_modules(modules, name: str = "modules") -> list[str] | None:
    if modules is None:
        return None
    if isinstance(modules, str):
        modules = [modules]
    elif not isinstance(modules, (list, tuple)):
        raise TypeError(f"{name}: expected None, a glob string or a list of them")
    if not 1 <= len(modules) <= MAX_GLOBS:
        raise ValueError(f"{name}: expected 1 to {MAX_GLOBS} globs, got {len(modules)}")
    for glob in modules:
        if not isinstance(glob, str):
            raise TypeError(f"{name}: expected glob strings, got {type(glob).__name__}")
        if not glob or len(glob) > MAX_GLOB_CHARS or "\x00" in glob:
            raise ValueError(
                f"{name}: expected non-empty globs of at most {MAX_GLOB_CHARS} characters "
                f"without NUL, got {glob!r:.80}"
            )
    return list(modules)


def _check_steps(steps, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name}: expected an int, got {type(steps).__name__}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{name}: expected 1..{MAX_STEPS}, got {steps}")
    return steps


def _check_logdir(logdir) -> Path:
    if not isinstance(logdir, (str, os.PathLike)):
        raise TypeError(f"logdir: expected a path, got {type(logdir).__name__}")
    path = Path(logdir)
    if not path.is_dir():
        raise ValueError(f"logdir: {str(path)!r} is not a directory")
    return path


def _check_run_dir(logdir) -> Path:
    path = _check_logdir(logdir)
    with os.scandir(path) as entries:
        if not any(e.name.startswith("events.out.tfevents.") for e in entries):
            raise ValueError(
                f"logdir: {str(path)!r} is not a run directory (no events.out.tfevents.* file "
                "in it); pass the directory the probe's SummaryWriter writes to"
            )
    return path


def _requests_dir(logdir: Path, create: bool) -> Path:
    """``<logdir>/.tbprobe/requests``, refused when a symlink takes it out of the log dir."""
    reqdir = logdir / REQUESTS_DIR
    for make in (False, create):  # check before mkdir too: it would follow a planted symlink
        if make:
            reqdir.mkdir(parents=True, exist_ok=True)
        if not reqdir.resolve().is_relative_to(logdir.resolve()):
            raise ValueError(f"logdir: {str(reqdir)!r} resolves outside the log dir")
    return reqdir


# ---------------------------------------------------------------------------- request files


def request_snapshot(logdir, modules=None, steps: int = 1) -> Path:
    """Ask the probe writing to run directory ``logdir`` for a snapshot; returns the request file.

    ``modules``: None (every hooked module), a module-name glob, or a list of globs; ``steps``:
    how many consecutive steps to capture, 1..``MAX_STEPS``. The file appears atomically, so a
    watcher never reads half of it. Raises ValueError/TypeError naming the bad argument.

    Example::

        request_snapshot("runs/exp", modules="layer1.*", steps=2)
        # PosixPath('runs/exp/.tbprobe/requests/01785...-3f2a....json')
    """
    globs = _check_modules(modules)
    _check_steps(steps)
    root = _check_run_dir(logdir)
    body = json.dumps({"version": REQUEST_VERSION, "modules": globs, "steps": steps}).encode()
    if len(body) > MAX_REQUEST_BYTES:
        raise ValueError(
            f"modules: the request would be {len(body)} bytes, over {MAX_REQUEST_BYTES}"
        )
    reqdir = _requests_dir(root, create=True)
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
    tmp, final = reqdir / f".{name}.tmp", reqdir / f"{name}{_SUFFIX}"
    try:
        with open(tmp, "xb") as f:
            f.write(body)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return final


def _read_bounded(path: Path) -> bytes:
    """The bytes of regular file ``path`` (no symlink, FIFO or device), at most the size limit."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: a FIFO planted here must not block the watcher
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"path: {str(path)!r} is not a regular file")
        if st.st_size > MAX_REQUEST_BYTES:
            raise ValueError(f"path: {st.st_size} bytes, over the {MAX_REQUEST_BYTES}-byte limit")
        data = os.read(fd, MAX_REQUEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"path: over the {MAX_REQUEST_BYTES}-byte limit")
    return data


def _reject_constant(token):
    raise ValueError(f"{token} is not valid JSON")


def parse_request(path, logdir) -> SnapshotRequest:
    """Read and validate the request file ``path`` of run directory ``logdir``.

    Refuses (ValueError saying why) a file outside ``logdir`` once symlinks are resolved, one
    that is not a regular file or is over ``MAX_REQUEST_BYTES``, and any JSON other than an
    object with exactly ``version`` (1), ``modules`` (null or a list of glob strings) and
    ``steps`` (an int in 1..``MAX_STEPS``). TypeError for arguments that are not paths.

    Example::

        parse_request(request_snapshot("runs/exp", "conv*"), "runs/exp")
        # SnapshotRequest(modules=('conv*',), steps=1, path='runs/exp/.tbprobe/requests/...')
    """
    for name, value in (("path", path), ("logdir", logdir)):
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name}: expected a path, got {type(value).__name__}")
    root = Path(logdir).resolve(strict=True)
    real = Path(path).resolve(strict=True)
    if not real.is_relative_to(root):
        raise ValueError(f"path: {str(path)!r} resolves to {str(real)!r}, outside the log dir")
    data = _read_bounded(real)
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"path: {str(path)!r} is not a UTF-8 JSON request ({e})") from None
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"path: expected a JSON object with keys {sorted(_KEYS)}, got {got}")
    version = obj["version"]
    if type(version) is not int or version != REQUEST_VERSION:
        raise ValueError(f"path: unsupported request version {version!r} (expected 1)")
    try:
        globs = obj["modules"]
        if globs is not None and not isinstance(globs, list):
            raise TypeError("modules: expected null or a list of glob strings")
        globs = _check_modules(globs, "modules")
        steps = _check_steps(obj["steps"], "steps")
    except (TypeError, ValueError) as e:
        raise ValueError(f"path: {str(path)!r}: {e}") from None
    return SnapshotRequest(None if globs is None else tuple(globs), steps, str(path))


def run_snapshot_cli(args) -> int:
    """``tbprobe snapshot LOGDIR [--modules GLOB] [--steps N]``: drop a request, print where.

    Exit status 0 on success, 2 (message on stderr) for a bad log dir or bad arguments.

    Example::

        tbprobe snapshot runs/exp --modules 'layer1.*' --steps 2
    """
    try:
        path = request_snapshot(args.logdir, modules=args.modules, steps=args.steps)
    except (TypeError, ValueError, OSError) as e:
        print(f"tbprobe snapshot: {e}", file=sys.stderr)
        return 2
    what = "all hooked modules" if args.modules is None else f"modules {args.modules!r}"
    print(f"snapshot of {what} for {args.steps} step(s) requested: {path}")
    return 0


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
