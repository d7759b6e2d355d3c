"""What the framework callbacks share: owning a writer and a probe for one training run."""

from __future__ import annotations

import os


def torch_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` of a framework's wrapper (accelerate's
    ``AcceleratedOptimizer`` subclasses Optimizer but holds the real one in ``.optimizer``)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not _is_torch_optimizer(inner):
            break
        optimizer = inner
    return optimizer if _is_torch_optimizer(optimizer) else None


def _is_torch_optimizer(obj) -> bool:
    import torch

    return isinstance(obj, torch.optim.Optimizer)


class ProbeSession:
    """A probe attached for one run, with the writer it owns (if it made one).

    ``logdir`` is used when no ``writer`` is given; ``probe_kwargs`` go to ``tbprobe.Probe``.
    """

    def __init__(self, writer=None, logdir=None, probe_kwargs=None):
        if writer is not None and logdir is not None:
            raise ValueError("logdir: give either writer or logdir, not both")
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir: expected a path, got {type(logdir).__name__}")
        self._writer = writer
        self._logdir = logdir
        self._owns_writer = writer is None
        self.probe_kwargs = dict(probe_kwargs or {})
        self.probe = None

    @property
    def writer(self):
        return self._writer

    def start(self, model, optimizer, default_logdir=None, start_step: int = 0) -> None:
        """Attach the probe to ``model``; its step follows ``optimizer`` when there is one and
        starts at ``start_step`` (the framework's step: a resumed run goes on where it was),
        unless the probe's keyword arguments name one. A probe left attached by a run that
        raised (a framework without an exception callback) is detached first."""
        from tbprobe import Probe, SummaryWriter

        if self.probe is not None:
            self.stop()
        if self._writer is None:
            self._writer = SummaryWriter(self._logdir or default_logdir)
        opt = torch_optimizer(optimizer)
        kwargs = {"start_step": start_step, **self.probe_kwargs}
        self.probe = Probe(model, self._writer, optimizer=opt, **kwargs)

    def stop(self) -> None:
        """Detach every hook, write what is pending, close the writer if this session made it."""
        try:
            if self.probe is not None:
                self.probe.detach()
        finally:
            self.probe = None
            if self._owns_writer and self._writer is not None:
                self._writer.close()
                self._writer = None


def lazy_class(module_name: str, build):
    """A module ``__getattr__`` that builds ``TbProbeCallback`` with ``build()`` on first
    access (so importing the module does not import its framework) and caches it."""
    built = []

    def __getattr__(name):
        if name == "TbProbeCallback":
            if not built:
                built.append(build())
            return built[0]
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
