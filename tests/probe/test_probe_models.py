"""Attaching to every model of the zoo: which modules are hooked, and that each one's
forward, backward and grad events are recorded without disturbing the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tbprobe
from tbprobe.probe.selection import select_modules
from tests.probe import models
from tests.probe.util import train


class Collect:
    def __init__(self):
        self.records = []

    def feed(self, record):
        self.records.append(record)
        return []


def _run(name, steps=2, **kw):
    model = models.make(name)
    diag = Collect()
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, writer, opt, diagnosis=diag, watch_requests=False, **kw)
    train(model, name, steps, opt=opt)
    probe.detach()
    assert probe.errors == []
    return model, probe, diag.records


def _keys(record, pass_=None):
    return {(e.module, e.tensor) for e in record.events if pass_ in (None, e.pass_)}


@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_every_zoo_model_records_every_hooked_module(name):
    """Each hooked module has a forward-output event and a backward grad-output event, every
    trainable parameter a grad event, all finite, on every step."""
    model, probe, records = _run(name)
    assert [r.step for r in records] == [0, 1]
    hooked = [n for n, _ in probe.modules]
    for rec in records:
        assert {m for m, _ in _keys(rec, "forward")} == set(hooked)
        assert {m for m, t in _keys(rec, "backward") if t == "grad_output"} == set(hooked)
        params = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {m for m, _ in _keys(rec, "grad")} == params
        assert all(e.nonfinite == 0 for e in rec.events)
        assert [e.seq for e in rec.events] == sorted(e.seq for e in rec.events)


def test_default_modules_are_parameterised_leaves_and_blocks():
    """Default selection: leaves with parameters plus children of ModuleList/Sequential
    that hold parameters; no parameter-free module."""
    names = [n for n, _ in select_modules(models.make("nested"))]
    assert names == [
        "stem",
        "blocks.0",
        "blocks.0.0",
        "blocks.0.2",
        "blocks.0.2.0",
        "blocks.1",
        "blocks.1.0",
        "blocks.1.2",
        "blocks.1.2.0",
    ]
    gpt = [n for n, _ in select_modules(models.make("gpt2"))]
    assert "transformer.h.0" in gpt and "transformer.h.1.mlp.c_fc" in gpt
    assert "transformer.wte" in gpt and not any("drop" in n for n in gpt)
    cnn = [n for n, _ in select_modules(models.make("cnn"))]
    assert cnn == ["features.0", "features.2", "head"]


def test_modules_and_exclude_take_globs_and_types():
    """modules= selects by glob or type; exclude= removes by glob or type."""
    model = models.make("gpt2")
    picked = select_modules(model, ["transformer.h.*.attn"], ())
    assert [n for n, _ in picked] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    lin = select_modules(models.make("nested"), [nn.Linear], ["blocks.1*"])
    assert [n for n, _ in lin] == ["stem", "blocks.0.0", "blocks.0.2.0"]
    # The model itself by the name its tags give it (act_rms/_root), in and out.
    assert [n for n, _ in select_modules(model, ["_root"], ())] == ["_root"]
    assert "_root" not in [n for n, _ in select_modules(model, ["*"], ["_root"])]


def test_module_called_twice_aggregates_both_calls():
    """A module called twice per forward has one forward event whose count covers both
    calls."""
    _, _, records = _run("twice", every=1)
    fwd = {e.module: e for e in records[0].events if e.pass_ == "forward"}
    assert fwd["shared"].stats[0] == 2 * 4 * 8


def test_structured_outputs_reduce_every_floating_tensor():
    """Tuple, dict and dataclass outputs: every floating tensor inside is reduced."""
    _, _, records = _run("structured", every=1)
    fwd = {e.module: e for e in records[0].events if e.pass_ == "forward"}
    assert fwd["a"].stats[0] == 4 * 8  # the int tensor of the tuple is skipped
    assert fwd["b"].stats[0] == 4 * 8
    assert fwd["c"].stats[0] == 2 * 4 * 4  # both dataclass fields


def test_cnn_with_inplace_relu_trains_and_sees_pre_relu_output_gradients():
    """In-place ReLU after a hooked conv works; the conv's grad-output event is the
    gradient of the conv's own output (where ReLU zeroed it: zeros), and the forward event
    is the conv's output before the ReLU (a negative minimum)."""
    ref = models.make("cnn")  # the same weights, with out-of-place ReLUs
    ref.features[1].inplace = ref.features[3].inplace = False
    x = models.batch_for("cnn", torch.Generator().manual_seed(0))  # train()'s first batch
    out0 = ref.features[0](x)
    lowest = float(out0.detach().min())
    y = ref.features[3](ref.features[2](ref.features[1](out0)))
    (want,) = torch.autograd.grad(ref.head(y.mean((2, 3))).pow(2).mean(), out0)
    assert (want == 0).any() and (out0 < 0).any()  # the ReLU cut some of it
    _, _, records = _run("cnn", every=1)
    by = {(e.module, e.tensor): e for e in records[0].events}
    gout = by[("features.0", "grad_output")].stats
    fwd = by[("features.0", "output")].stats
    assert gout[0] == fwd[0] == want.numel()
    assert fwd[3] == pytest.approx(lowest) and lowest < 0  # before the ReLU
    assert gout[2] == pytest.approx(float(want.double().square().sum()), rel=1e-6)


def test_gpt2_blocks_and_tied_weights():
    """The tiny GPT-2 records its blocks; the tied embedding/lm_head weight counts once."""
    model, _, records = _run("gpt2", every=1)
    grads = [e.module for e in records[0].events if e.pass_ == "grad"]
    assert grads.count("transformer.wte.weight") == 1
    assert len(grads) == len({n for n, _ in model.named_parameters()})
