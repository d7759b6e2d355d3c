"""Planted faults: what `torch.autograd.detect_anomaly` blames vs what tbprobe reports, and the
per-step overhead of each on healthy steps, side by side in one run.

    python benchmarks/bench_diagnose.py [--device cpu|cuda] [--quick] [--json PATH]

For every (architecture, fault) of tests/probe/faults.py: plain training steps are timed, then
the same steps under `detect_anomaly` and under a tbprobe `Probe` (default schedule, non-finite
checks every step, built-in diagnosis); then the fault step runs under each. detect_anomaly's
answer is the autograd function it names plus the innermost frame of the forward traceback it
prints; it "finds the module" when that frame is the planted module's forward. Target: tbprobe
names the planted module wherever detect_anomaly does, at >= 20x lower overhead.

The fault models are tiny (a step takes about a millisecond on a CPU), so a fixed per-step
cost dominates their overheads. A second table times the same three setups on the same
architectures at a training scale (``--no-scaled`` skips it): an MLP 1024-2048-2048-10 on
batches of 256, a CNN of 32/64/128 channels on 32 RGB 64x64 images, and, where transformers
is installed, a 4-layer 256-wide GPT-2 on 8x128 tokens (no fault is planted there).

Both tables have a fourth setup, the floor: no probe, only the bare reductions of tbprobe's
default per-step check (non-finite checks and gradient norms), in plain hooks on the modules
tbprobe hooks by default: one sum of squares of every floating module output and of every
output and input gradient (tensor hooks), each read to the host (on CUDA: kept on the device,
no sync), and after each optimizer step ``torch._foreach_norm`` of the parameter gradients,
read to the host. Any exact per-step check reads every one of those tensors once at least,
so "DA/floor" (detect_anomaly's overhead over the floor's) is the highest ratio such a check
could reach on that model. The floor's hooks are in diagnose_bench_floor.py; this file holds
the runs, the two answers to each fault and the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # loaded from its path (the tests): its helpers sit next to it
    sys.path.insert(0, _HERE)

from cpu_alloc import settle_cpu_allocator  # noqa: E402
from diagnose_bench_floor import attach_floor, check_floor_ran  # noqa: E402

from tbprobe import Probe, SummaryWriter  # noqa: E402
from tests.probe.faults import (  # noqa: E402
    ARCHS,
    FAULTS,
    Data,
    Fault,
    base_lr,
    loss_fn,
    make_model,
)

FAULT_FN = "faulty_forward"  # the planted module's forward in tests/probe/faults.py


def _to(batch, device):
    return tuple(t.to(device) for t in batch)


def _setup(arch, kind, device, step, n_batches=None):
    fault = Fault(arch, kind, step=step)
    model = make_model(arch).to(device)
    fault.plant(model)
    lr = base_lr(arch, "adam")
    opt = fault.make_optimizer(model, "adam", lr)
    data = Data(arch)
    batches = [_to(data(), device) for _ in range(n_batches or step + 2)]
    return fault, model, opt, lr, batches


def _train_step(arch, fault, model, opt, lr, batch, step):
    fault.current = step
    fault.set_lr(opt, lr)
    loss = loss_fn(arch, model, batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _overheads(arch, kind, device, steps, every):
    """Median seconds per healthy step: plain, under detect_anomaly, with a Probe attached,
    and with the floor's bare reductions (see the module docstring).

    The four run interleaved, step by step, each on its own copy of the model (the fault
    never fires), so load changes on a shared machine hit all four alike.
    """
    runs = [_setup(arch, kind, device, 10**9, steps) for _ in range(4)]
    times = [[], [], [], []]
    with tempfile.TemporaryDirectory() as d, SummaryWriter(d) as w:
        probe = Probe(runs[2][1], w, runs[2][2], every=every, on_anomaly=lambda a: None)
        detach_floor, counts = attach_floor(runs[3][1], runs[3][2], device)
        try:
            for i in range(steps):
                for k, (fault, model, opt, lr, batches) in enumerate(runs):
                    _sync(device)
                    t = time.perf_counter()
                    if k == 1:
                        with torch.autograd.detect_anomaly():
                            _train_step(arch, fault, model, opt, lr, batches[i], i)
                    else:
                        _train_step(arch, fault, model, opt, lr, batches[i], i)
                    _sync(device)
                    times[k].append(time.perf_counter() - t)
        finally:
            probe.detach()
            detach_floor()
    check_floor_ran(f"{arch} {kind}", counts, steps)
    return [statistics.median(t[3:]) for t in times]


def _detect_anomaly_answer(arch, fault, model, opt, lr, batches, step):
    """(answer, found_module) from running the fault step under detect_anomaly."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autograd.detect_anomaly():
                _train_step(arch, fault, model, opt, lr, batches[step], step)
        except RuntimeError as e:
            fn = re.search(r"Function '(\w+)'", str(e))
            trace = "\n".join(str(w.message) for w in caught if "Traceback" in str(w.message))
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', trace)
            user = [f for f in frames if "site-packages" not in f[0] and "/torch/" not in f[0]]
            where = f"{os.path.basename(user[-1][0])}:{user[-1][1]} {user[-1][2]}" if user else "?"
            found = bool(user) and user[-1][2] == FAULT_FN
            return f"{fn.group(1) if fn else 'error'} at {where}", found
    return "nothing", False


def _tbprobe_answer(arch, fault, model, opt, lr, batches, step, logdir, every):
    with SummaryWriter(logdir) as w:
        probe = Probe(model, w, opt, every=every, on_anomaly=lambda a: None)
        try:
            for i in range(step + 2):
                _train_step(arch, fault, model, opt, lr, batches[i], i)
        finally:
            probe.detach()
    if not probe.anomalies:
        return "nothing", None
    a = probe.anomalies[0]
    return f"{a.kind} {a.module} {a.pass_} step {a.step}", (a.module, a.pass_, a.step)


def _scaled_model(arch):
    """(model, batch maker, loss) of ``arch`` at a training scale, or None."""
    from torch import nn

    torch.manual_seed(0)
    ce = nn.functional.cross_entropy
    if arch == "mlp":
        model = nn.Sequential(
            nn.Linear(1024, 2048), nn.Tanh(), nn.Linear(2048, 2048), nn.Tanh(),
            nn.Linear(2048, 10),
        )  # fmt: skip
        return model, lambda: (torch.randn(256, 1024), torch.randint(0, 10, (256,))), ce
    if arch == "cnn":
        layers, c_in = [], 3
        for c in (32, 64, 128):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 8 * 8, 10))
        return model, lambda: (torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))), ce
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    cfg = GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(cfg)

    def batch():
        tok = torch.randint(0, 1000, (8, 128))
        return tok, tok

    return model, batch, None  # the model computes its loss (see _scaled_step)


def _scaled_step(arch, model, opt, batch, loss):
    x, y = batch
    out = model(input_ids=x, labels=y).loss if arch == "gpt2" else loss(model(x), y)
    opt.zero_grad()
    out.backward()
    opt.step()


def bench_scaled(arch, device, steps, every):
    """Median seconds per step (plain, detect_anomaly, tbprobe, floor) at a training scale,
    the four interleaved step by step; None if the architecture is not available."""
    import copy

    made = _scaled_model(arch)
    if made is None:
        return None
    model, make_batch, loss = made
    models = [copy.deepcopy(model).to(device) for _ in range(4)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models]
    batches = [_to(make_batch(), device) for _ in range(4)]
    times = [[], [], [], []]
    with tempfile.TemporaryDirectory() as d, SummaryWriter(d) as w:
        probe = Probe(models[2], w, opts[2], every=every, on_anomaly=lambda a: None)
        detach_floor, counts = attach_floor(models[3], opts[3], device)
        try:
            for i in range(steps):
                for k in range(4):
                    _sync(device)
                    t = time.perf_counter()
                    if k == 1:
                        with torch.autograd.detect_anomaly():
                            _scaled_step(arch, models[k], opts[k], batches[i % 4], loss)
                    else:
                        _scaled_step(arch, models[k], opts[k], batches[i % 4], loss)
                    _sync(device)
                    times[k].append(time.perf_counter() - t)
        finally:
            probe.detach()
            detach_floor()
    check_floor_ran(arch, counts, steps)
    plain, da, tb, floor = (statistics.median(t[2:]) for t in times)
    return {
        "arch": arch,
        "plain_ms": 1e3 * plain,
        "da_overhead": da / plain - 1,
        "tb_overhead": tb / plain - 1,
        "ratio": (da / plain - 1) / max(tb / plain - 1, 1e-3),
        "floor_overhead": floor / plain - 1,
        "ratio_floor": (da / plain - 1) / max(floor / plain - 1, 1e-3),
    }


def bench_one(arch, kind, device, steps, every):
    step = max(steps, 17)  # the diagnosis' baselines need 15 steps
    row = {"arch": arch, "fault": kind}
    fault = Fault(arch, kind, step=step)
    row["expected"] = "{} {} step {}".format(*fault.expected)
    t_plain, t_da, t_tb, t_floor = _overheads(arch, kind, device, steps, every)
    fault, model, opt, lr, batches = _setup(arch, kind, device, step)
    for i in range(step):  # healthy steps before the fault
        _train_step(arch, fault, model, opt, lr, batches[i], i)
    row["detect_anomaly"], da_found = _detect_anomaly_answer(
        arch, fault, model, opt, lr, batches, step
    )
    fault, model, opt, lr, batches = _setup(arch, kind, device, step)
    with tempfile.TemporaryDirectory() as d:
        tb_every = 1 if kind == "lr_spike" else every  # update sizes come on scheduled steps
        row["tbprobe"], got = _tbprobe_answer(
            arch, fault, model, opt, lr, batches, step, d, tb_every
        )
    row["tbprobe_ok"] = got == fault.expected
    row["detect_anomaly_ok"] = da_found
    row["plain_ms"] = 1e3 * t_plain
    row["da_overhead"] = t_da / t_plain - 1
    row["tb_overhead"] = t_tb / t_plain - 1
    row["ratio"] = row["da_overhead"] / max(row["tb_overhead"], 1e-3)
    row["floor_overhead"] = t_floor / t_plain - 1
    row["ratio_floor"] = row["da_overhead"] / max(row["floor_overhead"], 1e-3)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="MLP and CNN only, fewer steps")
    parser.add_argument("--every", type=int, default=50, help="the probe's schedule (default 50)")
    parser.add_argument(
        "--no-scaled", action="store_true", help="skip the training-scale overhead table"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_diagnose: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    settle_cpu_allocator()  # every setup timed in one allocator regime (see cpu_alloc.py)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="For backward hooks to be called")
    archs = ("mlp", "cnn") if args.quick else ARCHS
    steps = 30 if args.quick else 60
    rows = [bench_one(a, k, args.device, steps, args.every) for a in archs for k in FAULTS]
    head = (
        f"{'model':5} {'fault':12} {'expected':38} {'detect_anomaly says':36} "
        f"{'tbprobe says':44} {'plain ms':>8} {'DA ovh':>7} {'tb ovh':>7} {'ratio':>6} "
        f"{'floor':>7} {'DA/fl':>6}"
    )
    print(f"device: {args.device}, torch {torch.__version__}, probe every={args.every}")
    print(head)
    print("-" * len(head))
    for r in rows:
        da = ("✓ " if r["detect_anomaly_ok"] else "✗ ") + r["detect_anomaly"]
        tb = ("✓ " if r["tbprobe_ok"] else "✗ ") + r["tbprobe"]
        print(
            f"{r['arch']:5} {r['fault']:12} {r['expected'][:38]:38} {da[:36]:36} {tb[:44]:44} "
            f"{r['plain_ms']:8.2f} {r['da_overhead']:7.1%} {r['tb_overhead']:7.1%} "
            f"{r['ratio']:6.1f} {r['floor_overhead']:7.1%} {r['ratio_floor']:6.1f}"
        )
    found = sum(r["tbprobe_ok"] for r in rows)
    both = [r for r in rows if r["detect_anomaly_ok"]]
    print(
        f"tbprobe right on {found}/{len(rows)}; detect_anomaly names the module on "
        f"{len(both)}/{len(rows)}, tbprobe too on {sum(r['tbprobe_ok'] for r in both)}/{len(both)}"
    )
    scaled = []
    if not args.no_scaled:
        n = 20 if args.quick else 60
        scaled = [r for a in archs if (r := bench_scaled(a, args.device, n, args.every))]
        print(f"\noverhead at a training scale (healthy steps, median of {n}):")
        print(
            f"{'model':5} {'plain ms':>9} {'DA ovh':>8} {'tb ovh':>8} {'ratio':>6} "
            f"{'floor ovh':>9} {'DA/floor':>8}"
        )
        for r in scaled:
            print(
                f"{r['arch']:5} {r['plain_ms']:9.2f} {r['da_overhead']:8.1%} "
                f"{r['tb_overhead']:8.1%} {r['ratio']:6.1f} {r['floor_overhead']:9.1%} "
                f"{r['ratio_floor']:8.1f}"
            )
    ratios = [r["ratio"] for r in rows]
    key = f"KEY: right on {found}/{len(rows)} (detect_anomaly {len(both)}/{len(rows)})"
    if ratios:
        key += f"; DA ovh ÷ tbprobe's {min(ratios):.1f}-{max(ratios):.1f}× (fault models)"
    key += "".join(f", {r['arch']} {r['ratio']:.1f}×" for r in scaled)  # training scale
    print(key)  # the line gpu_check.sh's summary shows for this step
    if args.json:
        with open(args.json, "w") as f:
            doc = {"device": args.device, "every": args.every, "rows": rows, "scaled": scaled}
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
