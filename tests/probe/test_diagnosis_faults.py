"""Real training with planted faults: records built from plain hooks (independent of the
probe) are fed to the diagnosis, which must name the planted module, pass and step."""

import pytest

from tbprobe.probe.diagnosis import Diagnosis

from .faults import ARCHS, FAULTS, Fault, train

STEP = 17  # past the default warm-up (10) plus min_history (5): baselines exist
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:For backward hooks to be called:UserWarning",
)


def feed_all(diag, records):
    return [a for r in records for a in diag.feed(r)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", FAULTS)
def test_planted_fault_reported_at_module_pass_step(arch, kind):
    """Real training (Adam): the first anomaly names the planted module, pass and step."""
    fault = Fault(arch, kind, step=STEP)
    records, _ = train(arch, "adam", STEP + 1, fault=fault, stats_every=0)
    found = feed_all(Diagnosis(), records)
    assert found, "nothing reported"
    first = found[0]
    assert (first.module, first.pass_, first.step) == fault.expected
    assert first.kind == ("spike" if kind == "lr_spike" else "nonfinite")
    if kind != "lr_spike":
        assert first.producer is True


@pytest.mark.parametrize("kind", FAULTS)
def test_planted_fault_under_sgd(kind):
    """The same holds under SGD with momentum (MLP)."""
    fault = Fault("mlp", kind, step=STEP)
    records, _ = train("mlp", "sgd", STEP + 1, fault=fault, stats_every=0)
    first = feed_all(Diagnosis(), records)[0]
    assert (first.module, first.pass_, first.step) == fault.expected
