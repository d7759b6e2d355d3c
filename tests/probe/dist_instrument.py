"""Instrumentation of the gloo ranks of :mod:`tests.probe.dist_harness`: which collectives and
host syncs the probe's own code calls, and faults planted in one rank's packing or hooks."""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

_DIST_COLLECTIVES = (
    "all_gather_into_tensor", "all_gather_single", "all_gather", "all_reduce",
    "reduce_scatter_tensor", "reduce_scatter", "broadcast", "reduce", "gather", "scatter",
    "all_to_all", "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list",
    "send", "recv", "isend", "irecv", "batch_isend_irecv",
)  # fmt: skip
_FUNCOL_COLLECTIVES = (
    "all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
)  # fmt: skip
# As in test_probe_sync: calls that read a device value into host code.
_SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero")
# Callers that only ever read host tensors: the kernels' CPU histogram path (CUDA tensors take
# the Triton kernels), its host kernels' modules, and the host copy of the fixed edges.
_HOST_ONLY = ("_histogram_host", "global_edges")
_HOST_MODULES = ("tbprobe.kernels.host",)  # and its submodules host_table, host_sums...
# The training step's entry points (not _after_step); _grads_done: the end of a backward pass.
_STEP = ("_close_step", "_pre_opt", "_forward", "_backward", "_grad", "_grads_done")


class Collectives:
    """Records every torch.distributed collective called from inside the probe's code (its
    hooks, the end of a backward pass, optimizer hooks and step boundary) as ``(entry point,
    probe step, collective)``, and in ``syncs`` every host-sync call on a tensor made in the
    training step (those entry points, not the landing of earlier steps in
    ``_after_step``); collectives of DDP or FSDP2 themselves (outside the probe's code) are
    not recorded. :meth:`install` patches the module attributes once per process, before
    any Probe."""

    def __init__(self):
        self.calls: list[tuple[str, int, str]] = []
        self.syncs: list[tuple[str, int, str, str]] = []  # (entry, step, method, caller)
        self._inside: list[tuple[str, int]] = []  # the entry points being run, outermost first

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        from tbprobe.probe.hooks import HookSet
        from tbprobe.probe.probe import Probe

        for mod, names in ((dist, _DIST_COLLECTIVES), (funcol, _FUNCOL_COLLECTIVES)):
            for name in names:
                fn = getattr(mod, name, None)
                if fn is not None:
                    setattr(mod, name, self._counted(name, fn))
        for name in ("_close_step", "_after_step", "_pre_opt"):
            setattr(Probe, name, self._entry(name, getattr(Probe, name), lambda p: p))
        for name in ("_forward", "_backward", "_grad", "_grads_done"):
            setattr(HookSet, name, self._entry(name, getattr(HookSet, name), lambda h: h.owner))
        for name in _SYNCS:
            setattr(torch.Tensor, name, self._sync(name, getattr(torch.Tensor, name)))

    def clear(self) -> None:
        self.calls.clear()
        self.syncs.clear()

    def _counted(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._inside:
                entry, step = self._inside[0]
                self.calls.append((entry, step, name))
            return fn(*args, **kwargs)

        return counted

    def _sync(self, name, fn):
        @functools.wraps(fn)
        def sync(tensor, *args, **kwargs):
            if self._inside and self._inside[0][0] in _STEP:
                frame = sys._getframe(1)
                caller = frame.f_code.co_name
                module = frame.f_globals.get("__name__", "")
                if caller not in _HOST_ONLY and not module.startswith(_HOST_MODULES):
                    self.syncs.append((*self._inside[0], name, caller))
            return fn(tensor, *args, **kwargs)

        return sync

    def _entry(self, name, fn, probe_of):
        @functools.wraps(fn)
        def entry(obj, *args, **kwargs):
            self._inside.append((name, probe_of(obj).state.step))
            try:
                return fn(obj, *args, **kwargs)
            finally:
                self._inside.pop()

        return entry


@contextlib.contextmanager
def broken_pack(step: int, message: str):
    """This rank's packing of the partials raises at probe step ``step`` (a fault planted in
    the probe's own code, after its reductions started)."""
    from tbprobe.probe import dist_pack

    orig = dist_pack._hist_partials

    def failing(probe, plan):
        if probe.state.step == step:
            raise RuntimeError(message)
        return orig(probe, plan)

    dist_pack._hist_partials = failing
    try:
        yield
    finally:
        dist_pack._hist_partials = orig


@contextlib.contextmanager
def failing_hook(module: str, step: int, message: str):
    """This rank's forward hook of ``module`` raises at probe step ``step``, midway: it has
    opened the module's event but reduced nothing. The hooks' failure policy then disables
    that hook on this rank only, so from that step on the ranks record different keys."""
    from tbprobe.probe.hooks import HookSet

    orig = HookSet._forward_stats

    def failing(self, st, name, outs, ins, *rest):
        if name == module and st.step == step:
            st.event(name, "forward", "output")
            raise RuntimeError(message)
        return orig(self, st, name, outs, ins, *rest)

    HookSet._forward_stats = failing
    try:
        yield
    finally:
        HookSet._forward_stats = orig
