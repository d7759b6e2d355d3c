"""torch.compile: attaching the probe adds no graph break, and the compiled model still
gets gradient statistics."""

from __future__ import annotations

import pytest
import torch

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


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
