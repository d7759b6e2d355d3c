"""tensorboardX compatibility of global steps, constructor arguments, integral counts and the
``file_writer`` / ``all_writers`` attributes, read back with TensorBoard's EventAccumulator."""

import json
import math
import os
import pathlib
import re
import socket

import numpy as np
import pytest
import tensorboardX
import torch
from tensorboard.compat.proto import event_pb2 as tb_event_pb2
from tensorboard.compat.proto import summary_pb2 as tb_summary_pb2
from tensorboardX import summary as tbx_summary

from tbprobe import SummaryWriter
from tbprobe.writer import read_events, record
from tbprobe.writer import values as values_mod

from .conftest import accumulate, values_by_tag

INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)

# ----------------------------------------------------------------------------- global steps

# Every add_* that takes a global_step, called at ``step`` (each on its own tag).
CALLS = {
    "add_scalar": lambda w, s: w.add_scalar("sc", 1.5, s),
    "add_scalar_meta": lambda w, s: w.add_scalar("sm", 1.5, s, display_name="d"),
    "add_scalars": lambda w, s: w.add_scalars("ss", {"a": 1.0}, s),
    "add_histogram": lambda w, s: w.add_histogram("hi", np.arange(5.0), s),
    "add_histogram_raw": lambda w, s: w.add_histogram_raw("hr", 0, 1, 2, 1, 1, [1.0], [2], s),
    "add_image": lambda w, s: w.add_image("im", np.zeros((3, 4, 4)), s),
    "add_images": lambda w, s: w.add_images("ims", np.zeros((2, 3, 4, 4)), s),
    "add_image_with_boxes": lambda w, s: w.add_image_with_boxes(
        "bx", np.zeros((3, 8, 8)), [[1, 1, 5, 5]], s
    ),
    "add_video": lambda w, s: w.add_video("vi", np.zeros((1, 2, 3, 4, 4)), s),
    "add_audio": lambda w, s: w.add_audio("au", np.zeros(10), s),
    "add_text": lambda w, s: w.add_text("tx", "hello", s),
    "add_tensor": lambda w, s: w.add_tensor("te", torch.ones(2), s),
    "add_pr_curve": lambda w, s: w.add_pr_curve("pr", np.array([0, 1]), np.array([0.2, 0.8]), s),
    "add_pr_curve_raw": lambda w, s: w.add_pr_curve_raw(
        "prr", *([np.ones(3)] * 6), global_step=s, num_thresholds=3
    ),
    "add_mesh": lambda w, s: w.add_mesh("me", np.zeros((1, 3, 3)), global_step=s),
    "add_hparams": lambda w, s: w.add_hparams({"lr": 0.1}, {"hp/m": 1.0}, name="h", global_step=s),
    "file_writer": lambda w, s: w.file_writer.add_summary(tbx_summary.scalar("fw", 1.0), s),
    "file_writer_event": lambda w, s: w.file_writer.add_event(_event("fe"), s),
}


def _event(tag):
    ev = tb_event_pb2.Event()
    ev.summary.value.add(tag=tag, simple_value=1.0)
    return ev


def _steps_written(logdir):
    """Steps of every summary event under ``logdir`` (all runs), by our strict reader."""
    steps = set()
    for root, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents.") for f in files):
            steps |= {ev.step for ev in read_events(root, errors="raise") if ev.summary.value}
    return steps


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("step", [2**63, 2**64, INT64_MIN - 1, 2**70, 1e19, math.nan, math.inf])
def test_out_of_range_step_raises_on_every_path(logdir, call, step):
    """A step outside int64 (or NaN/inf) raises ValueError naming global_step, writing nothing."""
    with SummaryWriter(logdir) as w, pytest.raises(ValueError, match="global_step"):
        CALLS[call](w, step)
    assert _steps_written(logdir) == set()


@pytest.mark.parametrize("step", [INT64_MAX, INT64_MIN, -1, 0x200000, 2**62])
def test_int64_boundary_steps_read_back(logdir, step):
    """Steps at the int64 limits are written exactly; TensorBoard reads them back."""
    with SummaryWriter(logdir) as w:
        w.add_scalar("a", 1.0, step)  # the hand-encoded fast path
        w.add_histogram("h", [1.0, 2.0], step)  # the protobuf path
        w.add_scalar("b", torch.tensor(2.0), step)  # the deferred path
    ea = accumulate(logdir)
    assert [e.step for e in ea.Scalars("a")] == [step]
    assert [e.step for e in ea.Histograms("h")] == [step]
    assert [e.step for e in ea.Scalars("b")] == [step]


def test_record_rejects_steps_and_wall_times_it_cannot_encode():
    """record.py refuses a step outside int64 and a non-finite wall time, whoever calls it."""
    head = record.scalar_head("a")
    for step in (2**63, INT64_MIN - 1):
        with pytest.raises(ValueError, match="global_step"):
            record.scalar_event(head, 1.0, 1.0, step)
        with pytest.raises(ValueError, match="global_step"):
            record.event_bytes(1.0, step, b"")
    with pytest.raises(ValueError, match="walltime"):
        record.event_bytes(math.nan, 1, b"")


@pytest.mark.parametrize("walltime", [math.nan, math.inf, -math.inf, 10**400])
def test_bad_walltime_raises(logdir, walltime):
    """A wall time that is not a finite float raises ValueError naming walltime."""
    with SummaryWriter(logdir) as w:
        with pytest.raises(ValueError, match="walltime"):
            w.add_scalar("a", 1.0, 1, walltime=walltime)
        with pytest.raises(ValueError, match="walltime"):
            w.file_writer.add_summary(tbx_summary.scalar("a", 1.0), 1, walltime=walltime)


FLOAT_STEPS = [
    (2.5, 2),
    (np.float64(15.0), 15),
    (np.float32(7.9), 7),
    (-2.5, -2),
    (torch.tensor(3.0), 3),
    (torch.tensor([4.9], dtype=torch.float64), 4),
    (torch.tensor(6), 6),
    (np.array(8.5), 8),
    (True, 1),
    (np.True_, 1),
    (np.int64(9), 9),
]


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("step, expected", FLOAT_STEPS, ids=repr)
def test_steps_taken_as_int_like_tensorboardx(logdir, call, step, expected):
    """Float, bool, numpy and host-tensor steps are written as int(step), as tensorboardX does."""
    with SummaryWriter(logdir) as w:
        CALLS[call](w, step)
    assert _steps_written(logdir) == {expected}


@pytest.mark.parametrize("step, expected", [(2.5, 2), (torch.tensor(3.0), 3), (2**63, None)])
def test_use_metadata_step_taken_as_int(logdir, step, expected):
    """use_metadata's global_step follows the same rule: int(step), int64 or ValueError."""
    with SummaryWriter(logdir) as w:
        if expected is None:
            with pytest.raises(ValueError, match="global_step"), w.use_metadata(global_step=step):
                pass
            return
        with w.use_metadata(global_step=step):
            w.add_scalar("a", 1.0)
            w.add_text("t", "x")
    assert _steps_written(logdir) == {expected}


def test_float_step_of_embedding(logdir):
    """add_embedding takes int(global_step) for its directory; NaN or beyond int64 raises."""
    with SummaryWriter(logdir) as w:
        w.add_embedding(np.eye(3), global_step=2.5)
        w.add_embedding(np.eye(3), global_step=torch.tensor(7.0), tag="t")
        for bad in (math.nan, 2**63, 1e19):
            with pytest.raises(ValueError, match="global_step"):
                w.add_embedding(np.eye(3), global_step=bad)
    assert sorted(os.listdir(logdir))[:2] == ["00002", "00007"]
    assert os.path.isfile(os.path.join(logdir, "00002", "default", "tensors.tsv"))


def test_float_step_and_log_freq(logdir):
    """log_freq applies to int(step): 4.5 is step 4, a multiple of 2."""
    with SummaryWriter(logdir, log_freq=np.int64(2)) as w:
        for s in (3.0, 4.5, 5.0, 6.25):
            w.add_scalar("a", s, s)
            w.add_scalars("m", {"x": s}, s)
    assert [e.step for e in accumulate(logdir).Scalars("a")] == [4, 6]
    assert [e.step for e in accumulate(os.path.join(logdir, "m", "x")).Scalars("m")] == [4, 6]


def test_float_device_tensor_step_raises_without_sync(logdir, monkeypatch):
    """A float tensor step on a device raises TypeError (reading it would wait for the device)."""
    monkeypatch.setattr(values_mod, "is_device_tensor", lambda v: isinstance(v, torch.Tensor))
    with SummaryWriter(logdir) as w:
        for call in ("add_scalar", "add_text", "add_histogram"):
            with pytest.raises(TypeError, match="global_step"):
                CALLS[call](w, torch.tensor(3.0))


# ----------------------------------------------------------------------------- constructor


def test_empty_logdir_uses_default_run_name(tmp_path, monkeypatch):
    """SummaryWriter("") names the run as with no logdir (tensorboardX's `if not logdir`)."""
    monkeypatch.chdir(tmp_path)
    with SummaryWriter("", comment=None) as w:
        w.add_scalar("a", 1.0, 1)
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"runs/[A-Z][a-z]{{2}}\d\d_\d\d-\d\d-\d\d_{host}", w.logdir)
    assert accumulate(w.logdir).Scalars("a")[0].value == 1.0


def test_logdir_wins_over_log_dir(tmp_path, monkeypatch):
    """logdir is used when both are given; log_dir only when logdir is None (tensorboardX)."""
    monkeypatch.chdir(tmp_path)
    with SummaryWriter("a", log_dir="b") as w:
        w.add_scalar("x", 1.0, 1)
    with SummaryWriter(log_dir="c") as w2:
        pass
    assert (w.logdir, w2.logdir) == ("a", "c")
    assert os.path.isdir("a") and not os.path.exists("b") and os.path.isdir("c")


def test_path_logdir_kept_as_given(tmp_path):
    """w.logdir keeps a pathlib.Path; get_logdir(), file writers and sub-runs use its str."""
    run = tmp_path / "run"
    with SummaryWriter(run) as w:
        assert w.logdir is run
        assert w.get_logdir() == str(run) and w.file_writer.get_logdir() == str(run)
        w.add_scalars("loss", {"train": 1.0}, 1)
        w.add_hparams({"lr": 0.1}, {"hp/acc": 0.5}, name="hp")
        w.add_embedding(np.eye(2))
        w.export_scalars_to_json(str(tmp_path / "s.json"))
        assert sorted(w.all_writers) == [str(run), os.path.join(str(run), "loss", "train")]
    assert list(json.loads((tmp_path / "s.json").read_text())) == [str(run / "loss" / "train")]
    assert accumulate(str(run / "loss" / "train")).Scalars("loss")[0].value == 1.0
    assert accumulate(str(run / "hp")).Scalars("hp/acc")[0].value == 0.5
    assert (run / "projector_config.pbtxt").is_file()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_queue=0),
        dict(max_queue=np.int64(5)),
        dict(flush_secs=0),
        dict(flush_secs=np.float32(0.5)),
        dict(log_freq=np.int64(1)),
        dict(max_queue_bytes=np.int64(1 << 20)),
        dict(purge_step=np.float64(3.0)),
    ],
    ids=repr,
)
def test_tensorboardx_constructor_values_accepted(logdir, kwargs):
    """max_queue=0 (unbounded there), numpy ints and flush_secs=0 are accepted; events arrive."""
    with SummaryWriter(logdir, **kwargs) as w:
        for s in range(5):
            w.add_scalar("a", float(s), s + 10)
    assert [e.value for e in accumulate(logdir).Scalars("a")] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_flush_secs_zero_fsyncs_while_events_arrive(logdir, monkeypatch):
    """flush_secs=0 fsyncs after the writer thread writes, without waiting for close()."""
    import threading

    from tbprobe.writer import event_file_disk

    synced = threading.Event()
    monkeypatch.setattr(event_file_disk.os, "fsync", lambda fd: synced.set())
    w = SummaryWriter(logdir, flush_secs=0)
    w.add_scalar("a", 1.0, 1)
    w.flush()  # a barrier without fsync: only the periodic fsync can set the event
    assert synced.wait(10)
    w.close()


# ----------------------------------------------------------------------------- integral counts


def test_numpy_integers_wherever_counts_are_expected(tmp_path):
    """bins, max_bins, num_thresholds, fps and sample_rate accept numpy integers, giving what
    the Python ints give."""
    x = np.random.default_rng(0).standard_normal(500)
    labels, preds = np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.6, 0.4])

    def calls(w, n):
        w.add_histogram("h", x, 1, bins=n(12), max_bins=n(3))
        w.add_histogram("ht", x, 1, max_bins=n(40))
        w.add_pr_curve("pr", labels, preds, 1, num_thresholds=n(9))
        w.add_video("v", np.zeros((1, 2, 3, 4, 4)), 1, fps=n(5))
        w.add_audio("a", np.zeros(80), 1, sample_rate=n(8000))

    dirs = {}
    for name, n in (("int", int), ("np", np.int64), ("np32", np.uint32)):
        dirs[name] = str(tmp_path / name)
        with SummaryWriter(dirs[name]) as w:
            calls(w, n)
    ref = values_by_tag(dirs["int"])
    assert ref["h"][0][1].histo.bucket and len(ref["h"][0][1].histo.bucket) <= 4
    for name in ("np", "np32"):
        got = values_by_tag(dirs[name])
        assert sorted(got) == sorted(ref)
        for tag in ref:
            assert got[tag][0][1] == ref[tag][0][1], tag


# ----------------------------------------------------------------------------- attributes


def test_default_bins_and_kwargs_like_tensorboardx(logdir):
    """default_bins equals tensorboardX's list; kwargs is the (empty) dict of extra arguments."""
    with SummaryWriter(logdir) as w:
        ref = tensorboardX.SummaryWriter(logdir + "_tbx")
        assert w.default_bins == ref.default_bins
        assert w.kwargs == ref.kwargs == {}
        ref.close()


def test_file_writer_add_summary_and_event_round_trip(logdir):
    """file_writer takes Summary/Event protobufs from tensorboardX, tensorboard or tbprobe."""
    with SummaryWriter(logdir) as w:
        fw = w.file_writer
        assert fw is w._get_file_writer() and fw.get_logdir() == logdir
        fw.add_summary(tbx_summary.scalar("tbx", 0.25), global_step=3)
        fw.add_summary(tbx_summary.histogram("hist", np.arange(10.0), 5), 4, 100.0)
        summary = tb_summary_pb2.Summary()
        summary.value.add(tag="tb", simple_value=2.0)
        fw.add_summary(summary, 5)
        event = tb_event_pb2.Event(step=6)
        event.summary.value.add(tag="ev", simple_value=3.0)
        fw.add_event(event)
        fw.add_event(event, step=7, walltime=50.0)
        fw.add_summary(tbx_summary.text("note", "hi"), 8)
        fw.flush()
        with pytest.raises(TypeError, match="summary"):
            fw.add_summary(event)
        with pytest.raises(TypeError, match="event"):
            fw.add_event(summary)
    assert event.step == 6 and event.wall_time == 0.0  # the caller's message is untouched
    ea = accumulate(logdir)
    assert [(e.step, e.value) for e in ea.Scalars("tbx")] == [(3, 0.25)]
    assert [(e.step, e.wall_time) for e in ea.Histograms("hist")] == [(4, 100.0)]
    assert [(e.step, e.value) for e in ea.Scalars("tb")] == [(5, 2.0)]
    assert [(e.step, e.value, e.wall_time) for e in ea.Scalars("ev")][1] == (7, 3.0, 50.0)
    assert [e.step for e in ea.Scalars("ev")] == [6, 7]
    assert ea.Tensors("note/text_summary")[0].tensor_proto.string_val == [b"hi"]


def test_all_writers_and_close(logdir):
    """all_writers lists the run and add_scalars sub-runs; close() clears both attributes and
    _get_file_writer() reopens, as in tensorboardX."""
    w = SummaryWriter(logdir)
    w.add_scalars("loss", {"train": 1.0, "val": 2.0}, 1)
    fws = w.all_writers
    assert sorted(fws) == [logdir, os.path.join(logdir, "loss", "train"), fws_val(logdir)]
    fws[fws_val(logdir)].add_summary(tbx_summary.scalar("extra", 5.0), 2)
    w.close()
    assert w.file_writer is None and w.all_writers is None
    w._get_file_writer().add_summary(tbx_summary.scalar("after", 1.0), 3)
    assert w.file_writer is not None
    w.close()
    assert accumulate(fws_val(logdir)).Scalars("extra")[0].value == 5.0
    assert [ev.step for ev in read_events(logdir) if ev.summary.value] == [3]


def fws_val(logdir):
    return os.path.join(logdir, "loss", "val")


def test_file_writer_close_keeps_summary_writer_open(logdir):
    """Closing a file writer closes its file only: the SummaryWriter keeps writing, a later
    event for that directory goes to a new file, and nothing is lost."""
    with SummaryWriter(logdir) as w:
        w.add_text("t", "one", 1)
        w.add_scalars("m", {"x": 1.0}, 1)
        w.file_writer.close()
        (first,) = [f for f in os.listdir(logdir) if f.startswith("events")]
        w.add_text("t", "two", 2)
        w.add_scalars("m", {"x": 2.0}, 2)
        w.file_writer.reopen()
    files = [f for f in os.listdir(logdir) if f.startswith("events")]
    assert len(files) == 2
    files = [first] + [f for f in files if f != first]
    texts = [e.tensor_proto.string_val for e in accumulate(logdir).Tensors("t/text_summary")]
    assert texts == [[b"one"], [b"two"]]
    (new_text,) = [v for v in values_by_tag(os.path.join(logdir, files[1]))["t/text_summary"]]
    assert new_text[1].metadata.plugin_data.plugin_name == "text"  # sent again in the new file
    steps = sorted(ev.step for ev in read_events(logdir, errors="raise") if ev.summary.value)
    assert steps == [1, 2]
    assert [e.value for e in accumulate(os.path.join(logdir, "m", "x")).Scalars("m")] == [1, 2]


def test_write_to_disk_false_file_writer(logdir):
    """With write_to_disk=False the file writer takes summaries and writes nothing."""
    with SummaryWriter(logdir, write_to_disk=False) as w:
        w.file_writer.add_summary(tbx_summary.scalar("a", 1.0), 1)
        w.add_scalars("m", {"x": 1.0}, 1)
        assert sorted(w.all_writers) == [logdir, os.path.join(logdir, "m", "x")]
    assert not os.path.exists(logdir)


def test_path_of_file_writer_for_pathlib(tmp_path):
    """A pathlib logdir: file_writer.get_logdir() is its str, as tensorboardX's FileWriter."""
    with SummaryWriter(pathlib.Path(tmp_path) / "p") as w:
        assert w.file_writer.get_logdir() == str(tmp_path / "p")
