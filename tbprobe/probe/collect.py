"""What the hooks gather during one step: small device tensors, keyed on the host.

Nothing here reads a device value. A step is collected in one of two modes: ``full`` (a
``kernels.STAT_NAMES`` row per hooked tensor) or counts only (the number of non-finite
elements, the cheap per-step check). Repeated keys (micro-batches, a module called twice)
are merged on the device: counts and sums add, minima and maxima combine.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from tbprobe import kernels

_NF = slice(6, 9)  # nan, pos_inf, neg_inf in STAT_NAMES
_MIN_COLS = (3,)
_MAX_COLS = (4, 5)
_masks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_COMPACT_AT = 4096  # slots kept before dead ones are dropped


def _col_masks(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    m = _masks.get(device)
    if m is None:
        n = len(kernels.STAT_NAMES)
        lo = torch.zeros(n, dtype=torch.bool)
        hi = torch.zeros(n, dtype=torch.bool)
        lo[list(_MIN_COLS)] = True
        hi[list(_MAX_COLS)] = True
        m = _masks[device] = (lo.to(device), hi.to(device))
    return m


def merge_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine two stats rows ``(10,)`` (or two counts ``()``) of disjoint data, on device."""
    if a.ndim == 0:
        return a + b
    lo, hi = _col_masks(a.device)
    return torch.where(lo, torch.minimum(a, b), torch.where(hi, torch.maximum(a, b), a + b))


def _combine(rows: torch.Tensor) -> torch.Tensor:
    """One row from ``(k, 10)`` rows of disjoint data."""
    if rows.shape[0] == 1:
        return rows[0]
    lo, hi = _col_masks(rows.device)
    return torch.where(lo, rows.amin(0), torch.where(hi, rows.amax(0), rows.sum(0)))


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """float64 ``()`` count of NaN and ±Inf elements, on ``x``'s device."""
    return torch.isfinite(x.detach()).logical_not_().sum(dtype=torch.float64)


def nonfinite_of(value: torch.Tensor) -> torch.Tensor:
    """The non-finite count of a row ``(10,)`` or a count ``()``."""
    return value if value.ndim == 0 else value[_NF].sum()


@dataclass
class Event:
    seq: int
    module: str
    pass_: str
    tensor: str
    value: torch.Tensor  # row (10,) in full mode, else count ()
    inputs: torch.Tensor | None = None  # non-finite count () of what it consumed


@dataclass
class Slot:
    """One forward tensor seen by the hooks in this step (at one version)."""

    ref: weakref.ref
    value: torch.Tensor | None = None  # its reduction, when it was a hooked output
    handle: object = None  # its backward tensor hook
    producers: list = field(default_factory=list)  # modules it is an output of
    consumers: list = field(default_factory=list)  # modules it is an input of


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
    ):
        self.step = step
        self.scheduled = scheduled  # tags are written
        self.checked = checked  # non-finite counts and grad norms for the diagnosis
        self.active = scheduled or checked or hist or snap is not None  # hooks do anything
        self.backward = backward  # gradients w.r.t. module outputs/inputs are reduced
        self.full = full  # full stats rows rather than counts
        self.hist = hist  # activation histograms
        self.snap = snap  # module names to thumbnail, or None
        self.events: dict[tuple[str, str, str], Event] = {}
        self.grad_seq: dict[str, int] = {}
        self.grads: dict[str, torch.Tensor] = {}  # accumulated grads seen by the hooks
        self.slots: dict[tuple[int, int], Slot] = {}
        self.act_hists: dict[str, kernels.Histogram] = {}
        self.thumbs: dict[str, tuple[torch.Tensor, tuple, str]] = {}
        self.pending_gout: dict[str, torch.Tensor] = {}
        self._seq = 0
        self._compact_at = _COMPACT_AT

    # ---------------------------------------------------------------- reductions
    def reduce(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Row ``(10,)`` (full mode) or non-finite count ``()`` of the tensors together."""
        if self.full:
            return _combine(kernels.tensor_stats([t.detach() for t in tensors]))
        total = nonfinite_count(tensors[0])
        for t in tensors[1:]:
            total = total + nonfinite_count(t)
        return total

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def add_event(self, module, pass_, tensor, value, inputs=None) -> None:
        key = (module, pass_, tensor)
        ev = self.events.get(key)
        if ev is None:
            self.events[key] = Event(self.next_seq(), module, pass_, tensor, value, inputs)
            return
        ev.value = merge_rows(ev.value, value)
        if inputs is not None:
            ev.inputs = inputs if ev.inputs is None else ev.inputs + inputs

    # ---------------------------------------------------------------- slots
    def slot(self, t: torch.Tensor, create: bool = True) -> Slot | None:
        key = (id(t), t._version)
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
                s.handle.remove()
                s.handle = None
        self.slots = {}
        self.grads = {}
