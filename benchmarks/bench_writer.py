"""tbprobe vs tensorboardX vs torch.utils.tensorboard, side by side in one run.

Every (writer, case) run is a fresh subprocess with its own temporary log directory, so one
writer's threads, caches and allocator state never disturb another's measurement. The writers
are interleaved and repeated (``--repeats``, default 3) because a shared machine drifts. Every
event is read back after timing; a case whose events are lost reports LOST, not a number.

Cases (timed with ``time.perf_counter``, inputs from fixed seeds, writer built untimed):

- ``scalar``: N ``add_scalar`` calls plus ``close()``: events/s end to end, and µs per call on
  the caller (calls only, before ``close``); the run with the median end-to-end time is shown.
- ``histogram``: ``add_histogram`` of a ``(M,)`` fp32 CPU tensor with the default bins, plus
  ``close()``, on a fresh writer per call; median of 5 calls per run after one warm-up, pooled
  over the runs. ``close`` is the one barrier all three share: tensorboardX's ``flush()`` does
  not drain its queue.
- ``image``: ``add_image`` of a ``(3, 512, 512)`` float noise image plus ``close()``, as above.

Usage::

    python benchmarks/bench_writer.py               # 200k scalars, 10M histogram (~2 min)
    python benchmarks/bench_writer.py --quick       # 20k scalars, 1M histogram, 1 run (~15 s)
    python benchmarks/bench_writer.py --json out.json --check-targets
    python benchmarks/bench_writer.py --cases histogram --repeats 5   # one case only

Exit status: 1 if any writer lost events or crashed, 2 if ``--check-targets`` and a target
failed, else 0.

This file is the driver: it starts the runs, combines them and prints the tables and targets.
What runs inside each fresh process (the cases and their read-back checks) is in
writer_bench_worker.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# The worker side lives next to this script: importable when it runs as a script (its
# directory is sys.path[0]) and when it is loaded from its path.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from writer_bench_worker import worker_main  # noqa: E402

WRITERS = ("tbprobe", "tensorboardX", "torch")
WRITER_LABEL = {
    "tbprobe": "tbprobe",
    "tensorboardX": "tensorboardX",
    "torch": "torch.utils.tensorboard",
}
CASES = ("scalar", "histogram", "image")
BASELINE = "tensorboardX"
WORKER_TIMEOUT_S = 900
NOT_RUN = {"status": "not run", "reason": "left out by --cases"}


def run_case(lib: str, case: str, size: int, calls: int) -> dict:
    """One (writer, case) in a fresh interpreter; the environment is passed on untouched."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, case, str(size), str(calls)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {WORKER_TIMEOUT_S} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": "error", "reason": f"exit {proc.returncode}: {tail[0]}"}


def combine(case: str, runs: list[dict]) -> dict:
    """One result from a case's repeated runs: the first failure if any run failed; for
    ``scalar`` the run with the median end-to-end time; otherwise the median, min and max of
    every timed call of every run pooled."""
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return bad[0]
    if case == "scalar":
        ranked = sorted(runs, key=lambda r: r["total_s"])
        return dict(ranked[len(runs) // 2], runs_events_per_s=[r["events_per_s"] for r in runs])
    total = [t for r in runs for t in r["samples_s"]]
    caller = [t for r in runs for t in r["caller_samples_s"]]
    return {
        "status": "ok",
        "events": sum(r["events"] for r in runs),
        "read_back": sum(r["read_back"] for r in runs),
        "calls": len(total),
        "median_s": statistics.median(total),
        "min_s": min(total),
        "max_s": max(total),
        "caller_median_s": statistics.median(caller),
        "runs_median_s": [statistics.median(r["samples_s"]) for r in runs],
    }


def _speedup(results, case, lib, key, higher_is_better=False):
    r, b = results[case][lib], results[case][BASELINE]
    if r["status"] != "ok" or b["status"] != "ok":
        return None
    return r[key] / b[key] if higher_is_better else b[key] / r[key]


def _fmt_x(x):
    return "n/a" if x is None else f"{x:.1f}×"


def _status_cell(r):
    if r["status"] == "lost":
        return f"LOST ({r['read_back']}/{r['events']} read back)"
    return f"{r['status']}: {r['reason']}"


def render(results: dict, cfg: dict) -> tuple[str, list[dict]]:
    lines = []
    n = cfg["scalars"]
    lines.append(
        f"### add_scalar: {n:,} events + close, median of {cfg['repeats']} runs "
        "(ratio = speedup vs tensorboardX)"
    )
    lines.append("")
    lines.append(
        "| writer | events/s (end to end) | ratio | µs/call (caller) | ratio | read back |"
    )
    lines.append("|---|---:|---:|---:|---:|---|")
    for lib in WRITERS:
        r = results["scalar"][lib]
        if r["status"] != "ok":
            lines.append(f"| {WRITER_LABEL[lib]} | {_status_cell(r)} | | | | |")
            continue
        lines.append(
            f"| {WRITER_LABEL[lib]} | {r['events_per_s']:,.0f} "
            f"| {_fmt_x(_speedup(results, 'scalar', lib, 'events_per_s', True))} "
            f"| {r['us_per_call']:.2f} "
            f"| {_fmt_x(_speedup(results, 'scalar', lib, 'us_per_call'))} "
            f"| {r['read_back']:,}/{r['events']:,} |"
        )
    titles = {
        "histogram": f"add_histogram: ({cfg['hist_numel']:,},) fp32 CPU tensor, default bins",
        "image": "add_image: (3, 512, 512) float noise",
    }
    for case in ("histogram", "image"):
        lines.append("")
        lines.append(
            f"### {titles[case]}; call + close, median of {cfg['repeats']} runs × "
            f"{cfg['calls']} calls, each run after 1 warm-up"
        )
        lines.append("")
        lines.append(
            "| writer | s/call (median) | ratio | min–max s | caller s (median) | read back |"
        )
        lines.append("|---|---:|---:|---:|---:|---|")
        for lib in WRITERS:
            r = results[case][lib]
            if r["status"] != "ok":
                lines.append(f"| {WRITER_LABEL[lib]} | {_status_cell(r)} | | | | |")
                continue
            lines.append(
                f"| {WRITER_LABEL[lib]} | {r['median_s']:.4f} "
                f"| {_fmt_x(_speedup(results, case, lib, 'median_s'))} "
                f"| {r['min_s']:.4f}–{r['max_s']:.4f} | {r['caller_median_s']:.4f} "
                f"| {r['read_back']}/{r['events']} |"
            )

    scalar = results["scalar"]["tbprobe"]
    targets = [
        ("add_scalar end to end ≥ 20× tensorboardX", "scalar", "events_per_s", 20.0, True),
        ("add_histogram ≥ 3× tensorboardX", "histogram", "median_s", 3.0, False),
        ("add_image ≥ 1.5× tensorboardX", "image", "median_s", 1.5, False),
    ]
    verdicts = []
    for name, case, key, need, higher in targets:
        x = _speedup(results, case, "tbprobe", key, higher)
        verdicts.append({"target": name, "value": x, "pass": x is not None and x >= need})
    us = scalar.get("us_per_call") if scalar["status"] == "ok" else None
    verdicts.insert(
        1,
        {
            "target": "add_scalar ≤ 3 µs per call on the caller",
            "value": us,
            "pass": us is not None and us <= 3.0,
        },
    )
    cases_of = ["scalar", "scalar", "histogram", "image"]  # the case each verdict measures
    for v, case in zip(verdicts, cases_of, strict=True):
        if results[case]["tbprobe"]["status"] == "not run":
            v["pass"] = None  # left out by --cases: neither a pass nor a failure
    lines.append("")
    for v in verdicts:
        if v["pass"] is None:
            lines.append(f"- NOT RUN: {v['target']}")
            continue
        if v["value"] is None:
            shown = "no result"
        elif "µs" in v["target"]:
            shown = f"{v['value']:.2f} µs"
        else:
            shown = f"{v['value']:.1f}×"
        lines.append(f"- {'PASS' if v['pass'] else 'FAIL'}: {v['target']} (measured {shown})")
    return "\n".join(lines), verdicts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20k scalars, 1M histogram, 1 run")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument(
        "--repeats", type=int, help="fresh-process runs per (writer, case); default 3, quick 1"
    )
    p.add_argument("--check-targets", action="store_true", help="exit 2 if a target fails")
    p.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="run only these cases (default: all); the others show as 'not run'",
    )
    p.add_argument(
        "--worker", nargs=4, metavar=("LIB", "CASE", "SIZE", "CALLS"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)

    if args.worker:
        lib, case, size, calls = args.worker
        worker_main(lib, case, int(size), int(calls))
        return 0

    cfg = {
        "scalars": 20_000 if args.quick else 200_000,
        "hist_numel": 1_000_000 if args.quick else 10_000_000,
        "calls": 5,
        "repeats": max(1, args.repeats or (1 if args.quick else 3)),
        "quick": args.quick,
    }
    results: dict[str, dict[str, dict]] = {case: {} for case in CASES}
    started = time.perf_counter()
    sizes = {"scalar": cfg["scalars"], "histogram": cfg["hist_numel"], "image": 0}
    for case in CASES:
        if case not in args.cases:
            results[case] = {lib: NOT_RUN for lib in WRITERS}
            continue
        runs: dict[str, list[dict]] = {lib: [] for lib in WRITERS}
        for rep in range(cfg["repeats"]):
            # Interleave the writers and rotate their order, so slow drift of a shared
            # machine spreads over all of them instead of landing on one.
            for i in range(len(WRITERS)):
                lib = WRITERS[(i + rep) % len(WRITERS)]
                if runs[lib] and runs[lib][-1]["status"] == "not available":
                    continue
                r = run_case(lib, case, sizes[case], cfg["calls"])
                runs[lib].append(r)
                print(
                    f"# {case:9s} run {rep + 1}/{cfg['repeats']} {WRITER_LABEL[lib]:24s} "
                    f"{r['status']}",
                    file=sys.stderr,
                    flush=True,
                )
        for lib in WRITERS:
            results[case][lib] = combine(case, runs[lib])

    table, verdicts = render(results, cfg)
    print(
        f"tbprobe writer benchmark ({'quick' if args.quick else 'full'}); "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print(table)
    unavailable = [
        f"{case}/{lib}: {r['reason']}"
        for case in CASES
        for lib, r in results[case].items()
        if r["status"] == "not available"
    ]
    for u in unavailable:
        print(f"\nnot available: {u}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "results": results, "targets": verdicts}, f, indent=2)

    broken = any(
        r["status"] in ("lost", "error") for per_lib in results.values() for r in per_lib.values()
    )
    if broken:
        return 1
    if args.check_targets and any(v["pass"] is False for v in verdicts):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
