"""Batched reductions: a fixed number of multi-tensor calls per step, results equal to
per-tensor reductions, outputs changed in place, flush budgets and compaction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tbprobe
from tbprobe import kernels
from tbprobe.kernels import host_stats
from tbprobe.probe import batch
from tests.probe import models
from tests.probe.util import train


class Collect:
    def __init__(self):
        self.records = []

    def feed(self, record):
        self.records.append(record)
        return []


_TENSOR_STATS = kernels.tensor_stats
_LEAN_ROW = host_stats.lean_row
READ = [0, 2, 3, 4, 5, 6, 7, 8]  # the columns probe_stats fills on the CPU (forward outputs)


def _deep(n: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(n)])


def _stats_calls(monkeypatch, model, steps=2, **kw):
    """tensor_stats calls per step with the batched (CUDA) path: CPU tensors queued as
    device ones are, not reduced in their hooks."""
    calls = []
    orig = _TENSOR_STATS
    monkeypatch.setattr(batch, "on_host", lambda t: False)
    monkeypatch.setattr(kernels, "tensor_stats", lambda ts: calls.append(len(list(ts))) or orig(ts))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, opt, every=1, watch_requests=False, **kw)
    x = torch.randn(4, 8)
    for _ in range(steps):
        calls.clear()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    probe.detach()
    assert probe.errors == []
    return calls


def test_a_scheduled_step_makes_the_same_few_stats_calls_for_4_or_24_blocks(monkeypatch):
    """With the batched path, after the first step a scheduled step reduces everything in 4
    tensor_stats calls (forward outputs; the parameters' gradients at the end of the
    backward, before anything can clip them; the output gradients; parameters + updates at
    the step boundary), however many modules are hooked."""
    small = _stats_calls(monkeypatch, _deep(4))
    large = _stats_calls(monkeypatch, _deep(24))
    assert len(small) == len(large) == 4
    assert sum(large) > sum(small)  # the same calls hold more tensors


def test_flush_budget_splits_the_queue_and_keeps_every_value(monkeypatch):
    """With a 3-tensor budget the queue is flushed in many calls and the records equal the
    unbudgeted run's."""

    def run():
        model = models.make("gpt2")
        diag = Collect()
        probe = tbprobe.Probe(
            model, tbprobe.SummaryWriter(write_to_disk=False), diagnosis=diag,
            watch_requests=False,
        )  # fmt: skip
        train(model, "gpt2", 2, probe_step=probe.step, micro=2)
        probe.detach()
        return diag.records

    want = run()
    monkeypatch.setattr(batch, "MAX_TENSORS", 3)
    got = run()
    _assert_same_records(want, got)


def test_compaction_keeps_every_value(monkeypatch):
    """With compaction after 16 rows, 4 micro-batches (one with a NaN) give the same
    merged stats, non-finite counts and input counts as without it."""

    def run():
        model = models.make("mlp")
        state = {"n": 0}

        def plant(m, a, out):
            state["n"] += 1
            return out.index_fill(1, torch.tensor([0]), math.nan) if state["n"] == 3 else None

        model[2].register_forward_hook(plant)
        diag = Collect()
        probe = tbprobe.Probe(
            model, tbprobe.SummaryWriter(write_to_disk=False), every=2, diagnosis=diag,
            watch_requests=False,
        )  # fmt: skip
        train(model, "mlp", 2, probe_step=probe.step, micro=4)
        probe.detach()
        return diag.records, probe

    want, _ = run()
    compactions = []
    orig = batch.Rows.compact
    monkeypatch.setattr(batch, "MAX_ROWS", 16)
    monkeypatch.setattr(batch.Rows, "compact", lambda self: compactions.append(1) or orig(self))
    got, _ = run()
    assert len(compactions) >= 2
    assert any(e.nonfinite > 0 for e in got[0].events)
    _assert_same_records(want, got)


def _assert_same_records(want, got):
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        # Compaction merges a module's earlier calls into one row: the record's order may
        # place a module at its first call rather than its first non-finite call.
        ea_, eb_ = (sorted(r.events, key=lambda e: (e.module, e.pass_, e.tensor)) for r in (a, b))
        ka = [(e.module, e.pass_, e.tensor, e.nonfinite, e.inputs_nonfinite) for e in ea_]
        kb = [(e.module, e.pass_, e.tensor, e.nonfinite, e.inputs_nonfinite) for e in eb_]
        assert ka == kb
        for ea, eb in zip(ea_, eb_, strict=True):
            if ea.stats is None:
                assert eb.stats is None
            else:
                np.testing.assert_allclose(eb.stats, ea.stats, rtol=1e-12, atol=0)
        assert a.grad_norms == pytest.approx(b.grad_norms, rel=1e-12, nan_ok=True)


def test_outputs_changed_in_place_are_reduced_before_the_change():
    """A conv followed by ReLU(inplace=True): its act stats are those of the conv's own
    output (negative minimum) at the first step and later ones, and the probe reduces
    that module at once from then on."""
    model = models.make("cnn")
    acts = []
    model.features[0].register_forward_hook(lambda m, a, out: acts.append(out.detach().clone()))
    diag = Collect()
    probe = tbprobe.Probe(
        model, tbprobe.SummaryWriter(write_to_disk=False), diagnosis=diag, watch_requests=False
    )
    train(model, "cnn", 3, probe_step=probe.step)
    probe.detach()
    assert probe._eager == {"features.0", "features.2"}
    for rec, act in zip(diag.records, acts, strict=True):
        (ev,) = [e for e in rec.events if e.module == "features.0" and e.pass_ == "forward"]
        want = kernels.tensor_stats([act])[0].numpy()
        assert ev.stats[3] < 0
        np.testing.assert_allclose(ev.stats[READ], want[READ], rtol=1e-6)


@pytest.mark.parametrize("host", [False, True])
def test_in_place_change_after_the_first_step_is_found_at_the_flush(host, monkeypatch):
    """Batched path: a module whose output starts being changed in place only at step 2 is
    found by its version counter at that step's flush and reduced at once from step 3 on.
    Host path (CPU): every output is reduced in its hook, before any change."""
    if not host:
        monkeypatch.setattr(batch, "on_host", lambda t: False)
    model = models.make("mlp")
    state = {"step": 0}
    acts = []

    def relu_later(m, a, out):
        acts.append(out.detach().clone())
        if state["step"] >= 2:
            out.relu_()  # after the probe's hook (registered first)

    diag = Collect()
    probe = tbprobe.Probe(
        model, tbprobe.SummaryWriter(write_to_disk=False), diagnosis=diag, watch_requests=False
    )
    model[0].register_forward_hook(relu_later)
    x = torch.randn(4, 8)
    for step in range(4):
        state["step"] = step
        model(x).pow(2).mean().backward()
        probe.step()
    probe.detach()
    mins = [
        next(e.stats[3] for e in r.events if e.module == "0" and e.pass_ == "forward")
        for r in diag.records
    ]
    if host:
        assert mins == pytest.approx([float(a.min()) for a in acts], rel=1e-12)
        assert min(mins) < 0
        return
    assert "0" in probe._eager
    assert mins[3] == pytest.approx(float(acts[3].min()), rel=1e-12) and mins[3] < 0
    assert mins[2] >= 0  # reduced after the change: the step that finds it


@pytest.mark.parametrize("few", [0, 4])
def test_nonfinite_counts_count_nan_and_inf_exactly(few, monkeypatch):
    """nonfinite_counts equals the number of NaN and ±Inf elements for every float dtype, on
    each of its CPU paths (one by one; one flat pass), where a sum overflows too."""
    monkeypatch.setattr(host_stats, "FEW", few)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.tensor([1.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -2.0], dtype=dtype)
        got = batch.nonfinite_counts([x, x[:2], torch.full((5,), math.nan, dtype=dtype)])
        assert got.dtype == torch.float64 and got.tolist() == [3.0, 0.0, 5.0], dtype
        # Past the flat pass's size, mixed dtypes, empty and non-contiguous tensors: the
        # multi-tensor path; counts stay exact (fp16 counts are not summed in fp16).
        big = torch.full((300_001,), math.nan, dtype=dtype)
        got = batch.nonfinite_counts([big, x, x[:0]])
        assert got.tolist() == [300_001.0, 3.0, 0.0], dtype
        got = batch.nonfinite_counts([x, x.double()[:5], x[:0], x.view(7, 1).t()])
        assert got.tolist() == [3.0, 3.0, 0.0, 3.0], dtype
        # Finite values whose sum overflows: the shortcut's sum is inf, the count still 0.
        huge = torch.full((6,), torch.finfo(dtype).max, dtype=dtype)
        got = batch.nonfinite_counts([huge, x, huge[:1], x[:3], -huge, x])
        assert got.tolist() == [0.0, 3.0, 0.0, 1.0, 0.0, 3.0], dtype
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = torch.tensor([1.0, math.nan, 2.0]).to(dtype)
        assert batch.nonfinite_counts([x, torch.ones(2)]).tolist() == [1.0, 0.0], dtype


def test_probe_stats_give_exact_norms_and_nonfinite_counts():
    """probe_stats without extremes (gradients, parameters): norm_of of each row is the
    float64 norm within 1e-6 (NaN with a NaN, inf with only infinities), the non-finite
    columns sum to the exact count; half-precision squares do not overflow (300² > 65504)."""
    from tbprobe.probe.emit import norm_of

    torch.manual_seed(0)
    a = torch.randn(7, 5)
    b = torch.randn(11)
    b[[2, 4]] = math.inf
    c = torch.randn(3, 3, dtype=torch.float64)
    c[0, 0], c[1, 1] = math.nan, -math.inf
    h = torch.full((100,), 300.0, dtype=torch.float16)
    big = torch.randn(300_000)
    rows = batch.probe_stats([a, b, c, h, big], extremes=False).numpy()
    assert norm_of(rows[0]) == pytest.approx(float(a.double().norm()), rel=1e-6)
    assert norm_of(rows[1]) == math.inf and math.isnan(norm_of(rows[2]))
    assert norm_of(rows[3]) == pytest.approx(3000.0, rel=1e-6)
    assert norm_of(rows[4]) == pytest.approx(float(big.double().norm()), rel=1e-6)
    assert rows[:, 6:9].sum(1).tolist() == [0.0, 2.0, 2.0, 0.0, 0.0]
    assert rows[:, 0].tolist() == [35, 9, 7, 100, 300_000]  # finite elements


def test_probe_stats_on_the_cpu_match_the_full_stats_in_the_columns_read():
    """With extremes (forward outputs) the CPU rows equal kernels.tensor_stats in count,
    sum_sq (1e-6), min, max, abs_max and the non-finite counts; sum and zeros are NaN (not
    computed); a tensor with non-finite values gets its full exact row."""
    torch.manual_seed(1)
    ts = [torch.randn(40), torch.relu(torch.randn(70_000)), torch.randn(9), torch.arange(6)]
    ts[2][1], ts[2][5] = math.nan, math.inf
    got = batch.probe_stats(ts).numpy()
    want = kernels.tensor_stats(ts).numpy()
    for i in (0, 1):
        np.testing.assert_allclose(got[i, READ], want[i, READ], rtol=1e-6)
        assert np.isnan(got[i, [1, 9]]).all()
    np.testing.assert_array_equal(got[2:], want[2:])  # non-finite and integer: full rows
    bare = batch.probe_stats(ts[:2], extremes=False).numpy()
    assert np.isnan(bare[:, [1, 3, 4, 5, 9]]).all()
    np.testing.assert_allclose(bare[:, [0, 2, 6, 7, 8]], got[:2, [0, 2, 6, 7, 8]], rtol=1e-6)


def _fail_once(fn, message: str):
    """``fn`` that raises ``RuntimeError(message)`` on its first call only."""
    fail = {"left": 1}

    def flaky(*args, **kwargs):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError(message)
        return fn(*args, **kwargs)

    return flaky


def test_a_failing_batched_reduction_disables_one_hook_and_training_goes_on(monkeypatch):
    """A stats failure inside a flush disables the one hook that flushed, warns
    once, and later steps are still recorded; parameters keep training."""
    monkeypatch.setattr(batch, "on_host", lambda t: False)  # the batched (CUDA) path
    model = models.make("mlp")
    diag = Collect()
    probe = tbprobe.Probe(
        model, tbprobe.SummaryWriter(write_to_disk=False), diagnosis=diag, watch_requests=False
    )
    train(model, "mlp", 1, probe_step=probe.step)
    monkeypatch.setattr(kernels, "tensor_stats", _fail_once(_TENSOR_STATS, "kernel bug"))
    with pytest.warns(RuntimeWarning, match="kernel bug"):
        train(model, "mlp", 3, probe_step=probe.step)
    probe.detach()
    assert len(probe.errors) == 1 and [r.step for r in diag.records] == [0, 1, 2, 3]
    assert all(any(e.pass_ == "grad" for e in r.events) for r in diag.records)


def test_a_failing_host_reduction_disables_one_hook_and_training_goes_on(monkeypatch):
    """On the CPU each tensor is reduced in its hook: a failure there disables that one
    hook, warns once, and the other modules and later steps are still recorded."""
    model = models.make("mlp")
    diag = Collect()
    probe = tbprobe.Probe(
        model, tbprobe.SummaryWriter(write_to_disk=False), diagnosis=diag, watch_requests=False
    )
    train(model, "mlp", 1, probe_step=probe.step)
    monkeypatch.setattr(host_stats, "lean_row", _fail_once(_LEAN_ROW, "host bug"))
    with pytest.warns(RuntimeWarning, match="host bug"):
        train(model, "mlp", 3, probe_step=probe.step)
    probe.detach()
    assert len(probe.errors) == 1 and [r.step for r in diag.records] == [0, 1, 2, 3]
    (kind, where, _), last = probe.errors[0], diag.records[-1]
    assert kind == "forward"
    fwd = {e.module for e in last.events if e.pass_ == "forward"}
    before = {e.module for e in diag.records[0].events if e.pass_ == "forward"}
    assert where in before and fwd == before - {where} and fwd  # the others still reduced


def test_clean_checked_host_steps_pack_no_events(monkeypatch):
    """A checked step (counts only) whose hooked tensors and gradients are all finite, all
    reduced on the host, packs no events (its record would have none); a step whose only
    non-finite value is a parameter gradient packs them, and the diagnosis names that
    gradient as it did before."""
    from tbprobe.probe import pack

    packed = []
    orig = pack.pack_events
    monkeypatch.setattr(
        pack, "pack_events", lambda st, pk, meta: packed.append(st.step) or orig(st, pk, meta)
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(
        model, writer, opt, every=1000, on_anomaly=lambda a: None, watch_requests=False
    )
    x = torch.randn(4, 8)
    for step in range(4):
        if step == 3:  # the accumulated gradient of 2.weight only
            model[2].weight.register_hook(lambda g: g * math.nan)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    probe.detach()
    assert probe.errors == []
    assert packed == [0, 3]  # step 0 is scheduled (every=1000); 1 and 2 are clean checks
    (a,) = probe.anomalies
    assert (a.step, a.kind, a.where, a.pass_) == (3, "nonfinite", "2.weight", "grad")
