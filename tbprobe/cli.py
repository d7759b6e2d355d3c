"""Command line: ``tbprobe demo | report | snapshot``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from tbprobe.demo import run_demo

    return run_demo(args.logdir, scale=args.scale)


def _report(args: argparse.Namespace) -> int:
    from tbprobe.probe.report import run_report

    return run_report(args)


def _snapshot(args: argparse.Namespace) -> int:
    from tbprobe.probe.requests import run_snapshot_cli

    return run_snapshot_cli(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tbprobe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, snapshot, fine-tune too hard: the probe finds it")
    demo.add_argument("--logdir", default=None, help="run directory (default runs/demo-<time>)")
    demo.add_argument(
        "--scale", type=float, default=1.0, help="fraction of the demo's steps (default 1)"
    )
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
