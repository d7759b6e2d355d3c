"""Command line: ``tbprobe demo | report | snapshot``."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from tbprobe import SummaryWriter

    torch.manual_seed(0)
    logdir = args.logdir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A small CNN learns to tell horizontal from vertical bars in 16x16 images.
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n=64):
        labels = torch.randint(0, 2, (n,))
        x = torch.rand(n, 1, 16, 16) * 0.3
        pos = torch.randint(2, 14, (n,))
        for i in range(n):
            if labels[i]:
                x[i, 0, :, pos[i]] += 0.7
            else:
                x[i, 0, pos[i], :] += 0.7
        return x.to(device), labels.to(device)

    t0 = time.perf_counter()
    with SummaryWriter(logdir) as w:
        for step in range(args.steps):
            x, y = batch()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.add_scalar("train/loss", loss.detach(), step)  # a tensor: no sync needed
            if step % 20 == 0:
                for name, p in model.named_parameters():
                    w.add_histogram(f"param/{name}", p, step)
                    w.add_histogram(f"grad/{name}", p.grad, step)
                w.add_images("inputs", x[:16], step)
                with torch.no_grad():
                    acc = (model(x).argmax(1) == y).float().mean()
                w.add_scalar("train/accuracy", acc, step)
                print(f"step {step:4d}  loss {loss.item():.4f}  acc {acc.item():.2f}", flush=True)
        w.add_text("about", f"tbprobe demo: {args.steps} steps on {device}")
    print(f"done in {time.perf_counter() - t0:.1f}s; events in {logdir}")
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    tb = tb if os.path.exists(tb) else "tensorboard"
    print(f"look at it:  {tb} --logdir {logdir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tbprobe.probe.report import run_report

    return run_report(args)


def _snapshot(args: argparse.Namespace) -> int:
    from tbprobe.probe.requests import run_snapshot_cli

    return run_snapshot_cli(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tbprobe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model and log it for TensorBoard")
    demo.add_argument("--logdir", default=None, help="run directory (default runs/demo-<time>)")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    demo.set_defaults(func=_demo)

    report = sub.add_parser("report", help="diagnose a run: first non-finite value, spikes, trends")
    report.add_argument("logdir", help="a run directory, or a directory of runs")
    report.add_argument("--json", action="store_true", help="print JSON instead of text")
    report.set_defaults(func=_report)

    snap = sub.add_parser("snapshot", help="ask a running probe for activation snapshots")
    snap.add_argument("logdir", help="the run directory the probe writes to")
    snap.add_argument("--modules", default=None, help="module-name glob (default: all hooked)")
    snap.add_argument("--steps", type=int, default=1, help="steps to capture (default 1)")
    snap.set_defaults(func=_snapshot)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
