"""``FileWriter``: tensorboardX's low-level per-directory writer, as a view on a ``SummaryWriter``.

tensorboardX code reaches past ``SummaryWriter`` to ``writer.file_writer`` (or
``writer._get_file_writer()``) to add protobuf ``Summary`` and ``Event`` messages it built
itself, and ``writer.all_writers`` lists one such writer per directory. In tbprobe every
directory of a run shares the ``SummaryWriter``'s single background writer, so a ``FileWriter``
holds no file or thread: it validates, serialises and queues onto that writer, for the run
directory (``key`` None) or one ``add_scalars`` sub-run (``key`` its relative path).
"""

from __future__ import annotations

import os

from tbprobe.writer.proto import event_pb2, summary_pb2


def _message_bytes(message, expected: str, name: str) -> bytes:
    """The serialised bytes of a protobuf message named ``expected`` (from any generated
    module: tensorboardX's, tensorboard's or tbprobe's share one wire format)."""
    descriptor = getattr(message, "DESCRIPTOR", None)
    if getattr(descriptor, "name", None) != expected or not hasattr(message, "SerializeToString"):
        raise TypeError(
            f"{name}: expected a protobuf {expected} message, got {type(message).__name__}"
        )
    return message.SerializeToString()


class FileWriter:
    """Adds ``Summary`` and ``Event`` protobufs to the event file of one directory of a run.

    Returned by ``SummaryWriter.file_writer`` / ``_get_file_writer()`` and listed in
    ``SummaryWriter.all_writers``; not constructed directly. Global steps and wall times are
    checked as in ``add_*`` (int64 steps, finite wall times) and ``use_metadata`` defaults apply.

    Examples::

        from tensorboardX.summary import scalar
        writer.file_writer.add_summary(scalar("loss", 0.5), global_step=3)
    """

    def __init__(self, owner, key: str | None = None):
        self._owner = owner
        self._key = key

    def get_logdir(self) -> str:
        """The directory this writer's event file is in (a str, as in tensorboardX)."""
        root = self._owner._logdir
        return root if self._key is None else os.path.join(root, self._key)

    def add_event(self, event, step=None, walltime=None):
        """Write ``event`` (a protobuf ``Event``) as is, except that its ``wall_time`` is set
        to ``walltime`` (default: now) and, when ``step`` is given, its ``step`` to ``step``.
        The caller's message is not modified."""
        ev = event_pb2.Event.FromString(_message_bytes(event, "Event", "event"))
        step, wall = self._owner._step_wall(step, walltime)
        ev.wall_time = wall
        if step is not None:
            ev.step = step
        self._owner._emit_event(ev, self._key)

    def add_summary(self, summary, global_step=None, walltime=None):
        """Write ``summary`` (a protobuf ``Summary``, e.g. from ``tensorboardX.summary``) in one
        event at ``global_step`` and ``walltime`` (default: now)."""
        parsed = summary_pb2.Summary.FromString(_message_bytes(summary, "Summary", "summary"))
        step, wall = self._owner._step_wall(global_step, walltime)
        self._owner._emit(parsed.value, step, wall, key=self._key)

    def add_graph(self, graph_profile, walltime=None):
        """A ``(GraphDef, RunMetadata)`` pair, as tensorboardX's ``FileWriter.add_graph``."""
        graph, run_metadata = graph_profile
        self.add_event(event_pb2.Event(graph_def=graph.SerializeToString()), None, walltime)
        ev = event_pb2.Event()
        ev.tagged_run_metadata.tag = "profiler"
        ev.tagged_run_metadata.run_metadata = run_metadata.SerializeToString()
        self.add_event(ev, None, walltime)

    def add_onnx_graph(self, graph, walltime=None):
        """A ``GraphDef`` (tensorboardX builds it from an ONNX model)."""
        self.add_event(event_pb2.Event(graph_def=graph.SerializeToString()), None, walltime)

    add_openvino_graph = add_onnx_graph

    def use_metadata(self, *, global_step=None, walltime=None):
        """The ``SummaryWriter``'s ``use_metadata``: defaults for the calls inside the block."""
        return self._owner.use_metadata(global_step=global_step, walltime=walltime)

    def flush(self):
        """Barrier: everything added before it is in the files (all of the run's files)."""
        self._owner.flush()

    def close(self):
        """Flush, fsync and close this directory's event file; the ``SummaryWriter`` and its
        other files stay open. Unlike tensorboardX, a later event is not dropped: it goes to
        a new event file in the same directory (what ``reopen()`` does there)."""
        owner = self._owner
        if owner._writer is not None:
            owner._writer.close_file(self._key)
            # the new file must carry each tag's plugin metadata again
            owner._meta_sent = {s: t for s, t in owner._meta_sent.items() if s[0] != self._key}

    def reopen(self):
        """Nothing to do: after ``close()`` the next event opens a new file by itself."""
        self._owner._get_writer()

    def __repr__(self):
        return f"FileWriter({self.get_logdir()!r})"
