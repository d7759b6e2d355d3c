"""Through the real Probe: an epoch's last, short batch (a DataLoader without drop_last) is no
gradient spike. Its mean gradient is of few samples, so much noisier: a linear regression at
its optimum, whose gradients are pure noise, has a 1-sample gradient ~32× the norm of a
1024-sample one, which the diagnosis used to report as an explosion."""

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
