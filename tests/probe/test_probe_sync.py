"""No host syncs from probe code during training, and no work at all on steps that are
neither checked nor scheduled."""

from __future__ import annotations

import contextlib
import functools
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tbprobe
from tbprobe.probe import probe as probe_mod
from tbprobe.probe.hooks import HookSet
from tbprobe.probe.stream import HOST_BUFFERS
from tests.probe import models
from tests.probe.util import train

SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero")
ENTRY_POINTS = [
    (HookSet, "_forward"),
    (HookSet, "_backward"),
    (HookSet, "_grad"),
    (probe_mod.Probe, "_close_step"),
    (probe_mod.Probe, "_after_step"),
    (probe_mod.Probe, "_pre_opt"),
]


class _Inside:
    depth = 0


def _track_probe_code(monkeypatch):
    """Mark the time spent inside the probe's hooks and step boundary."""
    for cls, name in ENTRY_POINTS:
        orig = getattr(cls, name)

        @functools.wraps(orig)
        def wrapped(*a, _orig=orig, **k):
            _Inside.depth += 1
            try:
                return _orig(*a, **k)
            finally:
                _Inside.depth -= 1

        monkeypatch.setattr(cls, name, wrapped)


# The kernels' host-tensor histogram path (``_histogram_host`` and the tbprobe.kernels.host*
# modules) reads CPU tensors with numpy (no device there); CUDA tensors take the Triton
# kernels instead, so it is not a sync on the GPU.
_CPU_ONLY = ("_histogram_host",)
_CPU_ONLY_MODULES = ("tbprobe.kernels.host",)  # and host_table, host_sums, ...


def _count_syncs(monkeypatch, counts):
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        @functools.wraps(orig)
        def wrapped(self, *a, _orig=orig, _name=name, **k):
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            if (
                _Inside.depth
                and frame.f_code.co_name not in _CPU_ONLY
                and not module.startswith(_CPU_ONLY_MODULES)
                and not any(self is b for b in HOST_BUFFERS)
            ):
                counts.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_training_loop_makes_zero_host_syncs_from_probe_code(monkeypatch, tmp_path, name):
    """Over a loop with norms, stats, checks and a snapshot, probe code calls none of
    item/cpu/tolist/numpy/bool/int/float/nonzero on a tensor (the landed host buffer
    excepted), while the counter does see such calls when they happen."""
    model = models.make(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    _track_probe_code(monkeypatch)
    counts = []
    _count_syncs(monkeypatch, counts)
    probe = tbprobe.Probe(model, writer, opt, every=2, snapshot_every=3, watch_requests=False)
    train(model, name, 6, opt=opt)
    assert probe.errors == [] and probe.last_record is not None
    assert counts == []
    _Inside.depth += 1  # the counter works: a sync inside "probe code" is seen
    torch.ones(1).item()
    _Inside.depth -= 1
    assert counts == ["item"]
    probe.detach()
    writer.close()


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _Inside.depth:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_unscheduled_unchecked_steps_launch_nothing(monkeypatch):
    """With check_every=0, steps that are not scheduled run no tensor op in probe code;
    the scheduled step does."""
    _track_probe_code(monkeypatch)
    model = models.make("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = tbprobe.Probe(model, writer, opt, every=4, check_every=0, watch_requests=False)
    train(model, "cnn", 1, opt=opt)  # step 0: scheduled
    mode = _CountOps()
    with mode:
        train(model, "cnn", 2, opt=opt)  # steps 1 and 2: nothing
    assert mode.ops == []
    with mode:
        train(model, "cnn", 2, opt=opt)  # step 3 (nothing), then the scheduled step 4
    assert len(mode.ops) > 0
    probe.detach()


def test_checked_steps_compute_counts_and_norms_only(monkeypatch):
    """On a checked, unscheduled CPU step the hooks compute non-finite counts only and the
    grads fused norms: no stats-row, histogram or thumbnail kernel at all."""
    _track_probe_code(monkeypatch)
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False), opt, every=100)
    train(model, "mlp", 1, opt=opt)
    calls = []
    from tbprobe import kernels

    for fn in ("tensor_stats", "histogram", "histogram_many", "thumbnail"):
        orig = getattr(kernels, fn)
        monkeypatch.setattr(
            kernels, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k)
        )
    with contextlib.ExitStack():
        train(model, "mlp", 1, opt=opt)
    assert calls == []
    rec = probe.last_record
    assert set(rec.grad_norms) == {"0.weight", "0.bias", "2.weight", "2.bias", "_total"}
    probe.detach()
