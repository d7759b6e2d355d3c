"""Where a training step's time goes, with and without the probe: ``torch.profiler`` over a
few steps of bench_probe.py's model under each configuration, and the device kernels (CPU
operators on the CPU) ranked by their time per step.

For each configuration it prints the wall time per step (timed without the profiler), the
time the device was busy per step (the sum of every kernel's and copy's own time), and the
top kernels; then, against the plain step, the kernels whose time per step grew the most:
the probe's own reductions, and any model kernel it slowed. bench_probe.py says how much the
probe costs; this says where. A wall time well above the busy time means the host does not
keep the device fed (Python in the hooks or at the step boundary).

On CUDA the model is bench_probe.py's GPT-2-small-sized LM in bf16; on the CPU its small
transformer LM (``--quick``: smaller), whose "device" is the CPU: operators are ranked by
their own CPU time.

Usage: ``python benchmarks/profile_probe.py [--device cpu|cuda] [--quick] [--steps N]
[--configs a,b] [--top K]``. Exit status: 1 if a configuration failed, 2 on a bad command
line, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # loaded from its path (the tests): its helpers sit next to it
    sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))  # tbprobe from this checkout

from cpu_alloc import settle_cpu_allocator  # noqa: E402
from probe_bench_configs import GRADS, HISTS, NONE, NORMS, attach  # noqa: E402
from probe_bench_models import build_models, train  # noqa: E402

PROFILED = (NONE, NORMS, GRADS, HISTS)
WARMUP = 2  # steps before anything is timed: the probe's first step learns the model


def _train(model, n: int, sync) -> None:
    train(model, n)
    sync()


def _own_time(evt, cuda: bool) -> float:
    """An event's own time in µs: on CUDA a kernel's or copy's (a CPU operator also carries
    the device time of the kernels it launched: not counted twice), else a CPU operator's."""
    if not cuda:
        return float(evt.self_cpu_time_total)
    if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CPU:
        return 0.0
    for name in ("self_device_time_total", "self_cuda_time_total"):  # torch renamed it
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile(model, cfg: str, steps: int, cuda: bool, root: str) -> dict:
    """``{wall_ms, busy_ms, kernels: {name: (calls, ms)}}`` per step of ``cfg``."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    att = attach(model, cfg, os.path.join(root, cfg), cuda, root)
    try:
        _train(model, WARMUP, sync)
        t0 = time.perf_counter()
        _train(model, steps, sync)
        wall = (time.perf_counter() - t0) / steps
        acts = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            _train(model, steps, sync)
    finally:
        if att.teardown is not None:
            att.teardown()
    kernels: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for evt in prof.key_averages():
        us = _own_time(evt, cuda)
        if us > 0:
            k = kernels[evt.key]
            k[0] += evt.count
            k[1] += us
    per_step = {n: (c / steps, us / steps / 1e3) for n, (c, us) in kernels.items()}
    busy = sum(ms for _, ms in per_step.values())
    return dict(wall_ms=wall * 1e3, busy_ms=busy, kernels=per_step)


def _name(n: str, width: int = 70) -> str:
    n = n.replace("|", "/")
    return n if len(n) <= width else n[: width - 1] + "…"


def report(results: dict[str, dict], top: int, cuda: bool) -> str:
    what = "kernel / copy" if cuda else "operator"
    lines = [
        "### Per step",
        "",
        "| configuration | wall | busy | busy ÷ wall |",
        "|---|---:|---:|---:|",
    ]
    for cfg, r in results.items():
        share = r["busy_ms"] / r["wall_ms"] if r["wall_ms"] else 0.0
        lines.append(f"| {cfg} | {r['wall_ms']:.2f} ms | {r['busy_ms']:.2f} ms | {share:.2f} |")
    for cfg, r in results.items():
        ranked = sorted(r["kernels"].items(), key=lambda kv: -kv[1][1])[:top]
        lines += ["", f"### Top {what}s: {cfg}", "", f"| {what} | calls | ms | share |"]
        lines.append("|---|---:|---:|---:|")
        for n, (calls, ms) in ranked:
            share = ms / r["busy_ms"] if r["busy_ms"] else 0.0
            lines.append(f"| {_name(n)} | {calls:.0f} | {ms:.3f} | {share:.1%} |")
    base = results.get(NONE)
    for cfg, r in results.items():
        if base is None or cfg == NONE:
            continue
        names = set(r["kernels"]) | set(base["kernels"])
        grew = {
            n: r["kernels"].get(n, (0, 0.0))[1] - base["kernels"].get(n, (0, 0.0))[1] for n in names
        }
        ranked = sorted(grew.items(), key=lambda kv: -kv[1])[:top]
        added = r["busy_ms"] - base["busy_ms"]
        lines += ["", f"### What {cfg} adds per step: {added:+.2f} ms busy, "
                  f"{r['wall_ms'] - base['wall_ms']:+.2f} ms wall", ""]  # fmt: skip
        lines += [f"| {what} | ms added | calls | calls without |", "|---|---:|---:|---:|"]
        for n, ms in ranked:
            if ms <= 0:
                break
            calls = r["kernels"].get(n, (0, 0.0))[0]
            before = base["kernels"].get(n, (0, 0.0))[0]
            lines.append(f"| {_name(n)} | {ms:+.3f} | {calls:.0f} | {before:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="the smaller CPU model")
    p.add_argument("--steps", type=int, default=3, help="steps profiled per configuration")
    p.add_argument("--configs", help=f"comma-separated subset of {','.join(PROFILED)}")
    p.add_argument("--top", type=int, default=12, help="kernels listed per table")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; run with --device cpu")
    if args.steps < 1:
        p.error(f"--steps: expected an integer >= 1, got {args.steps}")
    if args.top < 1:
        p.error(f"--top: expected an integer >= 1, got {args.top}")
    chosen = PROFILED if args.configs is None else tuple(args.configs.split(","))
    if set(chosen) - set(PROFILED):
        p.error(f"--configs: unknown {sorted(set(chosen) - set(PROFILED))}; expected {PROFILED}")
    cuda = device == "cuda"
    dev = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    settle_cpu_allocator()
    model = build_models(dev, args.quick)[0]  # the LM: GPT-2 small on CUDA
    print(f"# profile_probe.py: {model.name} ({model.desc}) on {dev}, {args.steps} steps each\n")
    results, failed = {}, []
    with tempfile.TemporaryDirectory(prefix="profile_probe-") as root:
        for cfg in chosen:
            try:
                results[cfg] = profile(model, cfg, args.steps, cuda, root)
            except Exception as e:  # one configuration failing must not stop the others
                failed.append(cfg)
                print(f"{cfg}: error: {type(e).__name__}: {e}")
            if cuda:
                torch.cuda.empty_cache()
    print(report(results, args.top, cuda))
    if NORMS in results and NONE in results:
        r, b = results[NORMS], results[NONE]
        print(f"KEY: tbprobe norms + stats: {r['wall_ms'] - b['wall_ms']:+.2f} ms wall, "
              f"{r['busy_ms'] - b['busy_ms']:+.2f} ms busy a step (plain: {b['wall_ms']:.2f} ms "
              f"wall, {b['busy_ms']:.2f} ms busy)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
