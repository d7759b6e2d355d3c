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
