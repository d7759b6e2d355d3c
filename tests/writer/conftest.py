import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbprobe.writer import read_events


@pytest.fixture
def logdir(tmp_path):
    return str(tmp_path / "run")


def accumulate(path):
    """TensorBoard's own Python reader over ``path``, keeping every event."""
    ea = EventAccumulator(
        path,
        size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "audio": 0},
    )
    ea.Reload()
    return ea


def values_by_tag(path):
    """{tag: [(step, Summary.Value), ...]} from our reader, strict about damage."""
    out = {}
    for ev in read_events(path, errors="raise"):
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v))
    return out
