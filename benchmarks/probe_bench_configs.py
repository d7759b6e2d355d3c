"""The configurations bench_probe.py compares, and what each attaches to a model for one
window: tbprobe's Probe (norms and stats, gradient and parameter norms only, or with
histograms), the floor (the bare reductions the probe's tags need, in plain hooks),
``wandb.watch`` offline, and a tensorboardX ``add_histogram`` loop. Each ``attach_*`` returns
an ``Attached``: the per-step call, the teardown, and the untimed read-back check.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from floor_hooks import GradWatch, sumsq
from probe_bench_models import Model

NONE, NORMS, HISTS, WANDB, TBX = "none", "tbprobe", "tbprobe+hist", "wandb.watch", "tensorboardX"
GRADS = "tbprobe-grads"  # gradient and parameter norms only: no activation statistics
FLOOR = "floor"  # the bare reductions the probe's tags need, in plain hooks: no probe at all
CONFIGS = (NONE, NORMS, GRADS, FLOOR, HISTS, WANDB, TBX)


@dataclass(kw_only=True)
class Attached:
    """What a configuration left on the model for one window."""

    after_step: object = None  # called after opt.step(), before zero_grad
    teardown: object = None
    check: object = None  # (timed steps) -> "ok" or "WRONG: ..."


def _read_counts(logdir: str) -> Counter:
    from tbprobe.writer import read_events

    counts = Counter()
    for event in read_events(logdir, recursive=True, errors="raise"):
        for v in event.summary.value:
            counts[v.tag] += 1
    return counts


def attach_tbprobe(model: Model, logdir: str, histograms: bool, track=None) -> Attached:
    from tbprobe import Probe, SummaryWriter

    writer = SummaryWriter(logdir)
    extra = {} if track is None else {"track": track}
    try:
        probe = Probe(model.module, writer, optimizer=model.opt, every=1,
                      histogram_every=1 if histograms else None, **extra)  # fmt: skip
    except BaseException:
        writer.close()
        raise
    grads = [n for n, p in model.module.named_parameters() if p.requires_grad]

    def teardown():
        try:
            probe.detach()
        finally:
            writer.close()

    def check(steps: int) -> str:
        counts = _read_counts(logdir)
        if counts["grad_norm/_total"] < steps:
            return f"WRONG: grad_norm/_total written {counts['grad_norm/_total']}× in {steps} steps"
        hist = {t for t in counts if t.startswith("grad_hist/")}
        if not histograms:
            return f"WRONG: {len(hist)} grad_hist tags without histograms" if hist else "ok"
        short = [n for n in grads if counts[f"grad_hist/{n}"] < steps]
        return f"WRONG: grad_hist missing for {short[:3]}…" if short else "ok"

    return Attached(teardown=teardown, check=check)


def attach_tbx(model: Model, logdir: str) -> Attached:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir)
    params = list(model.module.named_parameters())
    step = [0]

    def after_step():  # what users write today; tensorboardX refuses bf16, hence .float()
        for name, p in params:
            w = p.detach()
            writer.add_histogram(
                f"param_hist/{name}", w.float() if w.dtype == torch.bfloat16 else w, step[0]
            )
            if p.grad is not None:
                g = p.grad
                writer.add_histogram(
                    f"grad_hist/{name}", g.float() if g.dtype == torch.bfloat16 else g, step[0]
                )
        step[0] += 1

    def check(steps: int) -> str:
        counts = _read_counts(logdir)
        short = [t for n, _ in params for t in (f"param_hist/{n}", f"grad_hist/{n}")
                 if counts[t] < steps]  # fmt: skip
        return f"WRONG: {len(short)} tags short of {steps} histograms" if short else "ok"

    return Attached(after_step=after_step, teardown=writer.close, check=check)


def attach_wandb(model: Model, root: str) -> Attached:
    """A fresh offline run per window, finished (drained) after it, so that its service
    process's backlog never runs during another configuration's window."""
    import wandb

    os.environ["WANDB_MODE"] = "offline"
    os.makedirs(root, exist_ok=True)
    settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
    run = wandb.init(mode="offline", dir=root, project="bench_probe", settings=settings)
    try:
        run.watch(model.module, log="all", log_freq=1, idx=0)
    except BaseException:
        run.finish()
        raise
    names = [n for n, _ in model.module.named_parameters()]
    logged, log, commits = (
        set(),
        run._log,
        [0],
    )  # watch's hooks log through wandb.run._log (no round trip)

    def counting_log(data, *args, **kwargs):
        logged.update(data)
        return log(data, *args, **kwargs)

    run._log = counting_log

    def teardown():
        try:
            run.unwatch(model.module)
        finally:
            run.finish()

    def check(steps: int) -> str:
        short = [k for n in names for k in (f"gradients/{n}", f"parameters/{n}")]
        short = [k for k in short if k not in logged]
        if short:
            return f"WRONG: no histogram for {short[:3]}…"
        n = commits[0]  # warm-up included
        return "ok" if n >= steps else f"WRONG: {n} commits in {steps} steps"

    def after_step():
        run.log({}, commit=True)
        commits[0] += 1

    return Attached(after_step=after_step, teardown=teardown, check=check)


def attach_floor(model: Model, cuda: bool) -> Attached:
    """The least work any exact every-step probe does: the reductions behind its tags, in
    plain hooks on the modules and parameters tbprobe's Probe hooks by default, and nothing
    else (no records, no packing, no writer).

    Every floating output of a hooked module: sum of squares and ``aminmax``; the gradient of
    every such output, and of every floating input, that requires grad: sum of squares (one
    tensor hook per tensor per step). After each optimizer step: ``_foreach_norm`` of the
    gradients, the parameters and the updates (the parameters minus their copy taken by an
    optimizer pre-step hook into persistent buffers). On the CPU every result is read to the
    host at once (``float`` / ``tolist``); on CUDA they stay on the device, stacked into one
    tensor at the step's end, without a sync."""
    from tbprobe.probe.selection import floating_tensors, select_modules

    module, opt = model.module, model.opt
    modules = select_modules(module)  # what Probe(model) hooks: see selection.default_modules
    params = [p for _, p in module.named_parameters() if p.requires_grad]
    values = [p.detach() for p in params]  # share storage: see the optimizer's updates
    before = [v.clone() for v in values]  # persistent buffers: the params before the step
    pending: list[torch.Tensor] = []  # CUDA: this step's results, stacked at the step's end
    last: list = [None]  # CUDA: the stacked results of the last step (kept, never synced)
    produced: set = set()  # ids of modules whose forward output had a floating tensor
    count = {"fwd": 0, "grad": 0}  # tensors reduced, this step
    steps: list[tuple[int, int, int]] = []  # per step: (outputs, gradients, grads normed)

    if cuda:
        keep = pending.append
    else:

        def keep(r):
            float(r)  # read to the host: what a CPU probe must do before it can log it

    def on_grad(g):
        count["grad"] += 1
        keep(sumsq(g))

    grad_hooks = GradWatch(on_grad)  # one gradient hook per output and input tensor per step

    def forward(mod, args, kwargs, output):
        outs = floating_tensors(output)
        if not outs:
            return
        produced.add(id(mod))
        for t in outs:
            x = t.detach()
            lo, hi = torch.aminmax(x)
            keep(sumsq(x))
            keep(lo)
            keep(hi)
        count["fwd"] += len(outs)
        grad_hooks.forward(outs, args, kwargs)  # gradients w.r.t. the outputs and the inputs

    def pre_step(optimizer, args, kwargs):
        torch._foreach_copy_(before, values)

    def after_step():
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_sub_(before, values)  # minus the update
        norms = torch._foreach_norm(grads) if grads else []
        norms = [*norms, *torch._foreach_norm(values), *torch._foreach_norm(before)]
        if cuda:
            pending.extend(norms)
            last[0] = torch.stack(pending)
            pending.clear()
        else:
            torch.stack(norms).tolist()
        steps.append((count["fwd"], count["grad"], len(grads)))
        count["fwd"] = count["grad"] = 0
        grad_hooks.step_done()

    handles = [m.register_forward_hook(forward, with_kwargs=True) for _, m in modules]
    handles.append(opt.register_step_pre_hook(pre_step))

    def teardown():
        for h in handles:
            h.remove()
        grad_hooks.remove()

    def check(n: int) -> str:
        if len(steps) < n:
            return f"WRONG: after-step reductions ran {len(steps)}× in {n} steps"
        if not produced:
            return "WRONG: no forward hook reduced an output"
        for i, (fwd, grad, normed) in enumerate(steps[-n:]):
            if fwd < len(produced):
                return f"WRONG: step {i} reduced {fwd} outputs of {len(produced)} modules"
            if not grad or not normed:
                return f"WRONG: step {i} reduced {grad} activation gradients, {normed} grads"
        return "ok"

    return Attached(after_step=after_step, teardown=teardown, check=check)


def attach(model: Model, cfg: str, logdir: str, cuda: bool, root: str) -> Attached:
    """What configuration ``cfg`` leaves on ``model`` for one window (``root``: wandb's)."""
    if cfg in (NORMS, HISTS):
        return attach_tbprobe(model, logdir, histograms=cfg == HISTS)
    if cfg == GRADS:
        return attach_tbprobe(model, logdir, histograms=False, track=("grads", "params"))
    if cfg == FLOOR:
        return attach_floor(model, cuda=cuda)
    if cfg == TBX:
        return attach_tbx(model, logdir)
    if cfg == WANDB:
        return attach_wandb(model, os.path.join(root, "wandb"))
    return Attached(check=lambda steps: "ok")


def availability() -> dict[str, str]:
    """Why a configuration cannot run here (missing import), by configuration."""
    missing = {}
    for cfg, mod, attr in ((NORMS, "tbprobe", "Probe"), (WANDB, "wandb", None),
                           (TBX, "tensorboardX", "SummaryWriter")):  # fmt: skip
        try:
            m = __import__(mod)
            if attr:
                getattr(m, attr)
        except (ImportError, AttributeError) as e:
            missing[cfg] = f"not available ({type(e).__name__}: {e})"
    if NORMS in missing:
        missing[HISTS] = missing[GRADS] = missing[NORMS]
    try:  # the floor needs only the probe's module selection
        from tbprobe.probe.selection import floating_tensors, select_modules  # noqa: F401
    except ImportError as e:
        missing[FLOOR] = f"not available ({type(e).__name__}: {e})"
    return missing
