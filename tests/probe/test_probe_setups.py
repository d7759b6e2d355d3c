"""Training loops that touch gradients or steps around the probe: gradient clipping, zero_grad
before a manual ``probe.step()``, two optimizers, a disabled GradScaler, parameters a step
does not reach, an interrupt at the step boundary, a compiled submodule."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import tbprobe
from tests.probe.util import norm64, read_run


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _total(model) -> float:
    return math.sqrt(sum(norm64(p.grad) ** 2 for p in model.parameters() if p.grad is not None))


@pytest.mark.parametrize("micro", [1, 3])
def test_grad_norms_are_taken_before_clipping(tmp_path, micro):
    """clip_grad_norm_ after the backward: grad_norm is the accumulated gradient's own (what
    clip_grad_norm_ returns), and the explosion at step 30 is found as a spike."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, every=1, watch_requests=False)
    gen = torch.Generator().manual_seed(1)
    want = []
    for s in range(32):
        for _ in range(micro):
            x = torch.randn(16, 16, generator=gen) * (1000.0 if s == 30 else 1.0)
            model(x).pow(2).mean().backward()
        want.append(float(nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
    probe.detach()
    writer.close()
    assert probe.errors == []
    got = read_run(tmp_path)["scalars"]["grad_norm/_total"]
    assert [got[s] for s in range(32)] == pytest.approx(want, rel=1e-5)
    assert want[30] > 1e4
    assert any(a.step == 30 and a.kind == "spike" for a in probe.anomalies), probe.anomalies


def test_grad_norms_before_clipping_with_reentrant_checkpointing(tmp_path):
    """Parameters inside a reentrant checkpoint get their gradients in a nested backward:
    the norms are still taken once the outer backward has ended, before clipping."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, every=1, watch_requests=False)
    want = []
    for _ in range(3):
        x = torch.randn(8, 16)
        out = checkpoint(lambda t: model[2](model[1](t)), model[0](x), use_reentrant=True)
        out.pow(2).sum().backward()
        want.append((_total(model), norm64(model[2].weight.grad)))
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        opt.zero_grad()
    probe.detach()
    writer.close()
    assert probe.errors == []
    run = read_run(tmp_path)["scalars"]
    assert [run["grad_norm/_total"][s] for s in range(3)] == pytest.approx([w[0] for w in want])
    assert [run["grad_norm/2.weight"][s] for s in range(3)] == pytest.approx([w[1] for w in want])


def test_manual_step_after_zero_grad_keeps_the_norms_and_first_update(tmp_path):
    """No optimizer: a hand-written update, zero_grad(set_to_none=False), then probe.step().
    The gradient norms are the backward's, and update_ratio is written from step 0."""
    model = _mlp()
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, every=1, watch_requests=False)
    want, ratio = [], []
    for _ in range(3):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        want.append(_total(model))
        w = model[0].weight.detach().clone()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        ratio.append(norm64(model[0].weight - w) / norm64(model[0].weight))
        model.zero_grad(set_to_none=False)
        probe.step()
    probe.detach()
    writer.close()
    run = read_run(tmp_path)["scalars"]
    assert [run["grad_norm/_total"][s] for s in range(3)] == pytest.approx(want, rel=1e-6)
    assert [run["update_ratio/0.weight"][s] for s in range(3)] == pytest.approx(ratio, rel=1e-5)


def test_update_ratio_of_a_second_optimizers_parameters_is_not_zero(tmp_path):
    """The probe watches o1; o2 steps the head after it. The head's parameters get no
    update_ratio (not 0.0: the probe does not see their update); o1's are right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    o1 = torch.optim.SGD(model[0].parameters(), lr=0.1)
    o2 = torch.optim.SGD(model[1].parameters(), lr=0.1)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, o1, every=1, watch_requests=False)
    ratios = []
    for _ in range(3):
        model(torch.randn(8, 4)).sum().backward()
        w = model[0].weight.detach().clone()
        o1.step()
        ratios.append(norm64(model[0].weight - w) / norm64(model[0].weight))
        o2.step()
        o1.zero_grad()
        o2.zero_grad()
    probe.detach()
    writer.close()
    run = read_run(tmp_path)["scalars"]
    assert [run["update_ratio/0.weight"][s] for s in range(3)] == pytest.approx(ratios, 1e-5)
    assert "update_ratio/1.weight" not in run
    assert set(run["param_norm/1.weight"]) == {0, 1, 2}


def test_disabled_grad_scaler_is_accepted_as_no_scaling(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, scaler=scaler, every=1, watch_requests=False)
    model(torch.randn(8, 16)).pow(2).mean().backward()
    want = _total(model)
    scaler.step(opt)
    scaler.update()
    probe.detach()
    writer.close()
    assert read_run(tmp_path)["scalars"]["grad_norm/_total"][0] == pytest.approx(want, 1e-6)


def test_parameters_a_step_does_not_reach_raise_no_vanishing_alarm(tmp_path):
    """zero_grad(set_to_none=False) leaves a zero .grad on a branch that stops being used:
    it is not that step's gradient, so it is not reported (nor taken for vanishing)."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, use_b):
            return (self.b if use_b else self.a)(x)

    model = Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, every=1, watch_requests=False)
    for s in range(40):
        model(torch.randn(4, 8), use_b=s < 20).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    probe.detach()
    writer.close()
    assert probe.anomalies == []
    steps = read_run(tmp_path)["scalars"]["grad_norm/b.weight"]
    assert set(steps) == set(range(20))


def test_interrupt_at_the_step_boundary_keeps_the_steps_in_line(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside the step boundary (Ctrl-C landing there), caught by the
    loop: the probe's step still advances with the optimizer's."""
    from tbprobe.probe import probe as probe_mod

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, every=1, watch_requests=False)
    orig, calls = probe_mod.pack_step, []

    def interrupted(p, st):
        calls.append(st.step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return orig(p, st)

    monkeypatch.setattr(probe_mod, "pack_step", interrupted)
    for _ in range(6):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        with contextlib.suppress(KeyboardInterrupt):
            opt.step()
        opt.zero_grad()
    assert probe.global_step == 6
    probe.detach()
    writer.close()
    assert set(read_run(tmp_path)["scalars"]["grad_norm/_total"]) == {0, 1, 3, 4, 5}


def test_compiled_submodule_parameters_are_named_without_orig_mod(tmp_path):
    model = _mlp()
    model[2] = torch.compile(model[2], backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, every=1, watch_requests=False)
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    probe.detach()
    writer.close()
    tags = read_run(tmp_path)["scalars"]
    assert {"grad_norm/2.weight", "param_norm/2.bias", "update_ratio/2.weight"} <= set(tags)
    assert not any("_orig_mod" in t for t in tags)


def test_optimizer_step_in_backward_hooked_first_is_reported(tmp_path):
    """PyTorch's optimizer-step-in-backward recipe, registered before the probe, takes each
    gradient before the probe's hook sees it: one warning says so."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

    def step_in_backward(p):
        opts[p].step()
        opts[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_in_backward)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, every=1, watch_requests=False)
    with pytest.warns(RuntimeWarning, match="gradient of '(weight|bias)' was already gone"):
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
            probe.step()
    probe.detach()
    writer.close()
    assert "param_norm/weight" in read_run(tmp_path)["scalars"]


def test_amp_unscale_then_clip_reports_the_unscaled_norm_before_clipping(tmp_path):
    """GradScaler, scaler.unscale_(opt), clip_grad_norm_: grad_norm is the unscaled norm
    before clipping (clip_grad_norm_'s return), not the scaled or the clipped one."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, scaler=scaler, every=1, watch_requests=False)
    want = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 16)).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        want.append(float(nn.utils.clip_grad_norm_(model.parameters(), 1e-3)))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    probe.detach()
    writer.close()
    assert probe.errors == [] and min(want) > 1e-2
    got = read_run(tmp_path)["scalars"]["grad_norm/_total"]
    assert [got[s] for s in range(3)] == pytest.approx(want, rel=1e-5)
