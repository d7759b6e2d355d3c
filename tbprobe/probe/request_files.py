"""The snapshot request file: its format, the writer behind ``tbprobe snapshot`` and the parser.

:func:`request_snapshot` validates its arguments and drops a small JSON file into
``<logdir>/.tbprobe/requests/``, written atomically (temporary file + ``os.replace``), and
:func:`run_snapshot_cli` is the ``tbprobe snapshot`` command around it. :func:`parse_request`
reads one such file back and refuses anything that is not a well-formed request inside the
log dir. The watcher that picks the files up is in :mod:`tbprobe.probe.requests`.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_STEPS",
    "REQUESTS_DIR",
    "SnapshotRequest",
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
