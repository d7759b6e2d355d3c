"""SummaryWriter scalars and histograms, read back by TensorBoard and compared to tensorboardX."""

import math
import os
import re
import socket

import numpy as np
import pytest
import tensorboardX
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tbprobe import SummaryWriter
from tbprobe.writer import read_events
from tbprobe.writer import values as values_mod

from .conftest import accumulate, values_by_tag

TF_NAME = re.compile(r"^events\.out\.tfevents\.\d{10}\.[^.]+\.\d+\.\d+(\..*)?$")


def test_scalars_read_back_by_tensorboard(logdir):
    """Scalars come back from EventAccumulator with their steps and float32 values."""
    with SummaryWriter(logdir) as w:
        for step in range(50):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
        w.add_scalar("weird tag (x)", 2.5, 3)
    ea = accumulate(logdir)
    got = ea.Scalars("train/loss")
    assert [e.step for e in got] == list(range(50))
    np.testing.assert_allclose([e.value for e in got], [1.0 / (s + 1) for s in range(50)], 1e-7)
    assert ea.Scalars("weird_tag__x_")[0].value == 2.5  # tensorboardX's tag cleaning


@pytest.mark.parametrize(
    "value",
    [
        3,
        3.0,
        np.float32(3.0),
        np.int64(3),
        np.array(3.0),
        np.array([3.0]),
        torch.tensor(3.0),
        torch.tensor([[3]], dtype=torch.int32),
        torch.tensor(3.0, dtype=torch.bfloat16),
        torch.tensor(3.0, dtype=torch.float16),
        torch.tensor(3.0, dtype=torch.float8_e4m3fn),
        torch.tensor(True),
        True,
    ],
    ids=repr,
)
def test_scalar_values_of_any_kind(logdir, value):
    """Numbers, numpy scalars/arrays and tensors of any dtype are accepted as scalars."""
    with SummaryWriter(logdir) as w:
        w.add_scalar("v", value, 1)
    (e,) = accumulate(logdir).Scalars("v")
    assert e.value == float(np.asarray(torch.as_tensor(value).float()).reshape(()))


def test_bf16_never_through_fp16(logdir):
    """A bf16 value above fp16's range keeps its value (fp16 would make it inf)."""
    big = torch.tensor(3.0e6, dtype=torch.bfloat16)
    with SummaryWriter(logdir) as w:
        w.add_scalar("big", big, 1)
        w.add_histogram("bigh", torch.full((10,), 1.0e6, dtype=torch.bfloat16), 1)
    ea = accumulate(logdir)
    assert ea.Scalars("big")[0].value == float(big.float())
    assert ea.Histograms("bigh")[0].histogram_value.max == float(torch.tensor(1e6).bfloat16())


def _tbx_histogram(tmp_path, data, bins, max_bins=None):
    d = str(tmp_path / "tbx")
    w = tensorboardX.SummaryWriter(d)
    w.add_histogram("h", data, 1, bins=bins, max_bins=max_bins)
    w.close()
    return accumulate(d).Histograms("h")[0].histogram_value


@pytest.mark.parametrize(
    "bins, max_bins",
    [
        ("tensorflow", None),
        ("tensorflow", 40),
        (10, None),
        (33, 8),
        ([-2.0, -0.5, 0.0, 0.1, 3.0], None),
        ("auto", None),
        ("fd", None),
        ("sturges", None),
        ("sqrt", None),
        ("doane", None),
        ("scott", None),
        ("rice", None),
        ("stone", None),
    ],
    ids=str,
)
@pytest.mark.parametrize("source", ["numpy", "torch", "list"])
def test_histogram_equals_tensorboardx(tmp_path, bins, max_bins, source):
    """Buckets, limits and moments equal tensorboardX's for the same data and bins."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal(5000) * 3
    arg = {"numpy": data, "torch": torch.from_numpy(data), "list": data.tolist()}[source]
    ours_dir = str(tmp_path / "ours")
    with SummaryWriter(ours_dir) as w:
        w.add_histogram("h", arg, 1, bins=bins, max_bins=max_bins)
    ours = accumulate(ours_dir).Histograms("h")[0].histogram_value
    ref = _tbx_histogram(tmp_path, data, bins, max_bins)
    assert list(ours.bucket_limit) == list(ref.bucket_limit)
    assert list(ours.bucket) == list(ref.bucket)
    assert (ours.min, ours.max, ours.num) == (ref.min, ref.max, ref.num)
    assert ours.sum == pytest.approx(ref.sum, rel=1e-9, abs=1e-9)
    assert ours.sum_squares == pytest.approx(ref.sum_squares, rel=1e-9)


def test_histogram_float32_large_equals_tensorboardx(tmp_path):
    """A 2M-element fp32 tensor (the parallel path) gives tensorboardX's buckets."""
    x = torch.randn(2_000_003, generator=torch.Generator().manual_seed(1))
    ours_dir = str(tmp_path / "ours")
    with SummaryWriter(ours_dir) as w:
        w.add_histogram("h", x, 1)
    ours = accumulate(ours_dir).Histograms("h")[0].histogram_value
    ref = _tbx_histogram(tmp_path, x, "tensorflow")
    assert list(ours.bucket) == list(ref.bucket)
    assert list(ours.bucket_limit) == list(ref.bucket_limit)
    assert ours.sum_squares == pytest.approx(ref.sum_squares, rel=1e-6)


def test_histogram_nonfinite_counted_and_described(logdir):
    """NaN/±Inf never raise or poison moments; their counts are in the description."""
    x = np.array([1.0, 2.0, np.nan, np.inf, -np.inf, np.nan])
    with SummaryWriter(logdir) as w:
        w.add_histogram("h", x, 1)
        w.add_histogram("allnan", np.full(4, np.nan), 1)
    vals = values_by_tag(logdir)
    (_, v) = vals["h"][0]
    assert (v.histo.min, v.histo.max, v.histo.num, v.histo.sum) == (1.0, 2.0, 2.0, 3.0)
    assert "nan=2" in v.metadata.summary_description
    assert "+inf=1" in v.metadata.summary_description
    (_, allnan) = vals["allnan"][0]
    assert allnan.histo.num == 0 and "nan=4" in allnan.metadata.summary_description
    assert accumulate(logdir).Histograms("allnan")  # TensorBoard still reads it


def test_histogram_raw_matches_tensorboardx(tmp_path):
    """add_histogram_raw writes exactly the given buckets."""
    args = dict(
        min=-1, max=2, num=6, sum=3, sum_squares=8, bucket_limits=[0, 1, 2], bucket_counts=[1, 3, 2]
    )
    d = str(tmp_path / "ours")
    with SummaryWriter(d) as w:
        w.add_histogram_raw("r", global_step=4, **args)
    t = str(tmp_path / "tbx")
    with tensorboardX.SummaryWriter(t) as w:
        w.add_histogram_raw("r", global_step=4, **args)
    ours, ref = accumulate(d).Histograms("r")[0], accumulate(t).Histograms("r")[0]
    assert (ours.step, ours.histogram_value) == (ref.step, ref.histogram_value)
    with SummaryWriter(d) as w, pytest.raises(ValueError, match="bucket_limits"):
        w.add_histogram_raw("r", 0, 1, 1, 1, 1, [1, 2], [1])


def test_empty_histogram_raises(logdir):
    """Empty input raises a clear ValueError."""
    with SummaryWriter(logdir) as w:
        for empty in (np.array([]), torch.zeros(0, 3), []):
            with pytest.raises(ValueError, match="empty"):
                w.add_histogram("h", empty, 1)


def test_deferred_device_path_resolves_on_writer_thread(logdir, monkeypatch):
    """The device path (reduce on device, resolve on the writer thread) gives the host result."""
    monkeypatch.setattr(values_mod, "is_device_tensor", lambda v: isinstance(v, torch.Tensor))
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    with SummaryWriter(logdir) as w:
        w.add_scalar("s", torch.tensor(2.5, dtype=torch.bfloat16), 1)
        w.add_histogram("h", x, 1)
        w.add_histogram("h10", x, 1, bins=10)
        w.add_histogram("hauto", x, 1, bins="auto")
    monkeypatch.undo()
    ref_dir = logdir + "_host"
    with SummaryWriter(ref_dir) as w:
        w.add_histogram("h", x, 1)
        w.add_histogram("h10", x, 1, bins=10)
        w.add_histogram("hauto", x, 1, bins="auto")
    ea, ref = accumulate(logdir), accumulate(ref_dir)
    assert ea.Scalars("s")[0].value == 2.5
    for tag in ("h", "h10", "hauto"):
        a, b = ea.Histograms(tag)[0].histogram_value, ref.Histograms(tag)[0].histogram_value
        assert (a.bucket, a.bucket_limit, a.min, a.max) == (b.bucket, b.bucket_limit, b.min, b.max)


def test_file_name_header_and_purge_step(logdir):
    """Files are named events.out.tfevents.<time>.<host>.<pid>.<n><suffix> and carry headers."""
    with SummaryWriter(logdir, purge_step=7, filename_suffix=".x") as w:
        w.add_scalar("a", 1.0, 8)
    (name,) = os.listdir(logdir)
    assert TF_NAME.match(name) and name.endswith(".x") and f".{os.getpid()}." in name
    events = list(read_events(logdir, errors="raise"))
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7 and events[1].file_version == "brain.Event:2"
    assert events[2].step == 7 and events[2].session_log.status == 1
    assert events[3].summary.value[0].tag == "a"


def test_purge_step_is_written_once_not_again_on_reopen(logdir):
    """A writer reopened after close() (a later add_*) writes no second purge: the steps it
    wrote after its purge point are not hidden from TensorBoard by itself."""
    w = SummaryWriter(logdir, purge_step=3)
    w.add_scalar("a", 1.0, 3)
    w.add_scalar("a", 2.0, 4)
    w.close()
    w.add_scalar("a", 3.0, 5)  # reopens a new file
    w.close()
    starts = [e.step for e in read_events(logdir, errors="raise") if e.session_log.status == 1]
    assert starts == [3] and w.purge_step is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir)
    ea.Reload()
    assert [s.step for s in ea.Scalars("a")] == [3, 4, 5]


@pytest.mark.parametrize("first", ["torch", "tbprobe"])
def test_torch_writer_in_the_same_directory_takes_its_own_file(logdir, first):
    """torch's SummaryWriter opened beside ours in the same second (Lightning's default
    logger, HF's report_to="tensorboard"): each writes its own file, neither fails nor
    truncates the other's, TensorBoard reads both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter as TorchWriter

    if first == "torch":
        theirs, ours = TorchWriter(logdir), SummaryWriter(logdir)
    else:
        ours, theirs = SummaryWriter(logdir), TorchWriter(logdir)
    for s in range(3):
        theirs.add_scalar("theirs", float(s), s)
        ours.add_scalar("ours", float(s), s)
    theirs.close()
    ours.close()
    assert len(os.listdir(logdir)) == 2
    ea = EventAccumulator(logdir)
    ea.Reload()
    assert (
        [e.step for e in ea.Scalars("theirs")] == [e.step for e in ea.Scalars("ours")] == [0, 1, 2]
    )


def test_a_taken_file_name_is_skipped(logdir, monkeypatch):
    """A name already on disk (another process that had our pid): the next one is used."""
    from tbprobe.writer import event_file_disk

    taken = event_file_disk.event_file_name()
    os.makedirs(logdir, exist_ok=True)
    open(os.path.join(logdir, taken), "wb").close()
    names = iter([taken])
    real = event_file_disk.event_file_name
    monkeypatch.setattr(
        event_file_disk, "event_file_name", lambda suffix="": next(names, None) or real(suffix)
    )
    with SummaryWriter(logdir) as w:
        w.add_scalar("a", 1.0, 0)
    assert os.path.getsize(os.path.join(logdir, taken)) == 0  # untouched
    assert [e.step for e in read_events(logdir, errors="raise") if e.summary.value] == [0]


def test_two_writers_same_second_do_not_collide(logdir):
    """Writers created in the same second on one run dir get distinct files."""
    ws = [SummaryWriter(logdir) for _ in range(3)]
    for i, w in enumerate(ws):
        w.add_scalar("a", float(i), i)
        w.close()
    assert len(os.listdir(logdir)) == 3
    assert sorted(ev.step for ev in read_events(logdir) if ev.summary.value) == [0, 1, 2]


def test_default_logdir_like_tensorboardx(tmp_path, monkeypatch):
    """Without a logdir, runs/<Mon><DD>_<HH-MM-SS>_<host><comment> is used."""
    monkeypatch.chdir(tmp_path)
    with SummaryWriter(comment="_lr0.1") as w:
        d = w.get_logdir()
    assert re.fullmatch(
        rf"runs/[A-Z][a-z]{{2}}\d\d_\d\d-\d\d-\d\d_{re.escape(socket.gethostname())}_lr0.1", d
    )
    assert os.path.isdir(d)


def test_log_freq_skips_off_steps(logdir):
    """With log_freq=N, calls at steps that are not multiples of N write nothing."""
    with SummaryWriter(logdir, log_freq=5) as w:
        for s in range(20):
            w.add_scalar("a", float(s), s)
            w.add_histogram("h", np.ones(3), s)
        w.add_scalar("nostep", 1.0)
    ea = accumulate(logdir)
    assert [e.step for e in ea.Scalars("a")] == [0, 5, 10, 15]
    assert [e.step for e in ea.Histograms("h")] == [0, 5, 10, 15]
    assert len(ea.Scalars("nostep")) == 1


def test_use_metadata_defaults(logdir):
    """use_metadata supplies global_step and walltime to the calls inside it."""
    with SummaryWriter(logdir) as w:
        with w.use_metadata(global_step=42, walltime=1000.0):
            w.add_scalar("a", 1.0)
            w.add_histogram("h", [1, 2, 3])
        with pytest.raises(ValueError, match="global_step or walltime"), w.use_metadata():
            pass
    ea = accumulate(logdir)
    assert (ea.Scalars("a")[0].step, ea.Scalars("a")[0].wall_time) == (42, 1000.0)
    assert ea.Histograms("h")[0].step == 42


def test_add_scalars_and_export_json(logdir, tmp_path):
    """add_scalars writes one sub-run per tag and export_scalars_to_json dumps them."""
    import json

    with SummaryWriter(logdir) as w:
        for s in range(3):
            w.add_scalars("loss", {"train": float(s), "val": 2.0 * s}, s)
        out = tmp_path / "s.json"
        w.export_scalars_to_json(str(out))
    data = json.loads(out.read_text())
    assert sorted(data) == sorted(os.path.join(logdir, "loss", t) for t in ("train", "val"))
    assert [row[1:] for row in data[os.path.join(logdir, "loss", "val")]] == [
        [0, 0.0],
        [1, 2.0],
        [2, 4.0],
    ]
    ea = accumulate(os.path.join(logdir, "loss", "val"))
    assert [e.value for e in ea.Scalars("loss")] == [0.0, 2.0, 4.0]


def test_write_to_disk_false_writes_nothing(logdir):
    """write_to_disk=False validates calls but creates no file."""
    with SummaryWriter(logdir, write_to_disk=False) as w:
        w.add_scalar("a", 1.0, 1)
        w.add_histogram("h", [1.0], 1)
    assert not os.path.exists(logdir)


def test_display_name_and_description(logdir):
    """display_name and summary_description travel in the scalar's metadata."""
    with SummaryWriter(logdir) as w:
        w.add_scalar("a", 1.0, 1, display_name="A", summary_description="desc")
    (_, v) = values_by_tag(logdir)["a"][0]
    assert (v.metadata.display_name, v.metadata.summary_description) == ("A", "desc")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tag=3, scalar_value=1.0), TypeError, "tag"),
        (dict(tag="a" * 5000, scalar_value=1.0), ValueError, "tag"),
        (dict(tag="///", scalar_value=1.0), ValueError, "tag"),
        (dict(tag="a", scalar_value="x"), TypeError, "scalar_value"),
        (dict(tag="a", scalar_value=[1.0, 2.0]), ValueError, "scalar_value"),
        (dict(tag="a", scalar_value=torch.ones(2)), ValueError, "scalar_value"),
        (dict(tag="a", scalar_value=torch.ones(1, dtype=torch.complex64)), TypeError, "complex"),
        (dict(tag="a", scalar_value=None), TypeError, "scalar_value"),
        (dict(tag="a", scalar_value=1.0, global_step="3"), TypeError, "global_step"),
        (dict(tag="a", scalar_value=1.0, global_step=math.nan), ValueError, "global_step"),
        (dict(tag="a", scalar_value=1.0, global_step=2**63), ValueError, "global_step"),
        (dict(tag="a", scalar_value=1.0, walltime=math.nan), ValueError, "walltime"),
        (dict(tag="a", scalar_value=1.0, walltime="now"), TypeError, "walltime"),
    ],
)
def test_add_scalar_bad_input(logdir, kwargs, error, match):
    """Bad scalar input raises a clear error naming the argument."""
    with SummaryWriter(logdir) as w, pytest.raises(error, match=match):
        w.add_scalar(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logdir=3), TypeError, "logdir"),
        (dict(logdir="x\x00y"), ValueError, "logdir"),
        (dict(max_queue=-1), ValueError, "max_queue"),
        (dict(max_queue=2.5), ValueError, "max_queue"),
        (dict(flush_secs=-1), ValueError, "flush_secs"),
        (dict(flush_secs=math.nan), ValueError, "flush_secs"),
        (dict(comment=3), TypeError, "comment"),
        (dict(log_freq=0), ValueError, "log_freq"),
        (dict(filename_suffix="a/b"), ValueError, "filename_suffix"),
        (dict(on_error="ignore"), ValueError, "on_error"),
        (dict(purge_step="1"), TypeError, "purge_step"),
        (dict(bogus=1), TypeError, "bogus"),
    ],
)
def test_constructor_bad_input(tmp_path, kwargs, error, match):
    """Bad constructor arguments raise a clear error naming the argument."""
    kwargs.setdefault("logdir", str(tmp_path / "r"))
    with pytest.raises(error, match=match):
        SummaryWriter(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    values=st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=50),
        st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=20),
        st.text(max_size=5),
        st.none(),
        st.dictionaries(st.text(max_size=3), st.floats(), max_size=2),
    ),
    bins=st.one_of(
        st.sampled_from(["tensorflow", "auto", "fd", "bogus"]),
        st.integers(-2, 30),
        st.lists(st.floats(allow_nan=True, allow_infinity=False), min_size=0, max_size=6),
    ),
)
def test_histogram_any_input_never_crashes_badly(tmp_path_factory, values, bins):
    """Any input either writes a histogram or raises a ValueError/TypeError naming the problem."""
    d = str(tmp_path_factory.mktemp("h"))
    with SummaryWriter(d) as w:
        try:
            w.add_histogram("h", values, 1, bins=bins)
        except (ValueError, TypeError) as e:
            assert re.search(r"values|bins|range|empty", str(e)), str(e)
            return
    (_, v) = values_by_tag(d)["h"][0]
    finite = [x for x in values if math.isfinite(x)]
    assert v.histo.num == len(finite)


def test_stuck_writer_never_hangs_training(logdir, monkeypatch):
    """With a full queue and a writer that makes no progress, add_* returns and counts drops."""
    import threading

    from tbprobe.writer import event_file

    monkeypatch.setattr(event_file, "STALL_TIMEOUT", 0.2)
    gate = threading.Event()
    real_write = event_file.EventFile.write

    def stuck_write(self, data):
        gate.wait()
        real_write(self, data)

    w = SummaryWriter(logdir, max_queue_bytes=1 << 16)
    monkeypatch.setattr(event_file.EventFile, "write", stuck_write)
    payload = "x" * 2000
    with pytest.warns(RuntimeWarning, match="no progress"):
        for i in range(200):  # ~400 KB of text events against a 64 KiB bound
            w.add_text("t", payload, i)
    assert w.dropped_events > 0
    gate.set()
    w.close()
    written = sum(1 for ev in read_events(logdir, errors="raise") if ev.summary.value)
    assert written + w.dropped_events == 200
