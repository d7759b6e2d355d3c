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

import weakref

import torch


def _sumsq(x):
    """One reduction that is finite iff ``x`` is (barring overflow) and gives its norm."""
    if x.dtype in (torch.float32, torch.float64):
        v = x.reshape(-1)
        return torch.dot(v, v)
    return torch.linalg.vector_norm(x, dtype=torch.float32)


def attach_floor(model, opt, device):
    """The bare reductions of tbprobe's default per-step check on ``model``: see the module
    docstring. Returns ``(detach, counts)``; ``counts``: outputs, gradients and steps reduced."""
    from tbprobe.probe.selection import floating_tensors, select_modules

    params = [p for p in model.parameters() if p.requires_grad]
    counts = {"outputs": 0, "grads": 0, "steps": 0}
    seen = {}  # id(tensor) -> (weakref, handle): the tensors with a gradient hook this step
    pending = []  # CUDA: this step's results, stacked at the step's end (no sync)
    keep = pending.append if device == "cuda" else float

    def on_grad(g):
        counts["grads"] += 1
        keep(_sumsq(g))

    def watch(t):
        hit = seen.get(id(t))
        if hit is None or hit[0]() is not t:
            seen[id(t)] = (weakref.ref(t), t.register_hook(on_grad))

    def forward(mod, args, kwargs, output):
        outs = floating_tensors(output)
        if not outs:
            return
        for t in outs:
            keep(_sumsq(t.detach()))
        counts["outputs"] += len(outs)
        if torch.is_grad_enabled():
            for t in outs:
                if t.requires_grad:
                    watch(t)
            for t in floating_tensors(args) or floating_tensors(kwargs):
                if t.requires_grad:
                    watch(t)

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
        seen.clear()  # the step's backward is over: its tensors' hooks are spent

    hooked = select_modules(model)  # tbprobe's default selection
    handles = [m.register_forward_hook(forward, with_kwargs=True) for _, m in hooked]
    handles.append(opt.register_step_post_hook(after_step))

    def detach():
        for h in handles:
            h.remove()
        for _, h in seen.values():
            h.remove()
        seen.clear()

    return detach, counts


def check_floor_ran(what, counts, steps):
    if counts["steps"] != steps or not counts["outputs"] or not counts["grads"]:
        raise RuntimeError(f"{what}: the floor's hooks did not run every step: {counts}")
