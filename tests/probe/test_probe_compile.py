"""torch.compile: attaching the probe adds no graph break, and the compiled model still
gets gradient statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tbprobe
from tests.probe import models


def _explain(model, x):
    torch._dynamo.reset()
    return torch._dynamo.explain(lambda t: model(t).pow(2).mean())(x)


def test_probe_adds_no_graph_break_and_grads_are_still_recorded():
    """torch._dynamo.explain gives the same graph and break counts with and without the
    probe; training the compiled model records finite gradient norms."""
    model = models.make("cnn")
    x = torch.randn(2, 3, 8, 8)
    without = _explain(model, x)
    records = []

    class Collect:
        def feed(self, record):
            records.append(record)
            return []

    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, diagnosis=Collect(), watch_requests=False)
    with_probe = _explain(model, x)
    assert (with_probe.graph_count, with_probe.graph_break_count) == (
        without.graph_count,
        without.graph_break_count,
    )
    compiled = torch.compile(model, backend="eager")
    compiled(x).pow(2).mean().backward()
    probe.step()
    probe.detach()
    torch._dynamo.reset()
    norms = records[0].grad_norms
    assert set(norms) == {n for n, _ in model.named_parameters()} | {"_total"}
    assert all(v > 0 for v in norms.values())


def test_probe_accepts_a_compiled_module():
    """Probe(torch.compile(model)) hooks the original module's submodules by their names."""
    model = models.make("mlp")
    compiled = torch.compile(model, backend="eager")
    probe = tbprobe.Probe(compiled, tbprobe.SummaryWriter(write_to_disk=False))
    assert [n for n, _ in probe.modules] == ["0", "2"]
    probe.detach()
    torch._dynamo.reset()


def _graphs() -> int:
    return sum(torch._dynamo.utils.counters["stats"].values())


def _probed_mlp():
    """The zoo MLP, its SGD, a probe of every step on both, and the records it feeds."""
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    probe = tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False), opt, every=1,
                          watch_requests=False, diagnosis=_Collect(seen))  # fmt: skip
    return model, opt, probe, seen


def test_compiled_optimizer_step_does_not_trace_the_probe():
    """``torch.compile(opt.step)``: the probe's step boundary runs eagerly, not through
    Dynamo (which guarded on its floats and recompiled every step, and failed on its numpy
    diagnosis); steps advance and every gradient norm is written."""
    torch._dynamo.reset()
    model, opt, probe, seen = _probed_mlp()
    step = torch.compile(opt.step, backend="eager")
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        models.loss_for("mlp", model, models.batch_for("mlp", gen)).backward()
        step()
        opt.zero_grad()
        if i == 2:
            settled = _graphs()
    assert _graphs() == settled  # no recompile after the first steps
    probe.detach()
    torch._dynamo.reset()
    assert probe.errors == [] and probe.global_step == 6
    assert [r.step for r in seen] == list(range(6)) and all(r.grad_norms for r in seen)


def test_compiled_autograd_neither_fails_nor_loses_gradients():
    """Compiled autograd traces the backward's hooks: the probe's do nothing there (no
    graph-breaking host code, no end-of-backward callback it refuses), and the step boundary
    reads every gradient."""
    import torch._dynamo.compiled_autograd as ca

    enable = getattr(ca, "_enable", None) or getattr(ca, "enable", None)
    if enable is None:
        pytest.skip("no compiled_autograd enable() in this torch")
    torch._dynamo.reset()
    model, opt, probe, seen = _probed_mlp()
    gen = torch.Generator().manual_seed(0)
    want = []
    for _ in range(3):
        loss = models.loss_for("mlp", model, models.batch_for("mlp", gen))
        with enable(torch.compile(backend="eager", fullgraph=True)):
            loss.backward()
        want.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item())
        opt.step()
        opt.zero_grad()
    probe.detach()
    torch._dynamo.reset()
    assert probe.errors == []
    assert [r.grad_norms["_total"] for r in seen] == pytest.approx(want, rel=1e-5)


def test_submodule_compiled_in_place_keeps_its_names():
    """``model.blocks[0] = torch.compile(block)`` before attaching: module names carry no
    ``_orig_mod`` (as parameter names), a glob by the code's name matches, and the compiled
    block is hooked once, by its wrapper."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    model = torch.nn.Sequential(Block(), Block())
    model[0] = torch.compile(model[0], backend="eager")
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, watch_requests=False)
    assert [n for n, _ in probe.modules] == ["0", "0.fc1", "0.fc2", "1", "1.fc1", "1.fc2"]
    assert type(dict(probe.modules)["0"]).__name__ == "OptimizedModule"
    probe.detach()
    probe = tbprobe.Probe(model, writer, watch_requests=False, modules=["0.fc1"])
    assert [n for n, _ in probe.modules] == ["0.fc1"]
    probe.detach()
    torch._dynamo.reset()


class _Collect:
    def __init__(self, out):
        self.out = out

    def feed(self, record):
        self.out.append(record)
        return []


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_a_backward_nan_under_a_compiled_forward_is_placed_near_its_origin(tmp_path):
    """The model's forward compiled (aot_eager): its hooks do not run, and the compiled
    backward accumulates the gradients in its graph's output order (fc1.weight first), not
    backward order. A NaN made in the backward pass after `mid` (sqrt at 0) makes mid's and
    fc1's gradients NaN, fc2's finite: the report names mid, the gradient nearest the
    output, not fc1 (the first in graph order)."""
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.mid, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x, bad):
            z = self.mid(torch.tanh(self.fc1(x)))
            return self.fc2(torch.tanh(z + torch.sqrt(z.abs() * bad)))

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model._c = torch.compile(model, backend="aot_eager")
    with tbprobe.SummaryWriter(str(tmp_path)) as w, tbprobe.attach(model, w, opt, every=1) as p:
        for s in range(14):
            x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
            bad = torch.tensor(0.0 if s == 12 else 1.0)
            F.cross_entropy(model._c(x, bad), y).backward()
            opt.step()
            opt.zero_grad()
    first = p.anomalies[0]
    assert (first.step, first.module, first.pass_) == (12, "mid", "grad"), first
