"""No false alarms: noisy but healthy 500-step SGD and Adam runs of a tiny GPT-2."""

import pytest

from tbprobe.probe.diagnosis import Diagnosis

from .faults import train

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:For backward hooks to be called:UserWarning",
)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_healthy_transformer_run_raises_nothing(opt):
    """500 steps of a tiny GPT-2 on a noisy Markov chain produce no anomaly: gradient norms
    and update sizes every step, hooked tensors checked and stats rows every 10th."""
    records, losses = train("gpt2", opt, 500, seed=1, stats_every=10, check_every=10)
    assert sum(losses[-50:]) < 0.8 * sum(losses[:50])
    assert sum(len(r.events) > 0 for r in records) == 50  # the dead check saw 50 steps
    diag = Diagnosis()
    found = [a for r in records for a in diag.feed(r)]
    assert found == []
