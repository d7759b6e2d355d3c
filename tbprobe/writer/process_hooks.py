"""Process-wide hooks of the event writers: close at exit, flush on SIGTERM, notice forks.

Every live ``AsyncEventWriter`` (in ``event_file``) is held weakly in ``_writers``. At
interpreter exit, and at the exit of a multiprocessing child (which skips atexit), this
process's writers are closed; SIGTERM flushes them, then chains to the handler installed
before; a forked child runs the writers' fork callback. The first writer of a process
installs the hooks, once. Kept apart from ``event_file`` so the writer stays one concern.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tbprobe.writer.event_file import AsyncEventWriter

_SIGNAL_FLUSH_TIMEOUT = 5.0

_writers: weakref.WeakSet[AsyncEventWriter] = weakref.WeakSet()
_hooks_installed_pid: int | None = None
_prev_sigterm = None
_sigterm_installed = False


def _close_all() -> None:
    for w in list(_writers):
        if w._pid == os.getpid():
            try:
                w.close()
            except Exception as e:  # at exit: report, never raise
                warnings.warn(f"tbprobe: closing {w.logdir} at exit failed: {e!r}", stacklevel=1)


def _flush_all_from_signal() -> None:
    deadline = time.monotonic() + _SIGNAL_FLUSH_TIMEOUT
    for w in list(_writers):
        if w._pid == os.getpid() and w._thread is not None and not w._closed:
            w._barrier(False, max(0.0, deadline - time.monotonic()), lock_free=True)


def _on_sigterm(signum, frame):
    _flush_all_from_signal()
    prev = _prev_sigterm
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # default action: die by the same signal, as the process would have
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_finalizer_pid: int | None = None


def _register_exit_finalizer() -> None:
    """multiprocessing children leave through ``os._exit``, which skips atexit; their
    finalizers run, but the registry is emptied when a child starts, so register per process."""
    global _finalizer_pid
    if _finalizer_pid == os.getpid():
        return
    _finalizer_pid = os.getpid()
    try:
        from multiprocessing import util

        util.Finalize(None, _close_all, exitpriority=100)
    except Exception:  # pragma: no cover - multiprocessing unavailable
        pass


def _install_process_hooks(after_fork_in_child) -> None:
    """atexit close, SIGTERM flush (chaining to any handler already installed), and
    ``after_fork_in_child`` (``event_file``'s fork counter) run in a forked child."""
    global _hooks_installed_pid
    if _hooks_installed_pid is None:
        _hooks_installed_pid = os.getpid()
        os.register_at_fork(after_in_child=after_fork_in_child)
        atexit.register(_close_all)
    # Per process: a multiprocessing child started by fork (its finalizers emptied) that
    # makes a writer of its own must close it at its exit too.
    _register_exit_finalizer()
    ensure_sigterm()


def ensure_sigterm() -> None:
    """Install the SIGTERM flush unless it is: signal handlers can only be set from the main
    thread, so a writer made in another thread leaves it to the main thread's next write."""
    global _prev_sigterm, _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    prev = signal.getsignal(signal.SIGTERM)
    if prev is not _on_sigterm:
        _prev_sigterm = prev
        signal.signal(signal.SIGTERM, _on_sigterm)
