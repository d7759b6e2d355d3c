"""Training setups: gradient accumulation, checkpointing, AMP, frozen parameters; and the
probe never changing training (bitwise equal parameters, bounded memory, hooks removed)."""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from torch import nn

import tbprobe
from tests.probe import models
from tests.probe.util import norm64, train


class Collect:
    def __init__(self):
        self.records = []

    def feed(self, record):
        self.records.append(record)
        return []


def _writer():
    return tbprobe.SummaryWriter(write_to_disk=False)


def test_grad_accumulation_reduces_the_accumulated_grad_once():
    """With 3 micro-batches per step, grad norms are those of the accumulated gradient
    and activation counts cover all micro-batches."""
    model = models.make("mlp")
    diag = Collect()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, _writer(), opt, diagnosis=diag, watch_requests=False)
    acc = {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
    acc = {n: norm64(p.grad) for n, p in model.named_parameters()}
    opt.step()
    probe.detach()
    (rec,) = diag.records
    for n, v in acc.items():
        assert rec.grad_norms[n] == pytest.approx(v, rel=1e-6)  # CPU: fp32 accumulation
    fwd = {e.module: e for e in rec.events if e.pass_ == "forward"}
    assert fwd["0"].stats[0] == 3 * 4 * 16
    assert sum(e.pass_ == "grad" for e in rec.events) == 4


def test_checkpoint_recompute_is_not_counted_twice():
    """Under non-reentrant checkpointing each block's forward is counted once; its output
    gradient is still recorded."""
    model = models.make("checkpointed")
    diag = Collect()
    probe = tbprobe.Probe(model, _writer(), diagnosis=diag, watch_requests=False)
    train(model, "checkpointed", 1, probe_step=probe.step)
    probe.detach()
    by = {(e.module, e.tensor): e for e in diag.records[0].events}
    assert by[("blocks.0", "output")].stats[0] == 4 * 8
    assert by[("blocks.0.0", "output")].stats[0] == 4 * 8
    assert by[("blocks.1", "grad_output")].stats[0] == 4 * 8


def test_amp_grad_norms_are_unscaled_without_a_sync():
    """With a GradScaler, recorded grad norms equal the unscaled gradient's norms, and a
    step the scaler skips for Inf is still recorded with its non-finite counts."""
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    diag = Collect()
    probe = tbprobe.Probe(
        model, _writer(), opt, scaler=scaler, diagnosis=diag, watch_requests=False
    )
    x = torch.randn(4, 8)
    expect = []
    for step in range(3):
        out = model(x if step != 1 else x * math.inf)
        scaler.scale(out.pow(2).mean()).backward()
        expect.append({n: norm64(p.grad) / 1024.0 for n, p in model.named_parameters()})
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    probe.detach()
    assert [r.step for r in diag.records] == [0, 1, 2]
    for n, v in expect[0].items():
        assert diag.records[0].grad_norms[n] == pytest.approx(v, rel=1e-6)
    assert any(e.nonfinite > 0 for e in diag.records[1].events)
    assert [r.skipped for r in diag.records] == [False, True, False]  # the scaler skipped 1
    assert scaler.get_scale() == 512.0  # the scaler still works: it backed off once
    assert "update" not in vars(scaler)


def test_frozen_parameters_and_gradless_modules():
    """Frozen parameters get no grad events or update ratios; their module still records
    its forward; a module whose params are all frozen is handled."""
    model = models.make("mlp")
    for p in model[0].parameters():
        p.requires_grad_(False)
    diag = Collect()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    probe = tbprobe.Probe(model, _writer(), opt, diagnosis=diag, watch_requests=False)
    train(model, "mlp", 2, opt=opt)
    probe.detach()
    rec = diag.records[1]
    assert {e.module for e in rec.events if e.pass_ == "grad"} == {"2.weight", "2.bias"}
    assert set(rec.update_ratios) == {"2.weight", "2.bias"}
    assert any(e.module == "0" and e.pass_ == "forward" for e in rec.events)
    assert probe.errors == []


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_parameters_are_bitwise_equal_with_and_without_the_probe(name):
    """After 5 steps with the probe (histograms and snapshots on), every parameter is
    bitwise equal to a run without it."""
    plain = models.make(name)
    train(plain, name, 5, opt=torch.optim.Adam(plain.parameters(), lr=1e-3))
    probed = models.make(name)
    opt = torch.optim.Adam(probed.parameters(), lr=1e-3)
    probe = tbprobe.Probe(
        probed, _writer(), opt, histogram_every=2, snapshot_every=3, watch_requests=False
    )
    train(probed, name, 5, opt=opt)
    probe.detach()
    for (n, a), (_, b) in zip(plain.named_parameters(), probed.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_memory_does_not_grow_over_1000_steps():
    """Tensors alive and Python allocations stay flat over 1000 probed steps."""
    import tracemalloc

    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = tbprobe.Probe(model, _writer(), opt, every=3, watch_requests=False)
    x = torch.randn(4, 8)

    def steps(n):
        for _ in range(n):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    def live_tensors():
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    steps(50)
    tracemalloc.start()
    base_t, (base_m, _) = live_tensors(), tracemalloc.get_traced_memory()
    steps(1000)
    grown_t, (grown_m, _) = live_tensors(), tracemalloc.get_traced_memory()
    tracemalloc.stop()
    probe.detach()
    assert grown_t <= base_t + 2
    assert grown_m - base_m < 64 * 1024


@pytest.mark.parametrize("every", [1, 10**9])
def test_a_step_leaves_no_cyclic_garbage(every):
    """Each step's state is freed by reference counting when the step ends: with the garbage
    collector off for 5 steps (scheduled, or checked only), a collection finds no tbprobe
    object unreachable. A cycle would hand every step's hundreds of objects to the collector,
    whose full passes over a large heap stall training."""
    model = models.make("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = tbprobe.Probe(model, _writer(), opt, every=every, watch_requests=False)
    x = torch.randn(2, 3, 8, 8)

    def steps(n):
        for _ in range(n):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    steps(3)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        steps(5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith("tbprobe")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
        probe.detach()
    assert not ours, sorted({type(o).__name__ for o in ours})


def test_detach_and_context_manager_remove_every_hook():
    """detach() and leaving the context manager, also on an exception, remove every
    module, parameter, optimizer and scaler hook."""
    model = models.make("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")

    def hooks():
        n = sum(len(m._forward_hooks) for m in model.modules())
        n += sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
        return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)

    with pytest.raises(KeyError), tbprobe.Probe(model, _writer(), opt, scaler=scaler):
        assert hooks() > 0 and "update" in vars(scaler)
        raise KeyError("boom")
    assert hooks() == 0 and "update" not in vars(scaler)
    probe = tbprobe.attach(model, _writer(), opt)
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # tensor hooks of an unfinished step
    probe.detach()
    probe.detach()
    assert hooks() == 0
    with pytest.raises(RuntimeError, match="detached"):
        probe.snapshot()


def test_failing_hook_disables_itself_warns_once_and_training_continues():
    """A hook that raises is disabled with one warning and recorded in probe.errors; the
    other hooks keep recording and training is unaffected."""
    model = models.make("mlp")
    diag = Collect()
    probe = tbprobe.Probe(model, _writer(), diagnosis=diag, watch_requests=False)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("hook bug")

    probe._hooks._forward_stats = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, "mlp", 3, probe_step=probe.step)
    probe.detach()
    ours = [w for w in caught if "hook bug" in str(w.message)]
    assert len(ours) == 2  # one per hooked module, once each
    assert len(calls) == 2 and len(probe.errors) == 2
    assert {k for k, _, _ in probe.errors} == {"forward"}
    assert (
        all(any(e.pass_ == "grad" for e in r.events) for r in diag.records)
        and len(diag.records) == 3
    )


def test_distributed_pack_failure_warns_once_and_keeps_packing(monkeypatch):
    """Under torch.distributed a failing step pack is not disabled (each rank must join every
    later gather): one warning, one recorded error, packing tried again every step."""
    from tbprobe.probe import probe as probe_mod

    model = models.make("mlp")
    probe = tbprobe.Probe(model, _writer(), watch_requests=False)
    probe._dist = object()  # what a process group makes it; only its presence matters here
    calls = []

    def broken(p, st):
        calls.append(st.step)
        raise RuntimeError("pack bug")

    monkeypatch.setattr(probe_mod, "pack_step", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, "mlp", 3, probe_step=probe.step)
    probe._dist = None
    probe.detach()
    assert calls == [0, 1, 2]
    assert len([w for w in caught if "pack bug" in str(w.message)]) == 1
    assert [(k, w) for k, w, _ in probe.errors] == [("step", "pack")]
    assert ("step", "pack") not in probe._hooks.disabled


def test_manual_step_is_refused_when_the_optimizer_drives_the_probe():
    """step() raises when the optimizer's hook already ends each step."""
    model = nn.Linear(2, 2)
    probe = tbprobe.Probe(model, _writer(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="advances"):
        probe.step()
    probe.detach()
