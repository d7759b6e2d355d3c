"""``SummaryWriter``: tensorboardX's API on top of the asynchronous event writer.

This module holds the class itself: its arguments, the plumbing every ``add_*`` call goes
through to the event files, and ``use_metadata``, ``flush`` and ``close``. The ``add_*``
methods come from mixins: scalars from ``writer_scalars``, histograms from
``writer_histograms``, everything else from ``writer_extras``.

The training thread only validates, reduces (on the value's own device) and serialises;
framing, CRCs, PNG encoding of device images and file I/O happen on the writer thread.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import socket
import time
from datetime import datetime

from tbprobe.writer.event_file import (
    DEFAULT_MAX_QUEUE_BYTES,
    FILE_VERSION,
    AsyncEventWriter,
    Deferred,
)
from tbprobe.writer.file_writer import FileWriter
from tbprobe.writer.naming import _check_step, _check_walltime
from tbprobe.writer.proto import event_pb2
from tbprobe.writer.record import event_bytes, summary_bytes
from tbprobe.writer.values import check_int
from tbprobe.writer.writer_extras import ExtrasMixin
from tbprobe.writer.writer_histograms import HistogramMixin
from tbprobe.writer.writer_scalars import ScalarMixin


class DeferredValues(Deferred):
    """Summary values built on the writer thread from a device result."""

    __slots__ = ("build", "copy", "step", "wall")

    def __init__(self, copy, build, wall, step):
        self.copy, self.build, self.wall, self.step = copy, build, wall, step

    def resolve(self) -> bytes:
        values = self.build(*self.copy.arrays())
        return event_bytes(
            self.wall, self.step, summary_bytes(v.SerializeToString() for v in values)
        )


class SummaryWriter(ScalarMixin, HistogramMixin, ExtrasMixin):
    """Writes TensorBoard event files; a drop-in for ``tensorboardX.SummaryWriter``.

    Same arguments and methods as tensorboardX 2.6.5, plus:

    - ``log_freq``: an ``add_*`` call whose ``global_step`` is given and not a multiple of
      ``log_freq`` returns at once, doing no work.
    - ``on_error``: ``"raise"`` (default) re-raises a failed write's ``OSError`` on the next
      call; ``"warn"`` warns once and counts dropped events in ``dropped_events``.
    - ``max_queue_bytes``: bound of the in-memory queue; a full queue makes ``add_*`` wait.

    Events reach the OS within ~100 ms; ``flush()`` is a barrier; ``close()`` also fsyncs.
    Values may be numbers, numpy arrays or torch tensors on any device: device tensors are
    reduced where they live and resolved on the writer thread, so the caller never waits.

    Examples::

        from tbprobe import SummaryWriter
        with SummaryWriter("runs/exp") as w:
            for step in range(100):
                w.add_scalar("loss", 1.0 / (step + 1), step)
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None = None,
        comment: str | None = "",
        purge_step: int | None = None,
        max_queue: int = 10,
        flush_secs: float = 120,
        filename_suffix: str = "",
        write_to_disk: bool = True,
        log_dir: str | os.PathLike | None = None,
        comet_config: dict | None = None,
        *,
        log_freq: int = 1,
        on_error: str = "raise",
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        **kwargs,
    ):
        """Arguments as in tensorboardX:

        - ``logdir``: the run directory (str or path; ``w.logdir`` keeps what was passed).
          None or ``""``: ``runs/<Mon><DD>_<HH-MM-SS>_<host><comment>``. ``log_dir`` is used
          only when ``logdir`` is None.
        - ``comment``: suffix of the default run directory (None is ``""``).
        - ``max_queue``: an int >= 0, accepted for compatibility (0 is tensorboardX's unbounded
          queue). tbprobe's queue is bounded by ``max_queue_bytes`` instead, and events reach
          the OS within ~100 ms whatever the value.
        - ``flush_secs``: seconds (>= 0) between fsyncs of the files while events arrive; 0
          fsyncs after every write-out (~every 50 ms when busy). ``flush()`` and ``close()``
          never wait for it.
        """
        if kwargs:
            raise TypeError(f"SummaryWriter: unexpected keyword arguments {sorted(kwargs)}")
        if comet_config not in (None, {"disabled": True}) and not comet_config.get("disabled"):
            raise ValueError("comet_config: comet logging is not supported by tbprobe")
        if logdir is None:  # as tensorboardX: log_dir only when logdir is not given
            logdir = log_dir
        if comment is None:
            comment = ""
        if not isinstance(comment, str):
            raise TypeError(f"comment: expected a str, got {type(comment).__name__}")
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir: expected a str or path, got {type(logdir).__name__}")
        if logdir is None or logdir == "":
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            logdir = os.path.join("runs", f"{stamp}_{socket.gethostname()}{comment}")
        path = os.fspath(logdir)
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ValueError(f"logdir: expected a directory name, got {logdir!r}")
        if not isinstance(filename_suffix, str) or re.search(r"[/\\\x00]", filename_suffix):
            raise ValueError(f"filename_suffix: must be a str without '/', got {filename_suffix!r}")
        self.purge_step = _check_step(purge_step, "purge_step")
        max_queue = _int_arg(max_queue, "max_queue", 0)
        log_freq = _int_arg(log_freq, "log_freq", 1)
        max_queue_bytes = _int_arg(max_queue_bytes, "max_queue_bytes", 1 << 16)
        if (
            isinstance(flush_secs, bool)
            or not isinstance(flush_secs, numbers.Real)
            or not flush_secs >= 0
        ):
            raise ValueError(f"flush_secs: expected a number of seconds >= 0, got {flush_secs!r}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error: expected 'raise' or 'warn', got {on_error!r}")
        self.logdir = logdir  # as given (tensorboardX keeps a pathlib.Path a Path)
        self._logdir = path  # the str every internal use takes
        self.log_freq = log_freq
        self.kwargs: dict = {}  # tensorboardX's extra FileWriter arguments: none are accepted
        self._max_queue = max_queue
        self._flush_secs = float(flush_secs)
        self._filename_suffix = filename_suffix
        self._write_to_disk = bool(write_to_disk)
        self._on_error = on_error
        self._max_queue_bytes = max_queue_bytes
        self._scalar_head: dict[str, bytes] = {}
        self._scalar_field: dict[str, bytes] = {}
        # (file key, tag) -> the file token (path) its plugin metadata went to
        self._meta_sent: dict[tuple[str | None, str], str | None] = {}
        self._defaults: dict | None = None
        self.scalar_dict: dict[str, list] = {}
        self._writer: AsyncEventWriter | None = None
        self._file_writers: dict[str | None, FileWriter] | None = None
        self._dropped_before = 0
        self._write_failed = False  # the log directory could not be written (on_error="warn")
        self._get_writer()

    # ------------------------------------------------------------------ plumbing
    def _get_writer(self) -> AsyncEventWriter | None:
        if self._file_writers is None:
            self._file_writers = {None: FileWriter(self)}
        if self._writer is None and self._write_to_disk:
            wall = time.time()
            header = [
                event_pb2.Event(wall_time=wall, file_version=FILE_VERSION).SerializeToString()
            ]
            if self.purge_step is not None:
                header.append(
                    event_pb2.Event(
                        wall_time=wall, step=self.purge_step, file_version=FILE_VERSION
                    ).SerializeToString()
                )
                start = event_pb2.Event(wall_time=wall, step=self.purge_step)
                start.session_log.status = event_pb2.SessionLog.START
                header.append(start.SerializeToString())
            try:
                self._writer = AsyncEventWriter(
                    self._logdir,
                    filename_suffix=self._filename_suffix,
                    header=header,
                    max_queue_bytes=self._max_queue_bytes,
                    flush_secs=self._flush_secs,
                    on_error=self._on_error,
                )
                # Once: a writer reopened after close() must not purge the steps it wrote
                # since (torch's writer does the same; tensorboardX purges them again).
                self.purge_step = None
            except OSError:
                if self._on_error == "raise":
                    raise
                import warnings

                warnings.warn(
                    f"tbprobe: cannot write to {self._logdir}; events are dropped",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._write_to_disk = False
                self._write_failed = True
            self._meta_sent = {}
        return self._writer

    def _skip(self, step) -> bool:
        """True when ``log_freq`` skips the explicit ``global_step`` (checked first)."""
        return step is not None and self.log_freq != 1 and _check_step(step) % self.log_freq != 0

    def _step_wall(self, global_step, walltime):
        if self._defaults is not None:
            if global_step is None:
                global_step = self._defaults["global_step"]
            if walltime is None:
                walltime = self._defaults["walltime"]
        return _check_step(global_step), _check_walltime(walltime)

    def _put(self, key: str | None, item, nbytes: int) -> None:
        w = self._writer if self._writer is not None else self._get_writer()
        if w is not None:
            w.put(key, item, nbytes)
        elif self._write_failed:  # on_error="warn" and the directory cannot be written
            self._dropped_before += 1

    def _emit(self, values, step, wall, key: str | None = None) -> None:
        """Queue one event holding ``values`` (``Summary.Value`` protos) for file ``key``.

        Plugin metadata goes out once per tag and file: readers keep the first one."""
        encoded = []
        for v in values:
            if v.metadata.plugin_data.plugin_name:
                seen, token = (key, v.tag), self._file_token(key)
                if token is not None and self._meta_sent.get(seen) == token:
                    v = _without_metadata(v)
                else:
                    self._meta_sent[seen] = token
            encoded.append(v.SerializeToString())
        data = event_bytes(wall, step, summary_bytes(encoded))
        self._put(key, data, len(data))

    def _file_token(self, key: str | None) -> str | None:
        """``AsyncEventWriter.file_token`` (a syscall: for plugin metadata only)."""
        w = self._writer
        return None if w is None else w.file_token(key)

    def _emit_deferred(self, tensors, build, step, wall, key: str | None = None) -> None:
        from tbprobe.writer.device import host_copy

        copy = host_copy(tensors)
        nbytes = 256 + sum(t.numel() * t.element_size() for t in tensors)
        self._put(key, DeferredValues(copy, build, wall, step), nbytes)

    def _emit_event(self, event: event_pb2.Event, key: str | None = None) -> None:
        data = event.SerializeToString()
        self._put(key, data, len(data))

    def _sub_writer(self, key: str) -> None:
        """Register the ``FileWriter`` of sub-run ``key`` in ``all_writers``."""
        fws = self._file_writers
        if fws is not None and key not in fws:
            fws[key] = FileWriter(self, key)

    # ------------------------------------------------------------------ tensorboardX's attributes
    @property
    def file_writer(self) -> FileWriter | None:
        """The run directory's ``FileWriter`` (None after ``close()``, as in tensorboardX)."""
        fws = self._file_writers
        return None if fws is None else fws[None]

    @property
    def all_writers(self) -> dict[str, FileWriter] | None:
        """``{directory: FileWriter}``: the run directory and each ``add_scalars`` sub-run
        (None after ``close()``). A new dict on each access."""
        fws = self._file_writers
        return None if fws is None else {fw.get_logdir(): fw for fw in fws.values()}

    def _get_file_writer(self) -> FileWriter:
        """The run directory's ``FileWriter``, reopening the writer after ``close()``."""
        self._get_writer()
        return self._file_writers[None]

    @property
    def default_bins(self) -> list[float]:
        """tensorboardX's default histogram bin edges (``bins="tensorflow"``), a new list."""
        from tbprobe.kernels import tensorflow_edges

        return tensorflow_edges().tolist()

    # ------------------------------------------------------------------ lifecycle
    def get_logdir(self) -> str:
        """The run directory, as a str."""
        return self._logdir

    @property
    def dropped_events(self) -> int:
        """Events that could not be written (write failures with ``on_error="warn"``)."""
        w = self._writer
        return self._dropped_before + (w.dropped if w is not None else 0)

    @contextlib.contextmanager
    def use_metadata(self, *, global_step=None, walltime=None):
        """Default ``global_step``/``walltime`` for the ``add_*`` calls inside the block.

        Examples::

            with writer.use_metadata(global_step=10):
                writer.add_scalar("loss", 3.0)
        """
        if self._defaults is not None:
            raise RuntimeError("use_metadata: already inside a use_metadata block")
        if global_step is None and walltime is None:
            raise ValueError("use_metadata: give global_step or walltime")
        self._defaults = {
            "global_step": _check_step(global_step),
            "walltime": None if walltime is None else _check_walltime(walltime),
        }
        try:
            yield self
        finally:
            self._defaults = None

    def flush(self):
        """Barrier: when it returns, everything added before it is in the file."""
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        """Flush, fsync and close the files. Idempotent; a later ``add_*`` opens a new file."""
        w, self._writer = self._writer, None
        self._file_writers = None
        if w is not None:
            try:
                w.close()
            finally:  # after close: its final drain may drop events too
                self._dropped_before += w.dropped

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.close()


def _without_metadata(v):
    from tbprobe.writer.proto import summary_pb2

    copy = summary_pb2.Summary.Value()
    copy.CopyFrom(v)
    copy.ClearField("metadata")
    return copy


def _int_arg(value, name: str, minimum: int) -> int:
    try:
        return check_int(value, name, minimum)
    except TypeError as e:  # the constructor's arguments have always raised ValueError
        raise ValueError(str(e)) from None
