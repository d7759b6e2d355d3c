"""Through the real Probe, healthy training that the diagnosis used to report as an explosion:

- an epoch's last, short batch (a DataLoader without drop_last): its mean gradient is of few
  samples, so much noisier; a linear regression at its optimum, whose gradients are pure
  noise, has a 1-sample gradient ~32× the norm of a 1024-sample one;
- a warm restart of the learning rate (SGDR): ‖Δw‖ jumps back to its size at the peak rate,
  ~25× the median of the decayed steps before it.
"""

import torch
from torch import nn

from tbprobe import Probe, SummaryWriter


def test_a_last_batch_of_one_sample_raises_no_spike(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(16, 1, generator=gen)
    model = nn.Linear(16, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_true.T)  # at the optimum: the gradients are the noise's
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(30 * 1024 + 1, 16, generator=gen)
    noise = torch.randn(len(x), 1, generator=gen)
    noise[-1] = 2.0  # a 2σ sample: an ordinary one, not an unlucky near-zero residual
    y = x @ w_true + noise
    batches = list(zip(x.split(1024), y.split(1024), strict=True))
    assert len(batches[-1][0]) == 1
    with SummaryWriter(str(tmp_path)) as w:
        probe = Probe(model, w, opt, every=1000)
        records = []
        probe._diagnosis.feed = _recording(probe._diagnosis.feed, records)
        try:
            for bx, by in batches:
                nn.functional.mse_loss(model(bx), by).backward()
                opt.step()
                opt.zero_grad()
            probe.flush()
        finally:
            probe.detach()
    assert [r.volume for r in records] == [1024] * 30 + [1]  # the Linear's outputs
    last, usual = records[-1].grad_norms["_total"], records[0].grad_norms["_total"]
    assert last > 10 * usual  # what made the false alarm
    assert probe.anomalies == []


def _recording(feed, records):
    def wrapped(record):
        records.append(record)
        return feed(record)

    return wrapped


def test_a_warm_restart_of_the_learning_rate_raises_no_update_spike(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=200)
    gen = torch.Generator().manual_seed(1)
    lrs, sizes = [], []
    with SummaryWriter(str(tmp_path)) as w:
        probe = Probe(model, w, opt, every=1)
        probe._diagnosis.feed = _recording(probe._diagnosis.feed, records := [])
        try:
            for _ in range(215):
                x = torch.randn(64, 8, generator=gen)
                loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
                loss.backward()
                opt.step()
                opt.zero_grad()
                lrs.append(opt.param_groups[0]["lr"])
                sched.step()
            probe.flush()
        finally:
            probe.detach()
    for r in records:
        sizes.append(r.update_ratios["0.weight"] * r.param_norms["0.weight"])
    assert lrs[200] > 100 * lrs[199]  # the restart
    assert sizes[200] > 10 * sorted(sizes[150:200])[25]  # what made the false alarm
    assert probe.anomalies == []


def test_a_warmup_from_zero_writes_no_nonfinite_update_ratio(tmp_path):
    """A warm-up from a learning rate of 0 leaves a zero-initialised bias at 0 on the first
    step: its update ratio ‖Δw‖/‖w‖ is 0/0. It is written as 0 (no update), so that
    `tbprobe report` finds no "first non-finite value" in a healthy run."""
    from tbprobe.probe.report import diagnose_logdir

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    nn.init.zeros_(model[2].bias)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 5))
    with SummaryWriter(str(tmp_path)) as w, Probe(model, w, opt, every=1):
        for _ in range(8):
            x = torch.randn(16, 4)
            nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    run = diagnose_logdir(str(tmp_path))["runs"]["."]
    assert run["first_nonfinite"] is None or not run["first_nonfinite"].get("scalars"), run


def test_a_warm_restart_after_a_resume_late_in_the_cycle_raises_nothing(tmp_path):
    """Resumed at step 170 of a 200-step cosine cycle (learning rate ~2% of its peak), the
    probe has never seen the peak; the warm restart at 200 returns to the rate the schedule
    set out from (its groups' `initial_lr`), so it is no update spike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=200)
    gen = torch.Generator().manual_seed(1)

    def step():
        x = torch.randn(64, 8, generator=gen)
        nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    for _ in range(170):  # the run before the checkpoint
        step()
    with SummaryWriter(str(tmp_path)) as w, Probe(model, w, opt, every=1, start_step=170) as p:
        for _ in range(45):
            step()
    assert p.anomalies == []
