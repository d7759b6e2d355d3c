"""GPU correctness and no-sync checks of tbprobe: step 2 of ``benchmarks/gpu_check.sh``.

Sections (``SECTIONS`` below; add one by appending to the list):

- ``stats``, ``histogram``, ``histogram_many``, ``thumbnail``: the kernels on CUDA tensors of
  every dtype of the shared catalogue (``tests/kernels/catalogue.py``), its odd shapes, strided
  views and NaN/Inf-laden inputs, against float64 numpy on the CPU: counts, min, max and
  histogram bins exact; sums within 1e-6 of the sum of magnitudes, sums of squares within 1e-6
  relative; thumbnails within 1 grey level of a float64 numpy oracle.
- ``big``: one int8 tensor of 2^31 + 17 elements (2 GiB) whose contents are a pattern with
  counts known in closed form: ``tensor_stats`` and ``histogram`` (tensorflow and int bins)
  must give them exactly.
- ``nosync_kernels``: second calls (tables cached) of every kernel entry point under
  ``torch.cuda.set_sync_debug_mode("error")``; each must raise nothing.
- ``writer``: ``SummaryWriter.add_scalar`` / ``add_histogram`` (tensorflow and int bins) /
  ``add_image`` / ``add_images`` of CUDA tensors under sync debug mode "error", then the event
  file is read back and must hold what the same calls with CPU tensors wrote.

The sections' code: ``gpu_checks_kernels.py`` (``stats`` ... ``thumbnail``, ``big``) and
``gpu_checks_nosync.py`` (``nosync_kernels``, ``writer``), what they share in
``gpu_checks_common.py``; this file runs them.

``nosync_kernels`` and ``writer`` also queue a ~0.2 s GPU kernel before each call and require
the call to return while it still runs: that catches the implicit waits (cudaMalloc,
cudaHostAlloc, copies from pageable memory) that sync debug mode does not see.

On the GPU each section (the kernel sections split by dtype into ``--shards``) runs as its own
process, ``--jobs`` at a time: Triton compiles in parallel and a CUDA fault in one unit cannot
poison the others; a unit that dies or outlives ``--unit-timeout`` is one failure.

``--dry-run`` runs everything on CPU tensors so CI covers the same code: the kernels with
``TBPROBE_KERNELS=torch`` and, on a tiny subset, ``TBPROBE_KERNELS=triton`` under
``TRITON_INTERPRET=1``; ``big`` on 4096 + 17 elements; the writer's device path forced for CPU
tensors. Only the sync-debug-mode and GPU-busy checks and the 2^31 size are skipped. A dry run
keeps every unit in one process unless ``--jobs`` says otherwise.

Usage::

    python benchmarks/gpu_checks.py [--quick] [--json PATH] [--only SECTION ...] [--jobs N]
    python benchmarks/gpu_checks.py --dry-run --quick       # CPU, ~10 s

Exit status: 0 when every check passed (or was skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace

import torch

# The sibling modules (gpu_checks_*.py) live next to this script: importable when it runs as a
# script (its directory is sys.path[0]), when it is loaded from its path (as the tests do) and in
# the unit processes it starts (which run this file again).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from gpu_checks_common import Mode, Report  # noqa: E402
from gpu_checks_kernels import (  # noqa: E402
    check_big,
    check_histogram,
    check_histogram_many,
    check_stats,
    check_thumbnail,
)
from gpu_checks_nosync import check_nosync_kernels, check_writer  # noqa: E402

# tbprobe.kernels, reachable as gpu_checks.kernels: the checks call its functions through the
# module at each call, so a test that patches one here patches what every section runs.
from tbprobe import kernels  # noqa: E402, F401 - imports no Triton module


@dataclass
class Section:
    name: str
    run: object
    sharded: bool = False  # split by dtype into --shards processes
    gpu_only: bool = False  # skipped in a dry run


SECTIONS = [  # append new sections here. Units start in this order: the cheap, most important
    # checks first, so a run cut short by its timeout still has them.
    Section("nosync_kernels", check_nosync_kernels, gpu_only=True),
    Section("writer", check_writer),
    Section("big", check_big),
    Section("histogram", check_histogram, sharded=True),
    Section("stats", check_stats, sharded=True),
    Section("histogram_many", check_histogram_many, sharded=True),
    Section("thumbnail", check_thumbnail, sharded=True),
]
BY_NAME = {s.name: s for s in SECTIONS}


def environment(mode: Mode) -> dict:
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_available": torch.cuda.is_available(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
    }
    if mode.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    return env


def run_unit(unit: str, mode: Mode, rep: Report) -> None:
    """Run one unit, ``SECTION:k/n`` (shard ``k`` of ``n`` of the section's dtypes), in-process."""
    name, shard = unit.split(":")
    k, n = (int(v) for v in shard.split("/"))
    section = BY_NAME[name]
    first, t0 = len(rep.checks), time.perf_counter()
    if section.gpu_only and mode.dry_run:
        rep.add(name, "all", "skip", "needs a CUDA device")
    else:
        try:
            section.run(replace(mode, shard=(k, n)), rep)
        except Exception:  # a crashed unit is one failure; the next unit still runs
            rep.add(name, f"{unit} crashed", "fail", traceback.format_exc()[-600:])
    mine = rep.checks[first:]
    c = {s: sum(x["status"] == s for x in mine) for s in ("pass", "fail", "skip")}
    rep.sections.append(dict(name=unit, seconds=round(time.perf_counter() - t0, 2), **c))
    rep.save()


def run_unit_process(unit: str, args, tmp: str) -> tuple[list, list, str]:
    """One unit in a child process (a CUDA fault there cannot poison the others)."""
    part = os.path.join(tmp, unit.replace(":", "_").replace("/", "of") + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--unit", unit, "--json", part]
    cmd += ["--dry-run"] * args.dry_run + ["--quick"] * args.quick
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=args.unit_timeout
        )
        output, rc = out.stdout, str(out.returncode)
    except subprocess.TimeoutExpired as e:  # killed; the checks it saved so far still count
        output, rc = e.stdout or b"", f"killed after {args.unit_timeout:g} s"
    output = output.decode(errors="replace")
    try:
        with open(part) as f:
            doc = json.load(f)
        checks, sections = doc["checks"], doc["sections"]
    except (OSError, ValueError, KeyError):
        checks, sections = [], []
    if not sections:  # died or killed before the end: the output says why
        name, secs = unit.split(":")[0], round(time.perf_counter() - t0, 2)
        detail = f"exit {rc}: {output[-600:]}"
        checks.append(dict(section=name, name=f"{unit} died", status="fail", detail=detail))
        c = {s: sum(x["status"] == s for x in checks) for s in ("pass", "fail", "skip")}
        sections.append(dict(name=unit, seconds=secs, **c))
    return checks, sections, output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU tensors; no GPU needed")
    p.add_argument("--quick", action="store_true", help="a smaller catalogue")
    p.add_argument("--json", metavar="PATH", help="write every result here")
    p.add_argument("--only", action="append", choices=list(BY_NAME), help="these sections")
    p.add_argument("--shards", type=int, help="processes per sharded section (GPU 6, dry run 2)")
    p.add_argument("--jobs", type=int, help="units at a time; 1: all in this process")
    p.add_argument("--unit-timeout", type=float, default=200, help="seconds per unit process")
    p.add_argument("--unit", help=argparse.SUPPRESS)  # SECTION:k/n, run by the parent
    args = p.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit module is imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_checks: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 1
    mode = Mode("cpu" if args.dry_run else "cuda", args.dry_run, args.quick)
    meta = {"mode": {"device": mode.device, "dry_run": mode.dry_run, "quick": mode.quick}}
    rep = Report(args.json, meta)
    if args.unit:
        run_unit(args.unit, mode, rep)
        return 1 if rep.counts()["fail"] else 0

    meta["environment"] = environment(mode)
    shards = args.shards or (2 if mode.dry_run else 6)
    # A dry run stays in one process (CI time); on the GPU each unit gets its own process:
    # Triton compiles in parallel and a CUDA fault in one unit cannot poison the rest.
    jobs = args.jobs or (1 if mode.dry_run else min(12, os.cpu_count() or 1))
    units = [
        f"{s.name}:{k}/{shards if s.sharded else 1}"
        for s in SECTIONS
        if not args.only or s.name in args.only
        for k in range(shards if s.sharded else 1)
    ]
    print(f"gpu_checks: {meta['mode']} {meta['environment']}", flush=True)
    print(f"gpu_checks: {len(units)} units, {jobs} at a time", flush=True)
    started = time.perf_counter()

    def report(sections):
        for u in sections:
            print(
                f"gpu_checks: {u['name']:18s} {u['pass']:5d} passed {u['fail']:4d} failed "
                f"{u['skip']:3d} skipped  {u['seconds']:6.1f} s",
                flush=True,
            )

    if jobs <= 1:
        for unit in units:
            run_unit(unit, mode, rep)
            report(rep.sections[-1:])
    else:
        with (
            tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp,
            ThreadPoolExecutor(jobs) as pool,
        ):
            futures = [pool.submit(run_unit_process, u, args, tmp) for u in units]
            for fut in as_completed(futures):
                checks, sections, output = fut.result()
                rep.checks += checks
                rep.sections += sections
                rep.save()
                print("".join(f"  | {line}\n" for line in output.splitlines()[-20:]), end="")
                report(sections)
    c = rep.counts()
    print(
        f"gpu_checks: {c['pass']} passed, {c['fail']} failed, {c['skip']} skipped "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return 1 if c["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
