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
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            hint = (
                " (a log directory goes in logdir=)"
                if isinstance(writer, (str, os.PathLike))
                else ""
            )
            raise TypeError(f"writer: expected a SummaryWriter, got {type(writer).__name__}{hint}")
        _check_probe_kwargs(probe_kwargs or {})
        self._writer = writer
        self._logdir = logdir
        self._owns_writer = writer is None
        self.probe_kwargs = dict(probe_kwargs or {})
        self.probe = None

    @property
    def writer(self):
        return self._writer

    def start(
        self,
        model,
        optimizer,
        default_logdir=None,
        start_step: int = 0,
        main: bool = True,
        resumed: bool = False,
    ) -> None:
        """Attach the probe to ``model``; its step follows ``optimizer`` when there is one and
        starts at ``start_step`` (the framework's step: a resumed run goes on where it was),
        unless the probe's keyword arguments name one. A probe left attached by a run that
        raised (a framework without an exception callback) is detached first.

        Every process of a distributed run attaches one (each logged step is one collective
        of all ranks); only the ``main`` one makes a writer (the others pass None, or with
        ``per_rank=True`` one that writes nothing: the probe opens ``rank<r>`` under its log
        directory). A ``resumed`` run's writer purges what the abandoned run wrote from
        ``start_step`` on (``purge_step``), as TensorBoard reads it."""
        from tbprobe import Probe, SummaryWriter

        if self.probe is not None:
            self.stop()
        per_rank = self.probe_kwargs.get("per_rank") is True
        if self._writer is None and (main or per_rank):
            logdir = self._logdir or default_logdir
            purge = start_step if resumed and main else None
            self._writer = SummaryWriter(logdir, purge_step=purge, write_to_disk=main)
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


def _check_probe_kwargs(kwargs: dict) -> None:
    """TypeError naming a keyword that ``tbprobe.Probe`` does not take, at the callback's
    construction rather than when training starts."""
    import inspect

    from tbprobe.probe.probe import Probe

    known = set(inspect.signature(Probe.__init__).parameters) - {"self", "model", "writer"}
    for name in kwargs:
        if name not in known:
            raise TypeError(
                f"{name}: not an argument of tbprobe.Probe ({', '.join(sorted(known))})"
            )


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
