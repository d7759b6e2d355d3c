"""`tbprobe report`: runs written with tbprobe's SummaryWriter (complete, truncated mid-record,
still open, several runs), text and JSON output, exit codes."""

import json
import os

import pytest

from tbprobe import SummaryWriter
from tbprobe.cli import main
from tbprobe.probe.anomaly import format_markdown
from tbprobe.probe.diagnosis import Diagnosis
from tbprobe.probe.report import diagnose_logdir
from tbprobe.writer.proto import event_pb2, summary_pb2
from tbprobe.writer.record import frame

from .faults import Fault, train

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
)


@pytest.fixture(scope="module")
def nan_records():
    """MLP records with a forward NaN planted in module 2 at step 20."""
    return train("mlp", "adam", 24, fault=Fault("mlp", "forward_nan", step=20), stats_every=0)[0]


@pytest.fixture(scope="module")
def spike_records():
    """MLP records with a 1000x learning-rate spike in module 2 at step 20."""
    return train("mlp", "sgd", 24, fault=Fault("mlp", "lr_spike", step=20), stats_every=0)[0]


def write_records(w, records):
    """Write records the way the probe does: norm tags per DESIGN.md plus `anomaly` texts."""
    diag = Diagnosis()
    for r in records:
        for prefix, mapping in (
            ("grad_norm", r.grad_norms),
            ("param_norm", r.param_norms),
            ("update_ratio", r.update_ratios),
        ):
            for name, x in mapping.items():
                if prefix != "grad_norm" and name == "_total":
                    continue
                w.add_scalar(f"{prefix}/{name}", x, r.step)
        new = diag.feed(r)
        if new:
            w.add_text("anomaly", format_markdown(new), r.step)


def report_json(capsys, path):
    assert main(["report", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_complete_run_names_first_nonfinite(tmp_path, nan_records, capsys):
    """The text report names the first non-finite step and module, from the anomaly text
    and from the scalars; JSON carries the same."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        write_records(w, nan_records)
    assert main(["report", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "step 20: nonfinite at 2 (forward output)" in text
    assert "scalars: step 20:" in text and "grad_norm/" in text
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    first = run["first_nonfinite"]
    assert first["anomaly"]["step"] == 20 and first["anomaly"]["where"] == "2"
    assert first["anomaly"]["pass"] == "forward"
    assert first["scalars"]["step"] == 20
    assert run["steps"] == [0, 23] and run["notes"] == []


def test_spikes_recomputed_with_top_layers(tmp_path, spike_records, capsys):
    """Spikes are recomputed from the norm series: the update spike at step 20 in module 2."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        write_records(w, spike_records)
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    first = run["spikes"][0]
    assert (first["step"], first["module"], first["pass_"]) == (20, "2", "update")
    assert first["top"][0][0] in ("2.weight", "2.bias")
    trends = {t["tag"]: t for t in run["trends"]}
    assert trends["param_norm/2.weight"]["max_step"] >= 20
    assert trends["param_norm/2.weight"]["growth"] > 5
    assert main(["report", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "step 20: spike at 2." in text and "per-layer trends" in text
    assert "(update)" in text and "(update update)" not in text  # pass and tensor said once


def test_truncated_run_reads_up_to_the_damage(tmp_path, nan_records, capsys):
    """A killed run (last record cut mid-way) is reported from what precedes the cut."""
    run_dir = tmp_path / "run"
    with SummaryWriter(str(run_dir)) as w:
        write_records(w, nan_records)
    (path,) = [run_dir / f for f in os.listdir(run_dir)]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 7)
    run = report_json(capsys, run_dir)["runs"]["."]
    assert any("truncated" in n for n in run["notes"])
    assert run["first_nonfinite"]["anomaly"]["step"] == 20
    assert run["steps"][1] == 23  # every whole record before the cut


def test_run_still_being_written(tmp_path, nan_records, capsys):
    """A run whose writer is still open is reported from what it has flushed so far."""
    w = SummaryWriter(str(tmp_path / "run"))
    try:
        write_records(w, nan_records[:15])
        w.flush()
        run = report_json(capsys, tmp_path / "run")["runs"]["."]
        assert run["steps"] == [0, 14] and run["first_nonfinite"]["scalars"] is None
        write_records(w, nan_records[15:])
        w.flush()
    finally:
        w.close()
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    assert run["steps"] == [0, 23]


def test_several_runs_under_logdir(tmp_path, nan_records, spike_records):
    """Every run directory under LOGDIR gets its own diagnosis."""
    with SummaryWriter(str(tmp_path / "a")) as w:
        write_records(w, nan_records)
    with SummaryWriter(str(tmp_path / "b" / "c")) as w:
        write_records(w, spike_records)
    report = diagnose_logdir(str(tmp_path))
    assert sorted(report["runs"]) == ["a", os.path.join("b", "c")]
    assert report["runs"]["a"]["first_nonfinite"]["anomaly"]["step"] == 20
    assert report["runs"][os.path.join("b", "c")]["first_nonfinite"]["anomaly"] is None


def test_bad_logdir_exits_2(tmp_path, capsys):
    """A missing LOGDIR, or one without event files, exits 2 with a clear message."""
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no event files" in capsys.readouterr().err


def test_run_without_probe_tags(tmp_path, capsys):
    """A plain run (no probe tags) still gets a report: nothing found, exit 0."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        for i in range(5):
            w.add_scalar("train/loss", 1.0 / (i + 1), i)
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    assert run["spikes"] == [] and run["trends"] == []
    assert run["first_nonfinite"] == {"anomaly": None, "scalars": None}


def test_trend_ends_are_the_finite_values_at_their_steps(tmp_path, capsys):
    """A series with non-finite ends reports its first and last finite values with their own
    steps, in text and JSON."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        for step, x in enumerate([float("nan"), 1.0, 2.0, 4.0, float("nan")]):
            w.add_scalar("grad_norm/fc.weight", x, step)
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    (trend,) = run["trends"]
    assert (trend["first"], trend["first_step"], trend["last"], trend["last_step"]) == (1, 1, 4, 3)
    assert trend["nonfinite"] == 2
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "first 1 (step 1) → last 4 (step 3)" in capsys.readouterr().out


def test_text_report_shows_nonfinite_norms(tmp_path, capsys):
    """The text form lists the recomputed non-finite norms, the same rows as the JSON."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        for step, x in enumerate([float("nan"), 1.0, 2.0, 4.0, float("inf")]):
            w.add_scalar("grad_norm/fc.weight", x, step)
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    assert [a["step"] for a in run["nonfinite_norms"]] == [0, 4]
    assert main(["report", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    section = text.split("non-finite norms")[1].split("warnings:")[0]
    for a in run["nonfinite_norms"]:
        assert f"step {a['step']}: nonfinite at fc.weight" in section
        assert a["message"] in section


def test_amp_skipped_steps_are_not_reported(tmp_path, capsys):
    """A GradScaler's normal overflow steps (non-finite gradient norms, parameters left
    finite: the optimizer step was skipped) are no anomaly in the report, as in the probe;
    a non-finite gradient that reached the parameters is."""
    inf, nan = float("inf"), float("nan")
    with SummaryWriter(str(tmp_path / "run")) as w:
        for step in range(30):
            bad = step in (7, 14, 21, 25)
            w.add_scalar("grad_norm/fc.weight", inf if bad else 1.0 + step % 3, step)
            w.add_scalar("param_norm/fc.weight", nan if step >= 25 else 5.0, step)
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    assert [a["step"] for a in run["nonfinite_norms"]] == [25]


def test_bare_event_file_name_in_cwd(tmp_path, monkeypatch, capsys):
    """`tbprobe report events.out.tfevents.X` from the file's directory reads that file."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar("train/loss", 1.0, 3)
    (name,) = os.listdir(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    report = report_json(capsys, name)
    assert list(report["runs"]) == ["."] and report["runs"]["."]["steps"] == [3, 3]


def test_file_that_is_not_an_event_file_exits_2(tmp_path, capsys):
    """A path to a file whose name has no "tfevents" is a one-line error, exit 2."""
    (tmp_path / "notes.txt").write_text("hello\n")
    assert main(["report", str(tmp_path / "notes.txt")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "not an event file" in err


def test_record_that_is_not_an_event_is_a_note(tmp_path, capsys):
    """A CRC-valid record that is not an Event proto is noted, and the records after it read."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar("train/loss", 1.0, 1)
    (path,) = [tmp_path / "run" / f for f in os.listdir(tmp_path / "run")]
    offset = path.stat().st_size
    after = event_pb2.Event(
        step=2,
        summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag="train/loss", simple_value=0.5)]
        ),
    )
    with open(path, "ab") as f:
        f.write(frame(b"\xff\xff\xff\x07garbage") + frame(after.SerializeToString()))
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    (note,) = run["notes"]
    assert f"record is not an Event proto at byte offset {offset}" in note
    assert run["steps"] == [1, 2]


def test_crc_note_says_where_the_damage_is(tmp_path, capsys):
    """A CRC failure mid-file is not worded as a run still being written; one in the last
    record says it is the last record."""
    with SummaryWriter(str(tmp_path / "src")) as w:
        for i in range(5):
            w.add_scalar("x", float(i), i)
    (src,) = [tmp_path / "src" / f for f in os.listdir(tmp_path / "src")]
    data = src.read_bytes()
    for where, expected in ((len(data) // 2, "damage inside the file"), (-1, "last record")):
        run_dir = tmp_path / f"run{where}"
        run_dir.mkdir()
        damaged = bytearray(data)
        damaged[where] ^= 0x20
        (run_dir / src.name).write_bytes(bytes(damaged))
        (note,) = report_json(capsys, run_dir)["runs"]["."]["notes"]
        assert "CRC mismatch" in note and expected in note
        assert "still being written" not in note


def test_dangling_symlink_is_skipped_with_a_note(tmp_path, capsys):
    """A dangling *tfevents* symlink in a run directory is a note; the other files are read."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar("train/loss", 1.0, 1)
    os.symlink(tmp_path / "gone", tmp_path / "run" / "events.out.tfevents.zzz.dangling")
    run = report_json(capsys, tmp_path / "run")["runs"]["."]
    (note,) = run["notes"]
    assert "events.out.tfevents.zzz.dangling" in note and "skipped" in note
    assert run["steps"] == [1, 1]
