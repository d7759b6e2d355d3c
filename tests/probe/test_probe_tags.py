"""The tags a probe writes, read back from the event files and checked against float64
norms computed directly; the schedule; argument validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tbprobe
from tbprobe import kernels
from tests.probe import models
from tests.probe.util import norm64, read_run, train


def _rel(a, b, tol=1e-5):
    return a == pytest.approx(b, rel=tol, abs=1e-12)


class _Collect:
    """A diagnosis that keeps every record in ``seen``."""

    def __init__(self, seen: list):
        self.seen = seen

    def feed(self, record):
        self.seen.append(record)
        return []


def _plant_nan(module: nn.Module) -> None:
    """NaN in column 0 of ``module``'s output (3 elements for a batch of 3)."""
    module.register_forward_hook(lambda m, a, out: out.index_fill(1, torch.tensor([0]), math.nan))


def test_mlp_scalars_match_float64_norms(tmp_path):
    """grad_norm, param_norm, update_ratio, act_rms, act_absmax and outgrad_rms equal
    norms computed directly in float64 at every step."""
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acts, gouts, expect = {}, {}, []

    def fwd(name):
        def hook(m, a, out):
            acts[name] = out.detach().double().clone()
            out.register_hook(lambda g: gouts.__setitem__(name, g.double().clone()))

        return hook

    for name in ("0", "2"):
        model.get_submodule(name).register_forward_hook(fwd(name))
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, watch_requests=False)
    gen = torch.Generator().manual_seed(1)
    for _step in range(4):
        model(torch.randn(5, 8, generator=gen)).pow(2).mean().backward()
        row = {f"grad_norm/{n}": norm64(p.grad) for n, p in model.named_parameters()}
        row["grad_norm/_total"] = math.sqrt(sum(v * v for v in row.values()))
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        for n, a in acts.items():
            row[f"act_rms/{n}"] = float(a.pow(2).mean().sqrt())
            row[f"act_absmax/{n}"] = float(a.abs().max())
            row[f"outgrad_rms/{n}"] = float(gouts[n].pow(2).mean().sqrt())
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            w = p.detach().double()
            row[f"param_norm/{n}"] = float(w.norm())
            row[f"update_ratio/{n}"] = float((w - before[n]).norm() / w.norm())
        expect.append(row)
    probe.detach()
    writer.close()
    scalars = read_run(str(tmp_path))["scalars"]
    for step, row in enumerate(expect):
        for tag, value in row.items():
            assert _rel(scalars[tag][step], value), (tag, step, scalars[tag][step], value)
    assert len(scalars) == len(expect[0])


def test_every_defaults_to_log_freq_and_histograms_follow_histogram_every(tmp_path):
    """every=None takes the writer's log_freq; histograms appear every histogram_every
    steps for grads, params and activations, with counts summing to the tensor size."""
    model = models.make("mlp")
    writer = tbprobe.SummaryWriter(str(tmp_path), log_freq=2)
    probe = tbprobe.attach(model, writer, histogram_every=4, watch_requests=False)
    assert probe.cfg.every == 2
    train(model, "mlp", 8, probe_step=probe.step)
    probe.detach()
    writer.close()
    run = read_run(str(tmp_path))
    assert sorted(run["scalars"]["grad_norm/_total"]) == [0, 2, 4, 6]
    assert sorted(run["histos"]["grad_hist/0.weight"]) == [0, 4]
    assert sorted(run["histos"]["param_hist/2.bias"]) == [0, 4]
    assert sorted(run["histos"]["act_hist/0"]) == [0, 4]
    h = run["histos"]["param_hist/0.weight"][4]
    assert sum(h.bucket) == h.num == 16 * 8 and len(h.bucket) == 64


def test_track_limits_the_families_written(tmp_path):
    """track=("grads",) writes grad_norm tags only."""
    model = models.make("mlp")
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, track=("grads",), watch_requests=False)
    train(model, "mlp", 2, probe_step=probe.step)
    probe.detach()
    writer.close()
    tags = set(read_run(str(tmp_path))["scalars"])
    assert tags and all(t.startswith("grad_norm/") for t in tags)


def test_record_events_follow_execution_order():
    """The StepRecord lists forward outputs, then backward and grad events, in order, with
    full stats rows on scheduled steps and grad-input events tied to their grad-output."""
    model = models.make("mlp")
    seen = []
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, every=2, diagnosis=_Collect(seen), watch_requests=False)
    train(model, "mlp", 2, probe_step=probe.step)
    probe.detach()
    assert [r.step for r in seen] == [0, 1] and [r.scheduled for r in seen] == [True, False]
    ev = [(e.module, e.pass_, e.tensor) for e in seen[0].events]
    assert ev[:2] == [("0", "forward", "output"), ("2", "forward", "output")]
    assert ev[2] == ("2", "backward", "grad_output")
    assert ev.index(("2", "backward", "grad_input")) < ev.index(("0", "backward", "grad_output"))
    assert {m for m, p, _ in ev if p == "grad"} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(e.stats is not None and e.nonfinite == 0 for e in seen[0].events)
    assert all(e.stats is None for e in seen[1].events)
    fwd2 = seen[0].events[1]
    assert fwd2.stats[0] == 4 * 4
    assert fwd2.inputs_nonfinite is None  # CPU: a finite output's inputs are not checked
    assert set(seen[1].grad_norms) == {"0.weight", "0.bias", "2.weight", "2.bias", "_total"}
    assert seen[1].param_norms == {}


def test_nonfinite_counts_reach_the_record():
    """A NaN planted in one module's output is counted there, with finite inputs (the
    producer), on a scheduled step and on a counts-only step alike."""
    model = models.make("mlp")
    seen = []
    _plant_nan(model[2])
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, every=5, diagnosis=_Collect(seen), watch_requests=False)
    x = torch.randn(3, 8)
    for _ in range(2):
        model(x).sum().backward()
        probe.step()
    probe.detach()
    for rec in seen:
        by = {(e.module, e.pass_, e.tensor): e for e in rec.events}
        assert by[("0", "forward", "output")].nonfinite == 0
        assert by[("2", "forward", "output")].nonfinite == 3
        assert by[("2", "forward", "output")].inputs_nonfinite == 0
        assert by[("2", "backward", "grad_output")].nonfinite == 0  # index_fill cuts it
        assert math.isfinite(rec.grad_norms["_total"])


def test_without_acts_and_outgrads_scheduled_steps_only_check_module_outputs(tmp_path):
    """track=("grads", "params"): scheduled steps write grad and param norms, compute no
    module statistics (events carry no stats) and still count a planted NaN at its module."""
    model = models.make("mlp")
    seen = []
    _plant_nan(model[2])
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(
        model, writer, every=1, track=("grads", "params"), diagnosis=_Collect(seen),
        watch_requests=False,
    )  # fmt: skip
    x = torch.randn(3, 8)
    for _ in range(2):
        model(x).sum().backward()
        probe.step()
    probe.detach()
    writer.close()
    assert [r.scheduled for r in seen] == [True, True]
    for rec in seen:
        modules = [e for e in rec.events if e.pass_ != "grad"]
        assert modules and all(e.stats is None for e in modules)
        by = {(e.module, e.pass_, e.tensor): e for e in modules}
        assert by[("2", "forward", "output")].nonfinite == 3
        assert by[("0", "forward", "output")].nonfinite == 0
        assert all(e.stats is not None for e in rec.events if e.pass_ == "grad")
    tags = set(read_run(str(tmp_path))["scalars"])
    assert {t.split("/")[0] for t in tags} == {"grad_norm", "param_norm", "update_ratio"}


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"every": 0}, ValueError, "every"),
        ({"every": 1.5}, TypeError, "every"),
        ({"histogram_every": -1}, ValueError, "histogram_every"),
        ({"check_every": -1}, ValueError, "check_every"),
        ({"track": ("grads", "weights")}, ValueError, "track"),
        ({"modules": "nope.*"}, ValueError, "modules"),
        ({"modules": [3]}, TypeError, "modules"),
        ({"exclude": 5}, TypeError, "exclude"),
        ({"on_anomaly": "explode"}, ValueError, "on_anomaly"),
        ({"scaler": object()}, TypeError, "scaler"),
        ({"diagnosis": object()}, TypeError, "diagnosis"),
        ({"thumbnail_size": 2}, ValueError, "thumbnail_size"),
        ({"optimizer": "sgd"}, TypeError, "optimizer"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, exc, word):
    """Each bad argument raises ValueError/TypeError whose message names it, attaching
    nothing."""
    model = models.make("mlp")
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    with pytest.raises(exc, match=word):
        tbprobe.Probe(model, writer, **kwargs)
    assert not model[0]._forward_hooks


def test_bad_model_and_writer_raise():
    """A non-module model or a writer without add_scalar raises TypeError."""
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    with pytest.raises(TypeError, match="model"):
        tbprobe.Probe(lambda x: x, writer)
    with pytest.raises(TypeError, match="writer"):
        tbprobe.Probe(nn.Linear(2, 2), object())


def test_snapshot_arguments_are_validated():
    """snapshot() rejects bad steps and globs that match no hooked module."""
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(models.make("mlp"), writer, watch_requests=False)
    with pytest.raises(ValueError, match="steps"):
        probe.snapshot(steps=0)
    with pytest.raises(TypeError, match="steps"):
        probe.snapshot(steps="2")
    with pytest.raises(ValueError, match="modules"):
        probe.snapshot(modules="missing")
    probe.detach()


def test_histogram_values_match_the_kernel():
    """A written gradient histogram's buckets equal kernels.histogram of the same gradient."""
    model = models.make("mlp")
    grads = {}
    model[0].weight.register_post_accumulate_grad_hook(lambda p: grads.update(g=p.grad.clone()))
    seen = {}

    class W(tbprobe.SummaryWriter):
        def add_histogram_raw(self, tag, *a, **k):
            seen[tag] = k

    writer = W(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, histogram_every=1, watch_requests=False)
    model(torch.randn(4, 8)).sum().backward()
    probe.step()
    probe.detach()
    h = kernels.histogram(grads["g"], bins=64)
    got = seen["grad_hist/0.weight"]
    assert got["bucket_counts"] == h.counts.tolist()
    np.testing.assert_array_equal(got["bucket_limits"], h.edges[1:].numpy())
    assert got["num"] == grads["g"].numel()
