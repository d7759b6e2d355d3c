"""What the two floors (bench_probe's and bench_diagnose's) do alike, in plain hooks: one sum
of squares per tensor, and one gradient hook per tensor per step on what a module's forward
returned and consumed."""

from __future__ import annotations

import weakref

import torch


def sumsq(x: torch.Tensor) -> torch.Tensor:
    """One reduction that gives a tensor's norm (and, being finite, that it has no NaN/Inf)."""
    if x.dtype in (torch.float32, torch.float64):
        v = x.reshape(-1)
        return torch.dot(v, v)
    return torch.linalg.vector_norm(x, dtype=torch.float32)  # no fp32 copy of x


class GradWatch:
    """Tensor hooks ``on_grad`` on every output and floating input of a forward that requires
    grad, one per tensor per step: :meth:`step_done` forgets them once the step's backward is
    over, :meth:`remove` takes off those still registered."""

    def __init__(self, on_grad):
        from tbprobe.probe.selection import floating_tensors  # the probe's own rule

        self.on_grad, self._floating = on_grad, floating_tensors
        self.seen: dict = {}  # id(tensor) -> (weakref, handle): the tensors hooked this step

    def forward(self, outs, args, kwargs) -> None:
        """Hook the gradients w.r.t. ``outs`` and the forward's floating inputs."""
        if not torch.is_grad_enabled():
            return
        for t in outs:
            if t.requires_grad:
                self._watch(t)
        for t in self._floating(args) or self._floating(kwargs):
            if t.requires_grad:
                self._watch(t)

    def _watch(self, t: torch.Tensor) -> None:
        hit = self.seen.get(id(t))
        if hit is None or hit[0]() is not t:
            self.seen[id(t)] = (weakref.ref(t), t.register_hook(self.on_grad))

    def step_done(self) -> None:
        self.seen.clear()  # the step's backward is over: its tensors' hooks are spent

    def remove(self) -> None:
        for _, h in self.seen.values():
            h.remove()
        self.seen.clear()
