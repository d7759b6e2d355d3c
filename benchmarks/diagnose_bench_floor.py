"""The floor of bench_diagnose.py: no probe, only the bare reductions of tbprobe's default
per-step check (non-finite checks and gradient norms), in plain hooks on the modules tbprobe
hooks by default.

Every floating module output and every output and input gradient (tensor hooks) gets one sum
of squares, read to the host (on CUDA: kept on the device, no sync); after each optimizer step
``torch._foreach_norm`` of the parameter gradients is read to the host. Any exact per-step
check reads each of those tensors once at least, so the floor's overhead is the least such a
check can cost on that model.
"""

from __future__ import annotations

import torch
from floor_hooks import GradWatch, sumsq


def attach_floor(model, opt, device):
    """The bare reductions of tbprobe's default per-step check on ``model``: see the module
    docstring. Returns ``(detach, counts)``; ``counts``: outputs, gradients and steps reduced."""
    from tbprobe.probe.selection import floating_tensors, select_modules

    params = [p for p in model.parameters() if p.requires_grad]
    counts = {"outputs": 0, "grads": 0, "steps": 0}
    pending = []  # CUDA: this step's results, stacked at the step's end (no sync)
    keep = pending.append if device == "cuda" else float

    def on_grad(g):
        counts["grads"] += 1
        keep(sumsq(g))

    grad_hooks = GradWatch(on_grad)  # one gradient hook per output and input tensor per step

    def forward(mod, args, kwargs, output):
        outs = floating_tensors(output)
        if not outs:
            return
        for t in outs:
            keep(sumsq(t.detach()))
        counts["outputs"] += len(outs)
        grad_hooks.forward(outs, args, kwargs)

    def after_step(optimizer, args, kwargs):
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        if device == "cuda":
            pending.extend(norms)
            if pending:
                torch.stack(pending)
            pending.clear()
        elif norms:
            torch.stack(norms).tolist()
        counts["steps"] += 1
        grad_hooks.step_done()

    hooked = select_modules(model)  # tbprobe's default selection
    handles = [m.register_forward_hook(forward, with_kwargs=True) for _, m in hooked]
    handles.append(opt.register_step_post_hook(after_step))

    def detach():
        for h in handles:
            h.remove()
        grad_hooks.remove()

    return detach, counts


def check_floor_ran(what, counts, steps):
    if counts["steps"] != steps or not counts["outputs"] or not counts["grads"]:
        raise RuntimeError(f"{what}: the floor's hooks did not run every step: {counts}")
