"""`tbprobe demo`'s CNN: its healthy first phase, whose gradients grow 10-100x over the first
tens of steps, raises no alarm; its fine-tune at 150x the learning rate is a spike at once."""

import copy
import functools

import pytest
import torch

from tbprobe.probe.diagnosis import Diagnosis
from tbprobe.probe.records import StepRecord

from .faults import one_thread

# tbprobe/demo.py, phase 1: ShapesCNN on 2048 pillow shapes, Adam at lr 2e-3, batch 64, a probe
# with every=5 (grad norms every step, update sizes every 5th); phase 3: the same model after
# 160 steps fine-tuned on new shapes at 150x the learning rate.
LR, BATCH, EVERY, FINETUNE_AT, FINETUNE_FACTOR = 2e-3, 64, 5, 160, 150
STEPS = 500
# Seed 0 is the demo's own run (it reported 13.3x at conv1.bias, step 21, before the fix);
# seed 8 came closest to an alarm of seeds 0-11 (at step 318 its total was 8.3x its median
# and 4.4x its recent peak, where 10x both is a spike).
SEEDS = (0, 8)


def _record(step, params, before):
    """The step's StepRecord as the demo's probe builds it: gradient norms every step,
    parameter norms and update ratios on its scheduled steps (``before``: the pre-step
    parameters there, else None). Test code: it syncs freely."""
    names = [n for n, _ in params]
    grads = torch._foreach_norm([p.grad for _, p in params])
    grad_norms = {n: float(g) for n, g in zip(names, grads, strict=True)}
    grad_norms["_total"] = float(torch.stack(grads).norm())
    param_norms, ratios = {}, {}
    if before is not None:
        for (n, p), b in zip(params, before, strict=True):
            param_norms[n] = float(p.detach().norm())
            ratios[n] = float((p.detach() - b).norm()) / param_norms[n]
    return StepRecord(
        step=step,
        scheduled=before is not None,
        grad_norms=grad_norms,
        param_norms=param_norms,
        update_ratios=ratios,
    )


def train_demo_cnn(seed: int, finetune_steps: int = 0):
    """``(records, losses, finetune_records)``: ``STEPS`` healthy steps of the demo's CNN and,
    with ``finetune_steps``, the demo's fine-tune run from the state at ``FINETUNE_AT``."""
    import torch.nn.functional as F

    from tbprobe.demo_data import ShapesCNN, shapes_dataset

    torch.manual_seed(seed)
    x, y = shapes_dataset(2048, seed=seed)  # (2048, 3, 32, 32), (2048,)
    model = ShapesCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    params = list(model.named_parameters())

    def one_step(step, x, y):
        i = torch.randint(0, len(x), (BATCH,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for _, p in params] if step % EVERY == 0 else None
        opt.step()
        return _record(step, params, before), float(loss.detach())

    records, losses, saved = [], [], None
    with one_thread(), torch.no_grad():
        for step in range(STEPS):
            if step == FINETUNE_AT and finetune_steps:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
            with torch.enable_grad():
                r, loss = one_step(step, x, y)
            records.append(r)
            losses.append(loss)
        if saved is None:
            return records, losses, []
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        for group in opt.param_groups:
            group["lr"] *= FINETUNE_FACTOR
        torch.manual_seed(2)  # as the demo's fine-tune
        x, y = shapes_dataset(1024, seed=7)
        with torch.enable_grad():
            finetune = [one_step(FINETUNE_AT + k, x, y)[0] for k in range(finetune_steps)]
    return records, losses, finetune


@functools.cache
def demo_run(seed: int):
    """The demo CNN's records for ``seed``, computed once (seed 0 with the fine-tune)."""
    return train_demo_cnn(seed, finetune_steps=4 if seed == 0 else 0)


def feed_all(diag, records):
    return [a for r in records for a in diag.feed(r)]


@pytest.mark.parametrize("seed", SEEDS)
def test_demo_cnn_healthy_phase_raises_nothing(seed):
    """500 healthy steps of the demo's CNN (it learns; gradients grow ~100x) raise no alarm."""
    records, losses, _ = demo_run(seed)
    assert sum(losses[-50:]) < 0.5 * sum(losses[:50])  # it learns: a healthy run
    totals = [r.grad_norms["_total"] for r in records]
    assert max(totals[100:]) > 20 * max(totals[:10])  # the gradual growth is really there
    assert feed_all(Diagnosis(), records) == []


def test_demo_cnn_finetune_explosion_is_reported_at_once():
    """The fine-tune at lr x150 is an update spike at its first step and a gradient spike at
    the next, both 50x+ their baselines, naming the layers."""
    records, _, finetune = demo_run(0)
    found = feed_all(Diagnosis(), records[:FINETUNE_AT] + finetune)
    spikes = [a for a in found if a.kind == "spike"]
    assert [(a.step, a.pass_) for a in spikes[:2]] == [
        (FINETUNE_AT, "update"),
        (FINETUNE_AT + 1, "grad"),
    ]
    assert found[0] is spikes[0]  # nothing before the fine-tune
    for a in spikes[:2]:
        assert a.value > 50 * a.baseline
        assert len(a.top) >= 3 and all(r >= 10 for _, r in a.top)


def test_demo_summary_names_the_series_that_spiked():
    """The demo's summary says "updates" for a spike of ‖Δw‖ and "gradients" for one of the
    gradient norms, each series' first spike in step order (the fine-tune's update spike
    comes a step before its gradients')."""
    from tbprobe.demo import _summary
    from tbprobe.probe.anomaly import Anomaly

    def spike(step, pass_, where, ratio):
        tensor = "grad norm" if pass_ == "grad" else "update"
        return Anomaly(step, "spike", where, tensor, 1.0, 0.1, "m", pass_=pass_,
                       top=((where, ratio),))  # fmt: skip

    lines = _summary([spike(160, "update", "conv2.weight", 140.0),
                      spike(161, "grad", "head.weight", 312.0),
                      spike(162, "grad", "conv1.weight", 20.0)])  # fmt: skip
    assert lines == [
        "updates ‖Δw‖ exploded at step 160: conv2.weight first (conv2.weight ×140)",
        "gradients exploded at step 161: head.weight first (head.weight ×312)",
    ]
