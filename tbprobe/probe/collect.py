"""What the hooks gather during one step: row ids of queued reductions, keyed on the host.

Nothing here reads a device value. A step is collected in one of two modes: ``full`` (a
``kernels.STAT_NAMES`` row per hooked tensor) or counts only (the number of non-finite
elements, the cheap per-step check). The tensors themselves are reduced in batches by
:class:`tbprobe.probe.batch.Rows`; an event only lists the ids of its rows (repeated keys:
micro-batches, a module called twice) and of the rows whose non-finite counts make up its
``inputs``. The host merges them once the step has landed.
"""

from __future__ import annotations

import weakref

import torch

from tbprobe import kernels
from tbprobe.probe.batch import MAX_BYTES, MAX_TENSORS, Rows, version
from tbprobe.probe.dist_slots import GLOBAL_BINS

_COMPACT_AT = 4096  # slots kept before dead ones are dropped
_VERSIONS = 1 << 32  # slot keys: id(t) * _VERSIONS + t._version (ids differ by 16 at least)


class Event:
    """One (module, pass, tensor) key of a step: its row ids and its inputs' row ids, over
    all the module's calls in the step; where it was called more than once, where each call
    starts (the host finds the first call that went non-finite: a module run in a loop,
    e.g. an RNN cell, is not blamed for what another module made between its calls)."""

    __slots__ = ("calls", "inputs", "module", "pass_", "rows", "seq", "tensor")

    def __init__(self, seq: int, module: str, pass_: str, tensor: str):
        self.seq, self.module, self.pass_, self.tensor = seq, module, pass_, tensor
        self.rows: list[int] = []
        self.inputs: list[int] | None = None  # non-finite counts of what it consumed
        self.calls: list[tuple[int, int, int]] | None = None  # (seq, first row, first input)

    def new_call(self, seq: int) -> None:
        """A later call of the module (rows and inputs are appended after this)."""
        if self.calls is None:
            self.calls = [(self.seq, 0, 0)]
        self.calls.append((seq, len(self.rows), len(self.inputs) if self.inputs else 0))


class Slot:
    """One forward tensor seen by the hooks in this step (at one version)."""

    __slots__ = ("consumers", "handle", "producers", "ref", "row")

    def __init__(self, ref: weakref.ref):
        self.ref = ref
        self.row: int | None = None  # its row id, when it was a hooked output
        self.handle = None  # its backward tensor hook
        # Tuples of module names, usually one: the hooks share one ``(name,)`` per module.
        self.producers: tuple[str, ...] = ()  # modules it is an output of
        self.consumers: tuple[str, ...] = ()  # modules it is an input of


class StepState:
    """Device results of one step, gathered by the hooks; read once at the step boundary."""

    def __init__(
        self,
        step: int,
        *,
        scheduled: bool = False,
        checked: bool = False,
        full: bool = False,
        backward: bool = False,
        hist: bool = False,
        snap: frozenset | None = None,
        eager: set | None = None,
        learn: bool = False,
        keep_hists: bool = False,
    ):
        self.step = step
        self.scheduled = scheduled  # tags are written
        self.checked = checked  # non-finite counts and grad norms for the diagnosis
        self.active = scheduled or checked or hist or snap is not None  # hooks do anything
        self.backward = backward  # gradients w.r.t. module outputs/inputs are reduced
        self.hist = hist  # activation histograms
        self.snap = snap  # module names to thumbnail, or None
        self.eager = eager if eager is not None else set()  # names reduced at once
        self.learn = learn  # reduce at once and find the outputs changed in place
        # Activation histograms merged over all ranks: binned in the hook on the fixed
        # (TensorBoard) edges every rank shares; tbprobe.probe.dist_pack merges them at the
        # step boundary. The activations themselves are not kept alive until then.
        self.keep_hists = keep_hists
        self.act_keep: dict[str, kernels.Histogram] = {}
        self.rows = Rows(full, self.eager.add, self)
        self.in_backward = False  # the phase: backward hooks have run since the last forward
        self.events: dict[tuple[str, str, str], Event] = {}
        self.grad_seq: dict[str, int] = {}
        self.grads: dict[str, torch.Tensor] = {}  # accumulated grads seen by the hooks
        self.grad_tasks: set[int] = set()  # backward passes with an end callback queued
        # (keys, rows, histograms or None) of the gradients reduced at the end of the last
        # backward pass (``pack.reduce_grads``): keys are the parameters' names on one
        # device, the gradient tensors' ids on the distributed path (``dist_grads``)
        self.grads_taken: tuple | None = None
        self.slots: dict[int, Slot] = {}
        self.act_hists: dict[str, kernels.Histogram | None] = {}
        self.thumbs: dict[str, tuple[torch.Tensor, tuple, str]] = {}
        self.pending_gout: dict[str, list[int]] = {}
        # Modules by grad mode of their forwards this step (see :meth:`no_grad_forward`).
        self.grad_fwd: set[str] = set()
        self.no_grad_fwd: set[str] = set()
        # Elements of the hooked modules' training forward outputs (host metadata, no
        # reduction): how much data the step saw, so the diagnosis can tell an epoch's last,
        # short batch (noisier gradients) from an explosion.
        self.volume = 0
        # (module, parameter) pairs: a module whose host output a non-finite parameter of
        # its own made non-finite at this step's forward (hooks.HookSet._params_at_fault)
        self.param_faults: list[tuple[str, str]] = []
        self._hist_queue: list[tuple[str, torch.Tensor]] = []
        self._hist_bytes = 0
        self._seq = 0
        self._compact_at = _COMPACT_AT

    @property
    def full(self) -> bool:
        """Full stats rows rather than non-finite counts."""
        return self.rows.full

    @full.setter
    def full(self, value: bool) -> None:
        if value != self.rows.full and self.rows.n:
            raise RuntimeError("full: the step has rows already")
        self.rows.full = value

    # ---------------------------------------------------------------- reductions
    def add(self, t: torch.Tensor, key: str | None = None, now: bool = False) -> int:
        """Queue ``t`` for reduction; its row id. ``key`` (a module name): the tensor is
        a forward output, reduced at once if that module's outputs get changed in place
        (or ``now``: an inference-mode output, whose changes cannot be seen); without one it
        is a gradient, whose min/max are not read."""
        if key is None:
            return self.rows.add(t, extremes=False)
        if now:
            return self.rows.add(t, key, eager=True)
        learn = self.learn
        return self.rows.add(t, key, eager=learn or key in self.eager, watch=learn)

    def add_hist(self, name: str, t: torch.Tensor, bins: int) -> None:
        """Queue the histogram of ``t`` as ``act_hist/<name>``."""
        if self.keep_hists:  # binned now, on the edges shared by the ranks
            if t.numel():  # an empty output contributes nothing (an identity row)
                self.act_keep[name] = kernels.histogram(t.detach(), bins=GLOBAL_BINS)
            self.act_hists[name] = None  # taken: a second call of the module does not count
            return
        if self.learn or name in self.eager or self.rows.host(t):  # host: not kept alive
            self.act_hists[name] = kernels.histogram(t.detach(), bins=bins)
            return
        self.act_hists[name] = None
        self._hist_queue.append((name, t.detach()))
        self._hist_bytes += t.numel() * t.element_size()
        if len(self._hist_queue) >= MAX_TENSORS or self._hist_bytes >= MAX_BYTES:
            self._flush_hists(bins)

    def _flush_hists(self, bins: int) -> None:
        q, self._hist_queue, self._hist_bytes = self._hist_queue, [], 0
        if q:
            hs = kernels.histogram_many([t for _, t in q], bins=bins)
            for (name, _), h in zip(q, hs, strict=True):
                self.act_hists[name] = h

    def no_grad_forward(self, name: str) -> bool:
        """Whether to record a forward of module ``name`` run with gradients disabled
        (``torch.no_grad``, ``torch.inference_mode``): a validation or inference pass, a
        frozen module, or the first pass of reentrant activation checkpointing. Recorded
        unless the module has run a forward with gradients in this step: training forwards
        are what a training step's statistics describe, and a validation pass between two
        optimizer steps runs before the next step's training forwards (see
        :meth:`grad_forward`). A step, or a module, with only such forwards keeps them."""
        if name in self.grad_fwd:
            return False
        self.no_grad_fwd.add(name)
        return True

    def grad_forward(self, name: str) -> None:
        """A forward of module ``name`` with gradients: it replaces what its forwards without
        gradients recorded in this step."""
        self.grad_fwd.add(name)
        if name not in self.no_grad_fwd:
            return
        self.no_grad_fwd.discard(name)
        for key in [k for k in self.events if k[0] == name and k[1] == "forward"]:
            del self.events[key]
        self.act_hists.pop(name, None)
        self.act_keep.pop(name, None)
        self.thumbs.pop(name, None)
        if self._hist_queue:
            self._hist_queue = [(n, t) for n, t in self._hist_queue if n != name]

    def flush(self, bins: int) -> None:
        """Reduce everything queued (a phase boundary)."""
        self.rows.flush()
        self.rows.check_watch()
        self._flush_hists(bins)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def event(self, module: str, pass_: str, tensor: str) -> Event:
        return self.event_at((module, pass_, tensor))

    def event_at(self, key: tuple[str, str, str]) -> Event:
        """The event of a ``(module, pass_, tensor)`` key; the hooks pass keys built once per
        module, so a step keeps no key tuple of its own."""
        ev = self.events.get(key)
        if ev is None:
            ev = self.events[key] = Event(self.next_seq(), *key)
        return ev

    # ---------------------------------------------------------------- compaction
    def groups(self) -> tuple[list[list[int]], list[list[int]]]:
        """The row-id lists to keep: merged (events' rows), and non-finite sums (their
        inputs, pending output-gradient counts)."""
        merge = [ev.rows for ev in self.events.values()]
        nf = [ev.inputs for ev in self.events.values() if ev.inputs]
        nf += [g for g in self.pending_gout.values() if g]
        return merge, nf

    def compacted(self) -> None:
        """Row ids of single tensors are gone: forget them. Each event's earlier calls are
        one merged row now: one call from here on, with the first call's seq."""
        for s in self.slots.values():
            s.row = None
        for ev in self.events.values():
            ev.calls = None

    # ---------------------------------------------------------------- slots
    def slot(self, t: torch.Tensor, create: bool = True) -> Slot | None:
        key = id(t) * _VERSIONS + version(t)  # an int: not tracked by the garbage collector
        s = self.slots.get(key)
        if s is not None and s.ref() is t:
            return s
        if not create:
            return None
        if len(self.slots) >= self._compact_at:
            self._compact()
        s = self.slots[key] = Slot(weakref.ref(t))
        return s

    def _compact(self) -> None:
        self.slots = {k: s for k, s in self.slots.items() if s.ref() is not None}
        self._compact_at = max(_COMPACT_AT, 2 * len(self.slots))

    def close(self) -> None:
        """Remove the backward hooks still registered on this step's tensors."""
        for s in self.slots.values():
            if s.handle is not None:
                if s.ref() is not None:  # a dead tensor took its hook with it
                    s.handle.remove()
                s.handle = None
        self.slots = {}
        self.grads = {}
        self.grads_taken = None
        self.act_keep = {}
        self._hist_queue = []
