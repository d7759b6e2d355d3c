"""Every planted fault is reported through the real Probe (its hooks, its records, the built-in
diagnosis) at the planted module, pass and step; the `anomaly` text reaches the event file."""

import pytest
import torch
from torch import nn

from tbprobe import Probe, SummaryWriter
from tbprobe.probe.report import diagnose_logdir

from .faults import ARCHS, FAULTS, Data, Fault, base_lr, loss_fn, make_model, one_thread

STEP = 17
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:For backward hooks to be called:UserWarning",
)


def run_with_probe(arch, kind, logdir, opt="adam", every=None):
    """Train with the fault planted and a Probe attached; returns the probe's anomalies."""
    fault = Fault(arch, kind, step=STEP)
    model = make_model(arch)
    fault.plant(model)
    lr = base_lr(arch, opt)
    optimizer = fault.make_optimizer(model, opt, lr)
    data = Data(arch)
    seen = []
    with one_thread(), SummaryWriter(logdir) as w:
        # Non-finite checks run every step whatever `every` is; update sizes need a scheduled
        # step, so the learning-rate spike runs with every=1.
        if every is None:
            every = 1 if kind == "lr_spike" else 50
        probe = Probe(model, w, optimizer, every=every, on_anomaly=seen.append)
        try:
            for step in range(STEP + 2):
                fault.current = step
                fault.set_lr(optimizer, lr)
                loss = loss_fn(arch, model, data())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            probe.detach()
    return fault, probe.anomalies, seen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", FAULTS)
def test_probe_reports_planted_fault(arch, kind, tmp_path):
    """The probe's first anomaly names the planted module, pass and step."""
    fault, anomalies, seen = run_with_probe(arch, kind, str(tmp_path / "run"))
    assert anomalies, "the probe reported nothing"
    first = anomalies[0]
    assert (first.module, first.pass_, first.step) == fault.expected, str(first)
    assert seen == anomalies  # on_anomaly got each one
    if kind == "lr_spike":  # the cause, in the message: its group's learning rate jumped
        assert "its learning rate rose ×" in first.message, first.message
    logged = diagnose_logdir(str(tmp_path / "run"))["runs"]["."]["logged_anomalies"]
    assert (logged[0]["step"], logged[0]["kind"]) == (first.step, first.kind)


@pytest.mark.parametrize("arch", ARCHS)
def test_learning_rate_spike_on_an_unscheduled_step(arch, tmp_path):
    """With the default schedule (every=50) update sizes are measured at steps 0 and 50
    only; the planted learning-rate spike (step 17) is found from the optimizer group's
    rate, read on every checked step, at the planted module, pass and step, once."""
    fault, anomalies, _ = run_with_probe(arch, "lr_spike", str(tmp_path / "run"), every=50)
    assert [(a.module, a.pass_, a.step) for a in anomalies][:1] == [fault.expected], anomalies
    assert "its peak so far" in anomalies[0].message
    assert [a.step for a in anomalies].count(STEP) == 1


@pytest.mark.parametrize("at", [17, 0])
def test_parameter_made_nonfinite_on_an_unscheduled_step(at, tmp_path):
    """A NaN learning rate at step 17 (every=50: parameters are not measured there) makes the
    first layer's parameters NaN in that step's optimizer step; step 18's forward shows it.
    On the CPU the hook sees the parameter is already non-finite when the output turns so:
    the report names it, pass "update", step 17, as with every=1, not a forward "producer"
    at step 18. A parameter non-finite from the start (a bad checkpoint, at=0) is named at
    step 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    if at == 0:
        with torch.no_grad():
            model[0].bias[3] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with SummaryWriter(str(tmp_path)) as w, Probe(model, w, opt, every=50) as probe:
        for i in range(at + 3):
            opt.param_groups[0]["lr"] = float("nan") if i == at and at else 0.01
            x = torch.randn(16, 8)
            nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
            opt.zero_grad()
    first = probe.anomalies[0]
    where = "0.bias" if at == 0 else "0.weight"
    assert (first.step, first.where, first.module, first.kind) == (at, where, "0", "nonfinite")
    assert first.pass_ == ("forward" if at == 0 else "update"), first
    assert ("before the forward of step 0" if at == 0 else "after the forward of step 17") in str(
        first
    )
