"""`tbprobe report` and `purge_step`: a run resumed from a checkpoint with
``SummaryWriter(purge_step=N)`` writes a ``SessionLog.START`` at step N, and the values read
before it at steps >= N (the abandoned timeline) are dropped, as TensorBoard's readers drop
them; compared with TensorBoard's own ``EventAccumulator`` on the same files."""

import json
import logging

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbprobe import SummaryWriter
from tbprobe.cli import main
from tbprobe.probe.anomaly import Anomaly, format_markdown

TAGS = ("grad_norm/_total", "grad_norm/fc.weight")


@pytest.fixture(autouse=True)
def _quiet_tensorboard_purge_warnings():
    """TensorBoard's accumulators log each purge as a warning: expected here."""
    logger = logging.getLogger("tensorboard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def nan_anomaly(step: int) -> str:
    a = Anomaly(step, "nonfinite", "fc", "output", 4.0, None, "4 NaN/Inf", pass_="forward")
    return format_markdown([a])


def write_timeline(run_dir, steps, value, nan_from=None, purge_step=None):
    """One writer's timeline: the norm tags at ``steps`` (``value``, NaN from ``nan_from`` on)
    and a probe ``anomaly`` text at ``nan_from``."""
    with SummaryWriter(str(run_dir), purge_step=purge_step) as w:
        for step in steps:
            x = float("nan") if nan_from is not None and step >= nan_from else value
            for tag in TAGS:
                w.add_scalar(tag, x, step)
            if step == nan_from:
                w.add_text("anomaly", nan_anomaly(step), step)


def report(capsys, path):
    assert main(["report", str(path), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"]["."]
    assert main(["report", str(path)]) == 0
    return run, capsys.readouterr().out


def tensorboard_scalars(run_dir, tag):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def tensorboard_texts(run_dir):
    """Steps of the anomaly texts the TensorBoard server (plugin accumulator) shows."""
    acc = plugin_event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors("anomaly/text_summary")]


@pytest.mark.parametrize("first_purge", [0, None], ids=["first-purge0", "first-no-purge"])
def test_resume_with_purge_step_drops_the_abandoned_timeline(tmp_path, capsys, first_purge):
    """A run that went NaN at step 35, resumed from its step-30 checkpoint with purge_step=30
    and healthy up to step 34: the report shows steps 0-34 of the new timeline, no non-finite
    value and no anomaly, like TensorBoard's scalars; a note says what was dropped."""
    run_dir = tmp_path / "run"
    write_timeline(run_dir, range(40), 1.0, nan_from=35, purge_step=first_purge)
    write_timeline(run_dir, range(30, 35), 2.0, purge_step=30)

    run, text = report(capsys, run_dir)
    assert run["first_nonfinite"] == {"anomaly": None, "scalars": None}
    assert run["logged_anomalies"] == [] and run["nonfinite_norms"] == []
    assert run["steps"] == [0, 34]
    (note,) = run["notes"]
    assert "purge_step 30" in note and "20 scalar values" in note and "1 anomaly text" in note
    for tag in TAGS:
        tb = tensorboard_scalars(run_dir, tag)
        assert [s for s, _ in tb] == list(range(35))
        (trend,) = [t for t in run["trends"] if t["tag"] == tag]
        assert (trend["points"], trend["nonfinite"]) == (len(tb), 0)
        assert (trend["last_step"], trend["last"]) == (34, tb[-1][1]) == (34, 2.0)
    if first_purge is not None:  # the server treats only a second START as a restart
        assert tensorboard_texts(run_dir) == []
    assert "step 35" not in text and "nan" not in text.split("per-layer trends")[1]
    first = text.split("first non-finite value:")[1].split("spikes")[0]
    assert first.split() == ["none"]
    assert text.split("anomalies logged by the probe:")[1].split()[0] == "none"


def test_purge_keeps_the_new_timeline_and_other_runs(tmp_path, capsys):
    """What the resumed run writes after its purge_step (a NaN at step 32 here) is reported;
    another run under the same LOGDIR keeps its own NaN at step 35."""
    write_timeline(tmp_path / "resumed", range(40), 1.0, nan_from=35, purge_step=0)
    write_timeline(tmp_path / "resumed", range(30, 34), 2.0, nan_from=32, purge_step=30)
    write_timeline(tmp_path / "other", range(40), 1.0, nan_from=35)

    assert main(["report", str(tmp_path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    resumed, other = runs["resumed"], runs["other"]
    assert resumed["steps"] == [0, 33]
    assert resumed["first_nonfinite"]["anomaly"]["step"] == 32
    assert resumed["first_nonfinite"]["scalars"]["step"] == 32
    assert [a["step"] for a in resumed["logged_anomalies"]] == [32]
    assert tensorboard_texts(tmp_path / "resumed") == [32]
    assert [s for s, _ in tensorboard_scalars(tmp_path / "resumed", TAGS[0])] == list(range(34))
    assert other["steps"] == [0, 39] and other["notes"] == []
    assert other["first_nonfinite"]["anomaly"]["step"] == 35
    assert other["first_nonfinite"]["scalars"]["step"] == 35
