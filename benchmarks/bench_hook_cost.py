"""The probe's fixed cost per hooked module: a deep stack of tiny layers, where the arithmetic is
negligible and what remains is the probe's Python per module and per step.

    python benchmarks/bench_hook_cost.py [--layers 64] [--steps 200] [--rounds 3]

The model is ``--layers`` blocks of ``Linear(16, 16)`` + ``Tanh`` (the probe hooks each Linear:
a forward hook, gradient hooks on its output and input, two parameter gradients), trained with
SGD on a batch of 8. For each schedule — norms and stats every step (``every=1``), non-finite
checks only (the default between scheduled steps), and idle (nothing checked) — it prints the
step time with and without the probe and the difference per hooked Linear per step. A step
time is the fastest of 5 windows of ``--steps / 5`` steps, the no-probe time the mean of the
windows right before and after; ``--rounds`` repeats the whole and the median is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tbprobe import Probe, SummaryWriter  # noqa: E402

SCHEDULES = {
    "norms + stats every step": dict(every=1),
    "non-finite checks only": dict(every=10**9),
    "idle (check_every=0)": dict(every=10**9, check_every=0),
}


def _model(layers: int) -> torch.nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks)


def _step_time(model, opt, x, steps: int) -> float:
    """Seconds per step: the fastest of 5 windows (after 10 warm-up steps)."""

    def step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(10):
        step()
    per = max(1, steps // 5)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per):
            step()
        best = min(best, (time.perf_counter() - t0) / per)
    return best


def measure(layers: int, steps: int, schedule: dict) -> tuple[float, float]:
    """(no-probe seconds per step, probe seconds per step) for one schedule."""
    torch.manual_seed(0)
    model = _model(layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 16)
    before = _step_time(model, opt, x, steps)
    with SummaryWriter(write_to_disk=False) as w:
        probe = Probe(model, w, opt, on_anomaly=lambda a: None, **schedule)
        try:
            with_probe = _step_time(model, opt, x, steps)
        finally:
            probe.detach()
        if probe.errors:
            raise RuntimeError(f"the probe failed: {probe.errors[0]}")
    after = _step_time(model, opt, x, steps)
    return (before + after) / 2, with_probe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=64, help="Linear + Tanh blocks (default 64)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per step time")
    p.add_argument("--rounds", type=int, default=3, help="repeats; the median is printed")
    args = p.parse_args(argv)
    for name in ("layers", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    print(f"{args.layers} × (Linear(16, 16) + Tanh), batch 8, torch {torch.__version__}, cpu")
    print(f"{'schedule':28} {'no probe':>10} {'probe':>10} {'per Linear per step':>20}")
    for name, schedule in SCHEDULES.items():
        runs = [measure(args.layers, args.steps, schedule) for _ in range(args.rounds)]
        base = statistics.median(b for b, _ in runs)
        cost = statistics.median((w - b) / args.layers for b, w in runs)
        probe = statistics.median(w for _, w in runs)
        print(f"{name:28} {base * 1e3:8.2f} ms {probe * 1e3:8.2f} ms {cost * 1e6:17.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
