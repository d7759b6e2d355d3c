"""tbprobe's Probe vs wandb.watch vs a tensorboardX histogram loop: training step overhead.

One process trains each model under every configuration, side by side, and reports the step
time and the overhead over the same model with no probe (``step time / no-probe step time - 1``).

- Models. CPU (``--device cpu``, the default without CUDA): a small GPT-style transformer LM
  and a small CNN, fp32. CUDA (``--device cuda``): a GPT-2-small-sized LM (12 layers, 768 wide,
  12 heads, vocab 50257, tied head; 12 × 1024 tokens a step), parameters and gradients in bf16,
  eager. Plain torch modules with random init: nothing is downloaded.
- Configurations: no probe; ``tbprobe.Probe(every=1)`` (norms and stats every step, no
  histograms); the same with ``track=("grads", "params")`` (gradient and parameter norms
  only: what the statistics of every activation cost); the floor (below); the same probe
  with ``histogram_every=1``; ``wandb.watch(log="all", log_freq=1)`` in offline mode (stats
  sampling and console capture off, so only watch is measured; "not available" if wandb
  cannot be imported); a hand-written loop calling tensorboardX's ``add_histogram`` on every
  parameter and its gradient after every optimizer step.
- The floor: no probe, only the reductions its norms-and-stats tags need, in plain hooks on
  the modules and parameters ``Probe`` hooks by default: a sum of squares and ``aminmax`` of
  every floating module output, a sum of squares of every output and input gradient (tensor
  hooks), and after each optimizer step ``torch._foreach_norm`` of the gradients, the
  parameters and the updates; on the CPU each result is read to the host, on CUDA they stay
  on the device (no sync). Every hooked tensor is read once at least, so no exact every-step
  check can cost less: its overhead is the least a target on that model can ask for (it is
  reported next to the targets, not judged). Its check: the hooks and the after-step
  reductions ran on every timed step.
- Timing. A step is forward, loss, backward, ``opt.step()``, the configuration's per-step call,
  ``zero_grad``. Each window attaches the configuration, runs warm-up steps, times a whole
  window of steps with ``time.perf_counter`` (CUDA synchronized before and after), and
  detaches; writers are closed after the window, untimed. A configuration's window length is
  calibrated once, from the faster of two steps, to about ``--window-s`` seconds (or is
  ``--steps``). ``--repeats`` rounds run every other configuration once, in a rotated order,
  each window between two no-probe windows (a round: none, A, none, B, none, ...); a
  configuration gets no new window once it has used its time budget (30 s, quick 3 s). Step
  time: median over the windows. Overhead: median over rounds of (window step time / the mean
  step time of the two no-probe windows around it) - 1, so that drift on a shared machine
  hits both sides of each ratio alike.
- Checks (untimed): every event file written is read back; the probe's windows must hold
  ``grad_norm/_total`` for every timed step (and ``grad_hist/`` tags with histograms, none
  without), the tensorboardX loop 2 histograms per parameter per step, and wandb's run a
  commit per step and a histogram of every parameter and gradient. A warning raised from
  tbprobe during a window (a hook that disabled itself) is a failure: a probe that stopped
  working would look free.

Usage: ``python benchmarks/bench_probe.py [--quick] [--device cpu|cuda] [--json PATH]
[--repeats N] [--window-s S | --steps N] [--configs a,b] [--check-targets]`` (``--quick``:
smaller CPU models, 2 rounds of 0.2 s windows, < 60 s on an idle 2-core CPU). Exit status: 1
if a configuration crashed or failed its check, 2 on a bad command line or (with
``--check-targets``) a failed target, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch

# The models and configurations live next to this script: importable when it runs as a script
# (its directory is sys.path[0]) and when it is loaded from its path (as the tests do). Every
# name they define is reachable from here too (bench.Model, bench.cnn, bench.attach_floor, ...).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from cpu_alloc import settle_cpu_allocator  # noqa: E402
from probe_bench_configs import (  # noqa: E402, F401
    CONFIGS,
    FLOOR,
    GRADS,
    HISTS,
    NONE,
    NORMS,
    TBX,
    WANDB,
    Attached,
    attach,
    attach_floor,
    attach_tbprobe,
    attach_tbx,
    attach_wandb,
    availability,
)
from probe_bench_models import (  # noqa: E402, F401
    GPT,
    Attention,
    Block,
    Model,
    build_models,
    cnn,
    lm_loss,
    train,
)

OVERHEAD_FLOOR = 1e-4  # below what a window resolves: the divisor of the "× less" ratio
LABEL = {
    NONE: "no probe",
    NORMS: "tbprobe: norms + stats every step",
    GRADS: 'tbprobe: grad + param norms only, every step (track=("grads", "params"))',
    FLOOR: "floor: bare reductions the tags need (plain hooks, no logging)",
    HISTS: "tbprobe: + histograms every step",
    WANDB: 'wandb.watch(log="all", log_freq=1), offline',
    TBX: "tensorboardX add_histogram, every param + grad",
}


# ----------------------------------------------------------------------------- timing


@dataclass(kw_only=True)
class Bench:
    device: torch.device
    repeats: int
    window_s: float
    budget_s: float  # per (model, configuration but none): no new window once spent
    root: str
    unavailable: dict[str, str]
    steps: int | None = None  # per timed window; None: calibrated to window_s
    rows: list[dict] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train(self, model: Model, n: int, after_step) -> None:
        train(model, n, after_step)

    def attach(self, model: Model, cfg: str, logdir: str) -> Attached:
        return attach(model, cfg, logdir, cuda=self.device.type == "cuda", root=self.root)

    def calibrate(self, model: Model, after_step) -> int:
        """Steps per window: about ``window_s`` seconds, at least 3 unless a step is slow."""
        one = []
        for _ in range(2):
            t0 = time.perf_counter()
            self.train(model, 1, after_step)
            self.sync()
            one.append(time.perf_counter() - t0)
        t = min(one)
        return max(1 if 3 * t > self.window_s else 3, min(200, round(self.window_s / t)))

    def window(self, model: Model, cfg: str, r: int, n: int | None) -> tuple[float, int, str]:
        """Attach, warm up, time ``n`` steps (calibrated when None), detach, check."""
        logdir = os.path.join(self.root, f"{model.name}-{cfg}-{r}".replace(" ", "_"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            att = self.attach(model, cfg, logdir)
            try:
                self.train(model, 1 if n in (None, 1) else 2, att.after_step)  # warm-up
                self.sync()
                if n is None:  # calibrate on the faster of two more warm-up steps
                    n = self.calibrate(model, att.after_step)
                t0 = time.perf_counter()
                self.train(model, n, att.after_step)
                self.sync()
                step_s = (time.perf_counter() - t0) / n
            finally:
                if att.teardown is not None:
                    att.teardown()
        check = att.check(n)
        ours = [w for w in caught if f"{os.sep}tbprobe{os.sep}" in w.filename]
        if check == "ok" and ours:
            check = f"WRONG: tbprobe warned: {ours[0].message}"
        return step_s, n, check

    def run_model(self, model: Model) -> None:
        cfgs = [c for c in CONFIGS if c not in self.unavailable]
        others = [c for c in cfgs if c != NONE]
        times = {c: [] for c in cfgs}
        ratios = {c: [] for c in others}
        spent = dict.fromkeys(cfgs, 0.0)
        n_steps, checks, errors = dict.fromkeys(cfgs, self.steps), {}, {}

        def timed(cfg: str, r: int) -> float | None:
            t0 = time.perf_counter()
            try:
                step_s, n_steps[cfg], check = self.window(model, cfg, r, n_steps[cfg])
            except Exception as e:  # one configuration failing must not stop the others
                errors[cfg] = f"error: {type(e).__name__}: {e}"
                return None
            spent[cfg] += time.perf_counter() - t0
            times[cfg].append(step_s)
            if check != "ok":
                checks.setdefault(cfg, check)
            print(
                f"# {model.name}: round {r + 1}/{self.repeats} {cfg:13s} "
                f"{step_s * 1e3:9.2f} ms/step × {n_steps[cfg]}",
                file=sys.stderr,
                flush=True,
            )
            return step_s

        for r in range(self.repeats):
            # Every window is bracketed by no-probe windows: its ratio is to their mean, so
            # drift on a shared machine (seconds long) hits both sides of each ratio alike.
            before = timed(NONE, r)
            if before is None:
                break
            for cfg in others[r % len(others) :] + others[: r % len(others)]:
                if cfg in errors or (times[cfg] and spent[cfg] > self.budget_s):
                    continue
                step_s = timed(cfg, r)
                if step_s is None:
                    continue
                after = timed(NONE, r)
                if after is None:
                    break
                ratios[cfg].append(step_s / ((before + after) / 2))
                before = after
        for cfg in CONFIGS:
            row = dict(model=model.name, desc=model.desc, config=cfg, label=LABEL[cfg])
            got = times.get(cfg, [])
            if cfg in self.unavailable or cfg in errors or not got:
                row |= dict(status=self.unavailable.get(cfg) or errors.get(cfg, "error: no window"))
                self.rows.append(row)
                continue
            rs = [1.0] if cfg == NONE else ratios[cfg]
            row |= dict(status="ok", check=checks.get(cfg, "ok"), windows=len(got),
                        steps_per_window=n_steps[cfg], step_s=statistics.median(got),
                        step_s_all=got, overhead=statistics.median(rs) - 1 if rs else None,
                        overhead_min=min(rs) - 1 if rs else None,
                        overhead_max=max(rs) - 1 if rs else None)  # fmt: skip
            self.rows.append(row)


# ----------------------------------------------------------------------------- report


def fmt_t(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_pct(x) -> str:
    return "—" if x is None else f"{x * 100:+.1f}%"


def report(bench: Bench, models: list[Model]) -> str:
    parts = []
    for m in models:
        lines = [f"### {m.name} ({m.desc}, {bench.device.type})", ""]
        lines += [
            "| configuration | step time | overhead | overhead range | windows × steps | check |"
        ]
        lines += ["|---|---:|---:|---:|---:|---|"]
        for r in (r for r in bench.rows if r["model"] == m.name):
            if r["status"] != "ok":
                lines.append(f"| {r['label']} | {r['status']} | | | | |")
                continue
            rng = (
                "—"
                if r["config"] == NONE
                else f"{fmt_pct(r['overhead_min'])} … {fmt_pct(r['overhead_max'])}"
            )
            lines.append(
                f"| {r['label']} | {fmt_t(r['step_s'])} | "
                f"{'—' if r['config'] == NONE else fmt_pct(r['overhead'])} | {rng} | "
                f"{r['windows']} × {r['steps_per_window']} | {r['check']} |"
            )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def targets(bench: Bench) -> list[dict]:
    """CPU targets judged on a CPU run, CUDA targets on a CUDA run; the rest are n/a."""
    dev = bench.device.type

    def rows(cfg):
        return [r for r in bench.rows if r["config"] == cfg]

    def overheads(cfg):
        rs = rows(cfg)
        if not rs or any(r["status"] != "ok" or r["overhead"] is None for r in rs):
            return None, (rs[0]["status"] if rs and rs[0]["status"] != "ok" else "no result")
        if any(r["check"] != "ok" for r in rs):
            return None, "wrong result"
        return [r["overhead"] for r in rs], None

    def ratio(ours, theirs):  # how many times less overhead than wandb.watch; ours ≥ 0.01%
        return [t / max(o, OVERHEAD_FLOOR) for o, t in zip(ours, theirs, strict=True)]

    specs = [  # (device, target, measure, [overheads] or None, why not, aggregate, passes)
        ("cpu", "cpu: tbprobe norms + stats every step ≤ 10% overhead", "max overhead",
         *overheads(NORMS), max, lambda v: v <= 0.10),
        ("cpu", "cpu: tbprobe norms + stats ≥ 5× less overhead than wandb.watch",
         "min wandb.watch overhead ÷ tbprobe's", None, None, min, lambda v: v >= 5),
        ("cuda", "cuda: tbprobe norms + stats every step ≤ 1% overhead (GPT-2 small, bf16)",
         "overhead", *overheads(NORMS), max, lambda v: v <= 0.01),
        ("cuda", "cuda: tbprobe with histograms of every gradient every step ≤ 3% overhead",
         "overhead", *overheads(HISTS), max, lambda v: v <= 0.03),
    ]  # fmt: skip
    (ours, why_o), (theirs, why_t) = overheads(NORMS), overheads(WANDB)
    specs[1] = (*specs[1][:3], ratio(ours, theirs) if ours and theirs else None,
                why_o or why_t, *specs[1][5:])  # fmt: skip
    out = []
    for spec_dev, name, measure, values, why, pick, passes in specs:
        value = pick(values) if values and spec_dev == dev else None
        if spec_dev != dev:
            verdict = f"n/a on {dev}"
        elif value is None:
            verdict = (
                f"FAIL ({why})" if "wrong" in str(why) or "error" in str(why) else f"n/a ({why})"
            )
        else:
            verdict = "PASS" if passes(value) else "FAIL"
        out.append(dict(target=name, measure=measure, value=value, verdict=verdict))
    # Not a target: what the bare reductions behind the tags cost, next to the 10% above.
    floor, why = overheads(FLOOR)
    value = max(floor) if floor and dev == "cpu" else None
    verdict = f"n/a on {dev}" if dev != "cpu" else "info" if value is not None else f"n/a ({why})"
    out.append(dict(target="cpu: floor (bare reductions) overhead",
                    measure="max overhead, no target", value=value, verdict=verdict))  # fmt: skip
    return out


def machine(device: torch.device) -> dict:
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
    )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller models, shorter windows")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--json", metavar="PATH", help="write every number here")
    p.add_argument("--repeats", type=int, help="rounds of every configuration (default 5, quick 2)")
    p.add_argument("--window-s", type=float, help="seconds per timed window (default 1, quick 0.2)")
    p.add_argument("--steps", type=int, help="steps per timed window (default: calibrated)")
    p.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)} (default all)")
    p.add_argument("--check-targets", action="store_true", help="exit 2 if a target fails")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; run with --device cpu")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps: expected an integer >= 1, got {args.steps}")
    if args.window_s is not None and not args.window_s > 0:
        p.error(f"--window-s: expected seconds > 0, got {args.window_s}")
    chosen = CONFIGS if args.configs is None else tuple(args.configs.split(","))
    if set(chosen) - set(CONFIGS):
        p.error(f"--configs: unknown {sorted(set(chosen) - set(CONFIGS))}; expected {CONFIGS}")
    skipped = {c: "not run (--configs)" for c in CONFIGS if c not in chosen and c != NONE}
    dev = torch.device(f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu")
    settle_cpu_allocator()  # every window in one allocator regime (see cpu_alloc.py)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_probe-") as root:
        bench = Bench(
            device=dev, repeats=args.repeats or (2 if args.quick else 5),
            window_s=args.window_s or (0.2 if args.quick else 1.0), steps=args.steps,
            budget_s=3.0 if args.quick else 30.0, root=root,
            unavailable=skipped | availability(),
        )  # fmt: skip
        info = machine(dev)
        print(f"# bench_probe.py: {', '.join(f'{k} {v}' for k, v in info.items())}")
        print(f"\nCommand: `{' '.join(['python', *sys.argv])}`\n")
        models = build_models(dev, args.quick)
        for m in models:
            bench.run_model(m)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(report(bench, models))
    results = targets(bench)
    for t in results:
        shown = "—" if t["value"] is None else f"{t['value']:.3g}"
        print(f"- {t['verdict']}: {t['target']} ({t['measure']}: {shown})")
    broken = [
        r for r in bench.rows if r["status"].startswith("error") or r.get("check", "ok") != "ok"
    ]
    print(f"\n{len(bench.rows)} rows, {len(broken)} broken; {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            doc = dict(machine=info, argv=sys.argv, repeats=bench.repeats, window_s=bench.window_s)
            json.dump(doc | dict(rows=bench.rows, targets=results), f, indent=1)
    if broken:
        return 1
    if args.check_targets and any(t["verdict"].startswith("FAIL") for t in results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
