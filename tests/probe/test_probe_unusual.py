"""Tensors and passes outside the usual training forward: sparse and complex parameters,
validation and inference-mode forwards between optimizer steps, nested tensors, lazy
modules, attention that never calls its own ``out_proj``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import tbprobe
from tests.probe.util import norm64, read_run


def _probe(model, logdir, opt, **kw):
    writer = tbprobe.SummaryWriter(str(logdir))
    kw.setdefault("every", 1)
    probe = tbprobe.Probe(model, writer, opt, watch_requests=False, **kw)
    return writer, probe


def _close(writer, probe):
    probe.detach()
    writer.close()
    assert probe.errors == []


def test_sparse_gradient_is_normed_from_its_values(tmp_path):
    """nn.Embedding(sparse=True): grad_norm is the norm of the (coalesced) sparse gradient,
    and every other tag is still written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer, probe = _probe(model, tmp_path, opt, histogram_every=1)
    want = []
    for _ in range(3):
        idx = torch.tensor([[1, 2, 2, 7], [7, 7, 3, 1]])  # repeated rows: uncoalesced values
        model(idx).sum().backward()
        g = model[0].weight.grad
        assert g.is_sparse
        want.append(norm64(g.to_dense()))
        opt.step()
        opt.zero_grad()
    _close(writer, probe)
    run = read_run(tmp_path)
    got = run["scalars"]["grad_norm/0.weight"]
    assert [got[s] for s in range(3)] == pytest.approx(want, rel=1e-6)
    assert set(run["scalars"]["grad_norm/1.weight"]) == {0, 1, 2}
    assert set(run["scalars"]["act_rms/1"]) == {0, 1, 2}
    h = run["histos"]["grad_hist/0.weight"][0]
    assert h.num == 4 * 8  # the four distinct rows' stored values


def test_complex_parameter_norms_are_exact(tmp_path):
    """A complex parameter: its norm over real and imaginary parts; real ones unaffected."""
    torch.manual_seed(0)

    class Filter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.filt = nn.Parameter(torch.randn(8, dtype=torch.cfloat))

        def forward(self, x):
            return self.lin(torch.fft.ifft(torch.fft.fft(x) * self.filt).real)

    model = Filter()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    writer, probe = _probe(model, tmp_path, opt, histogram_every=1)
    grads, params = [], []
    for _ in range(2):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        grads.append(float(model.filt.grad.abs().pow(2).sum().sqrt()))
        opt.step()
        params.append(float(model.filt.detach().abs().pow(2).sum().sqrt()))
        opt.zero_grad()
    _close(writer, probe)
    run = read_run(tmp_path)
    assert [run["scalars"]["grad_norm/filt"][s] for s in (0, 1)] == pytest.approx(grads, 1e-5)
    assert [run["scalars"]["param_norm/filt"][s] for s in (0, 1)] == pytest.approx(params, 1e-5)
    assert 0 < run["scalars"]["update_ratio/filt"][1] < 1
    assert run["histos"]["grad_hist/filt"][0].num == 16  # real and imaginary parts
    assert set(run["scalars"]["act_rms/lin"]) == {0, 1}


def _val_run(logdir, validate):
    """3 steps of a Linear; after each optimizer step ``validate(model, x)`` runs."""
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4) * 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    writer, probe = _probe(model, logdir, opt, histogram_every=1)
    x = torch.ones(2, 4)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        validate(model, x)
    _close(writer, probe)
    return read_run(logdir)


@pytest.mark.parametrize("mode", ["no_grad", "no_grad_eval", "inference_mode"])
def test_validation_forwards_do_not_enter_training_stats(tmp_path, mode):
    """A validation forward after an optimizer step runs before the next step's training
    forward: the training forward's statistics and histogram are what the step records,
    and no hook fails (inference tensors have no version counter)."""

    def validate(model, x):
        if mode == "inference_mode":
            with torch.inference_mode():
                model(1000 * x)
            return
        model.train(mode != "no_grad_eval")
        with torch.no_grad():
            model(1000 * x)
        model.train()

    run = _val_run(tmp_path, validate)
    absmax = run["scalars"]["act_absmax/_root"]
    assert [absmax[s] for s in (0, 1, 2)] == [0.5, 0.5, 0.5]
    assert [run["scalars"]["act_rms/_root"][s] for s in (0, 1, 2)] == [0.5, 0.5, 0.5]
    for s in (0, 1, 2):
        h = run["histos"]["act_hist/_root"][s]
        assert (h.min, h.max, h.num) == (0.5, 0.5, 8)


def test_no_grad_forwards_alone_are_recorded(tmp_path):
    """A step with only forwards without gradients (inference with probe.step(), a frozen
    encoder under no_grad) keeps their statistics, merged as micro-batches are."""
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, every=1, watch_requests=False)
    for scale in (1.0, 3.0):
        with torch.inference_mode():
            model(torch.full((2, 4), scale))
        with torch.no_grad():
            model(torch.full((2, 4), -2 * scale))
        probe.step()
    _close(writer, probe)
    run = read_run(tmp_path)
    assert run["scalars"]["act_absmax/_root"] == {0: 2.0, 1: 6.0}
    rms = run["scalars"]["act_rms/_root"]
    assert rms[0] == pytest.approx(math.sqrt(2.5)) and rms[1] == pytest.approx(math.sqrt(22.5))


class _FrozenEncoderNet(nn.Module):
    """A frozen encoder run under no_grad inside the training forward, a trainable head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            z = self.enc(x)
        return self.head(z)


def test_frozen_module_under_no_grad_keeps_its_stats(tmp_path):
    """A frozen encoder run under no_grad inside the training forward is recorded; the
    trainable head beside it too."""
    torch.manual_seed(0)

    model = _FrozenEncoderNet()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    writer, probe = _probe(model, tmp_path, opt)
    want = []
    for _ in range(2):
        x = torch.randn(3, 4)
        want.append(float(model.enc(x).abs().max()))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    _close(writer, probe)
    run = read_run(tmp_path)
    got = run["scalars"]["act_absmax/enc"]
    assert [got[0], got[1]] == pytest.approx(want, rel=1e-6)
    assert set(run["scalars"]["act_rms/head"]) == {0, 1}


def test_evaluation_between_steps_does_not_enter_a_frozen_encoders_stats(tmp_path):
    """A frozen encoder runs under no_grad in training too, so the gradient rule cannot tell
    its evaluation forwards (between optimizer steps, under ``model.eval()``) from its
    training ones: the model's eval mode does. Its act_absmax is the training batches'."""
    torch.manual_seed(0)

    model = _FrozenEncoderNet()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    writer, probe = _probe(model, tmp_path, opt)
    want = []
    for _ in range(3):
        x = torch.randn(3, 4)
        enc = torch.nn.functional.linear(x, model.enc.weight, model.enc.bias)  # not a forward
        want.append(float(enc.abs().max()))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            model(1000 * torch.randn(3, 4))  # evaluation: a very different scale
        model.train()
    _close(writer, probe)
    got = read_run(tmp_path)["scalars"]["act_absmax/enc"]
    assert [got[s] for s in range(3)] == pytest.approx(want, rel=1e-6)


def test_nested_tensor_outputs_are_reduced_over_their_values(tmp_path):
    """nn.TransformerEncoder's fast path (eval, no_grad, a padding mask) returns nested
    tensors: the hooks reduce their values and none of them fails."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1)
    mask = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, every=1, watch_requests=False)
    nested = []
    model.layers[0].register_forward_hook(lambda m, a, out: nested.append(out.is_nested))
    model.eval()
    for _ in range(2):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype
            out = model(torch.randn(2, 6, 16), src_key_padding_mask=mask)
        probe.step()
    assert nested == [True, True] and not out.is_nested  # padded again at the end
    _close(writer, probe)
    run = read_run(tmp_path)
    assert set(run["scalars"]["act_rms/layers.0"]) == {0, 1}
    assert all(v > 0 for v in run["scalars"]["act_rms/layers.0"].values())


def test_multihead_attention_is_hooked_by_default():
    """MultiheadAttention owns its projection weights and never calls out_proj: it is in
    the default selection."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    model = Block()
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, every=1, watch_requests=False)
    assert [n for n, _ in probe.modules] == ["attn", "attn.out_proj", "head"]
    model(torch.randn(2, 3, 8)).sum().backward()
    probe.step()
    probe.flush()
    events = {(e.module, e.pass_) for e in probe.last_record.events}
    assert ("attn", "forward") in events and ("attn", "backward") in events
    assert not any(m == "attn.out_proj" for m, _ in events)  # never called
    _close(writer, probe)


def test_model_split_over_devices_gets_a_clear_error():
    """A model whose parameters sit on two devices (``device_map="auto"`` style; here the CPU
    and the meta device) is refused at attach time, naming a parameter on each, instead of
    disabling itself at the first step."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, device="meta"))
    with pytest.raises(
        ValueError,
        match=r"model: parameters on more than one device \('0.weight' on cpu, '1.weight' on meta",
    ):
        tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False))


def test_lazy_module_gets_a_clear_error():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"model: '0.weight' is an uninitialized lazy"):
        tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False))


class _Mix(nn.Module):
    """Between two calls of a shared cell: finite in, NaN out in the forward of step
    ``fire_fwd``; finite forward and grad_output, NaN grad_input in step ``fire_bwd``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))
        self.fire_fwd = self.fire_bwd = False

    def forward(self, h):
        if self.fire_fwd:
            h = h.masked_fill(torch.arange(h.shape[0])[:, None] == 0, float("nan"))
        if self.fire_bwd:
            h = h + torch.sqrt((h * 0).pow(2))  # forward: + 0; backward: 0 * inf = NaN
        return torch.tanh(h * self.w)


class _Loop(nn.Module):
    """A decoder loop: one ``cell`` called at every time step, ``mix`` after each call."""

    def __init__(self):
        super().__init__()
        self.cell, self.mix = nn.Linear(8, 8), _Mix()

    def forward(self, x):  # (B, T, 8)
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = self.mix(self.cell(x[:, t] + h))
        return h


@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_module_called_in_a_loop_is_not_blamed_for_another_modules_nan(pass_):
    """A NaN made by ``mix`` between two calls of the shared ``cell`` is reported at ``mix``
    (the producer), not at ``cell``, whose later call only passed it on: the host finds each
    module's first non-finite call, in execution order."""
    torch.manual_seed(0)
    model, gen = _Loop(), torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False), opt,
                          watch_requests=False, on_anomaly=lambda a: None)  # fmt: skip
    for step in range(6):
        model.mix.fire_fwd = pass_ == "forward" and step == 4
        model.mix.fire_bwd = pass_ == "backward" and step == 4
        model(torch.randn(4, 3, 8, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    probe.detach()
    a = probe.anomalies[0]
    assert (a.step, a.kind, a.pass_, a.module, a.producer) == (4, "nonfinite", pass_, "mix", True)


def _one_step_planted(tmp_path, plant) -> dict:
    """One probed step of Linear(4, 4) -> Linear(4, 2), ``plant`` a forward hook on the first
    (returning its output); the scalars written."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].register_forward_hook(plant)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, every=1, watch_requests=False, on_anomaly=lambda a: None)
    model(torch.randn(3, 4)).sum().backward()
    probe.step()
    _close(writer, probe)
    return read_run(str(tmp_path))["scalars"]


def test_all_nonfinite_output_has_nan_absmax_not_zero(tmp_path):
    """A module output with no finite element: act_rms and act_absmax are NaN (nothing to
    measure), not the 0.0 of an all-zero output."""
    scalars = _one_step_planted(tmp_path, lambda m, a, out: torch.full_like(out, math.nan))
    assert math.isnan(scalars["act_absmax/0"][0]) and math.isnan(scalars["act_rms/0"][0])


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_an_output_with_one_nonfinite_element_shows_it(tmp_path, bad):
    """One element of a module's output is +inf (or NaN): its act_absmax and act_rms are inf
    (NaN), as a gradient norm with one is, not the moments of the finite elements
    (act_absmax was 1.2, hiding the inf from the chart)."""

    def plant(m, a, out):
        out = out.clone()
        out[0, 0] = bad
        return out

    scalars = _one_step_planted(tmp_path, plant)
    for tag in ("act_absmax/0", "act_rms/0"):
        got = scalars[tag][0]
        assert math.isnan(got) if bad != bad else got == math.inf, (tag, got)
    assert math.isfinite(scalars["outgrad_rms/0"][0])  # d(sum)/d(output) is finite
