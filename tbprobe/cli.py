"""Command line: ``tbprobe demo | report | snapshot``."""

from __future__ import annotations

import argparse
import math
import os
import sys

# The exit status of a process killed by SIGPIPE, as the shell shows it (128 + 13): what
# coreutils, git and grep give in `cmd | head -1` once head has exited.
EXIT_BROKEN_PIPE = 141


def _scale(text: str) -> float:
    """argparse type of ``--scale``: a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return x


def _demo(args: argparse.Namespace) -> int:
    from tbprobe.demo import run_demo

    try:
        return run_demo(args.logdir, scale=args.scale)
    except OSError as e:  # e.g. a log directory that cannot be written: one line, no traceback
        print(f"tbprobe demo: {e}", file=sys.stderr)
        return 1


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
        "--scale", type=_scale, default=1.0, help="fraction of the demo's steps (default 1)"
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
    try:
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe raises here, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (`tbprobe report DIR | head -1`): stop quietly. Point stdout at
        # devnull so Python's flush at exit does not raise again (Python's documented idiom).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return rc


if __name__ == "__main__":
    sys.exit(main())
