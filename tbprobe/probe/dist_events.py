"""A step's events under torch.distributed, in a layout every rank knows without communicating.

Which ``(module, pass, tensor)`` keys fire on a rank depends on what ran there: a module that
data-dependent control flow skipped on that rank (MoE routing, an ``if`` in ``forward``), a
hook that raised there and was disabled (``HookSet.fail``), an input that requires grad on one
rank only. The layout of the packed gather must not depend on it, or the ranks' buffers differ
in size (gloo raises, NCCL hangs). So every hooked module (the same list on every rank) has a
fixed slot per key: ``forward/output`` and, on steps whose gradients are watched (a flag the
configuration sets, the same on every rank), ``backward/grad_output`` and
``backward/grad_input``; a key with inputs (``output``: the module's tensor inputs;
``grad_input``: its ``grad_output``) has a slot for their non-finite count too. A key that did
not fire on a rank contributes the merge's identity there (an identity row: no elements,
min +inf, max -inf; zero counts).

The gathered slots (:func:`declare`), per step that syncs its events (checked or scheduled):

- ``ev`` ``K``: on a scheduled step (full rows on every rank) each key's stats row, merged
  over the ranks; on any other step one value per key, its non-finite count summed over the
  ranks (a rank whose rows are full there, for a snapshot, sums its three columns);
- ``evin`` ``K_in``: the inputs' non-finite counts, summed;
- ``evon`` ``K + K_in``: on how many ranks the key fired (its inputs: were known).

On the host a rank lists the keys it fired, in its own execution order (``seq``), then the
keys it did not fire, after them, in layout order. Once the step has landed, :func:`landed`
drops the keys that fired on no rank, so nothing is written of a module that ran nowhere.
The rows written are this rank's own for the keys it fired (the merged ones with
``reduce_activations``; non-finite counts are always merged) and the merge of the other
ranks' rows for the keys only they fired.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from tbprobe.probe.batch import index_on
from tbprobe.probe.distributed import identity_rows

NF = slice(6, 9)  # nan, pos_inf, neg_inf in kernels.STAT_NAMES
NAN = 6
_WITH_INPUTS = ("output", "grad_input")


@dataclass(frozen=True)
class EventLayout:
    """The fixed slots of a step's events: ``keys[i]`` is slot ``i``; ``inputs[i]`` the slot
    of its inputs' count (``-1``: none). Rows ``0..K-1`` of the written rows are the keys',
    rows ``K + inputs[i]`` their inputs'.

    Example::

        lay = event_layout(("a", "b"), backward=True)
        lay.keys[lay.slot[("b", "backward", "grad_output")]]  # ("b", "backward", "grad_output")
    """

    keys: tuple
    inputs: tuple
    slot: dict = field(compare=False)
    n_in: int = 0

    @property
    def n(self) -> int:
        return len(self.keys)

    def input_row(self, i: int) -> int | None:
        """The row of slot ``i``'s inputs, or None for a key without inputs."""
        j = self.inputs[i]
        return None if j < 0 else self.n + j


def event_layout(modules, backward: bool) -> EventLayout:
    """The layout of the events of ``modules`` (hooked module names, in the probe's order):
    forward outputs in that order, then, with ``backward``, each module's ``grad_output`` and
    ``grad_input`` in reverse order (the order a backward pass runs)."""
    keys = [(m, "forward", "output") for m in modules]
    if backward:
        for m in reversed(modules):
            keys += [(m, "backward", "grad_output"), (m, "backward", "grad_input")]
    inputs, n_in = [], 0
    for k in keys:
        inputs.append(n_in if k[2] in _WITH_INPUTS else -1)
        n_in += k[2] in _WITH_INPUTS
    return EventLayout(tuple(keys), tuple(inputs), {k: i for i, k in enumerate(keys)}, n_in)


def declare(gather, layout: EventLayout, wide: bool) -> None:
    """Declare the event slots on ``gather`` (a :class:`~tbprobe.probe.dist_slots.Gather`):
    stats rows per key when ``wide`` (a scheduled step), else one count per key."""
    if wide:
        gather.rows("ev", layout.n)
    else:
        gather.sum("ev", layout.n)
    gather.sum("evin", layout.n_in)
    gather.sum("evon", layout.n + layout.n_in)


@dataclass
class LocalEvents:
    """This rank's partials of the event slots, and the keys it fired."""

    ev: torch.Tensor  # (K, 10) when full, else (K,) non-finite counts
    full: bool
    fired: list  # [(slot, Event)], the keys this rank fired
    slots: dict = field(default_factory=dict)  # what it sends: {"ev", "evin", "evon"}


def local_events(st, layout: EventLayout, wide: bool, device) -> LocalEvents:
    """Compact the step's rows (one per event and per group of inputs) and spread them over
    the layout's slots: identity rows and zero counts where a key did not fire. An event
    without rows (its hook failed before reducing anything) did not fire."""
    fired = [(layout.slot[k], ev) for k, ev in st.events.items() if ev.rows and k in layout.slot]
    st.rows.compact()  # event rows: one each; inputs: one per group (ids renumbered)
    rows, _ = st.rows.rows()
    if rows is None and fired:
        raise RuntimeError("events: their rows were lost (a reduction failed)")
    dev = device if rows is None else rows.device
    full, n, n_in = st.full, layout.n, layout.n_in
    ev = identity_rows(n, dev) if full else torch.zeros(n, dtype=torch.float64, device=dev)
    evin = torch.zeros(n_in, dtype=torch.float64, device=dev)
    on = [s for s, _ in fired]  # the rows this rank fills: its keys', its known inputs'
    if fired:
        src = index_on([e.rows[0] for _, e in fired], dev)
        ev.index_copy_(0, index_on(on, dev), rows.index_select(0, src))
        known = [(s, e.inputs) for s, e in fired if layout.inputs[s] >= 0 and e.inputs is not None]
        on += [layout.input_row(s) for s, _ in known]
        counted = [(layout.inputs[s], ins[0]) for s, ins in known if ins]  # (slot, row)
        if counted:
            nf = rows[:, NF].sum(1) if full else rows  # (n_rows,)
            dst, src = (index_on(list(ids), dev) for ids in zip(*counted, strict=True))
            evin.index_copy_(0, dst, nf.index_select(0, src))
    present = torch.zeros(n + n_in, dtype=torch.float64, device=dev)
    if on:
        present.index_fill_(0, index_on(on, dev), 1.0)
    loc = LocalEvents(ev, full, fired)
    if wide:
        loc.slots["ev"] = ev if full else _count_rows(ev)
    else:
        loc.slots["ev"] = ev[:, NF].sum(1) if full else ev
    loc.slots["evin"], loc.slots["evon"] = evin, present
    return loc


def _count_rows(counts: torch.Tensor) -> torch.Tensor:
    """Stats rows ``(n, 10)`` holding only a non-finite count (in ``nan``)."""
    rows = identity_rows(counts.shape[0], counts.device)
    rows[:, NAN] = counts
    return rows


def write_events(
    st, layout: EventLayout, loc: LocalEvents, merged: dict, pk, meta, *, own: bool, others: bool
) -> None:
    """Add the step's rows (``(K + K_in, 10)`` when this rank's are full, else ``(K + K_in,)``
    counts) and the gathered presence ``evon`` to ``pk``; fill ``meta``'s events.

    ``own``: this rank's own rows for the keys it fired, with the merged non-finite counts
    (else the merged rows); ``others``: list the keys this rank did not fire too (dropped at
    landing where no rank fired them)."""
    got, full = merged["ev"], loc.full
    dev = got.device
    if got.ndim == 2:  # merged stats rows (every rank's are full on such a step)
        rows = got
        if own and loc.fired:
            idx = index_on([s for s, _ in loc.fired], dev)
            mine = loc.ev.index_select(0, idx) if full else _count_rows(loc.ev.index_select(0, idx))
            mine[:, NF] = got.index_select(0, idx)[:, NF]
            rows = got.clone().index_copy_(0, idx, mine)
        if not full:
            rows = rows[:, NF].sum(1)
    elif full:  # counts merged; this rank's rows are full (a snapshot): others' in ``nan``
        rows = loc.ev.clone()
        rows[:, NAN] += got - loc.ev[:, NF].sum(1)
    else:
        rows = got
    inputs = _count_rows(merged["evin"]) if full else merged["evin"]
    pk.add("rows", torch.cat([rows, inputs]))
    pk.add("evon", merged["evon"])
    n_rows = layout.n + layout.n_in
    meta.order, meta.n_rows = list(range(n_rows)), n_rows
    entries = sorted(((e.seq, s) for s, e in loc.fired))
    if others:
        mine = {s for s, _ in loc.fired}
        entries += [(st.next_seq(), s) for s in range(layout.n) if s not in mine]
    meta.events = [(seq, *layout.keys[s]) for seq, s in entries]
    meta.event_rows = [[s] for _, s in entries]
    meta.event_inputs = [_as_list(layout.input_row(s)) for _, s in entries]
    meta.on_landed = functools.partial(landed, meta)


def _as_list(row: int | None) -> list[int] | None:
    return None if row is None else [row]


def landed(meta, data: dict) -> None:
    """Once a step has landed (host data): drop from ``meta`` the events that fired on no
    rank, and forget the inputs that no rank knew. Called by ``emit.build_record`` through
    ``meta.on_landed``; idempotent."""
    meta.on_landed = None
    on = data.get("evon")
    if on is None or not meta.events:
        return
    first = np.fromiter((r[0] for r in meta.event_rows), np.int64, len(meta.event_rows))
    keep = np.flatnonzero(on[first] > 0).tolist()  # sync-ok: landed host (numpy) data
    if len(keep) < len(meta.events):
        meta.events = [meta.events[i] for i in keep]
        meta.event_rows = [meta.event_rows[i] for i in keep]
        meta.event_inputs = [meta.event_inputs[i] for i in keep]
    meta.event_inputs = [g if g is None or on[g[0]] > 0 else None for g in meta.event_inputs]
