"""Packing a step under torch.distributed: local partials, one packed all-gather, global rows.

Which collectives run on a step, and the layout of the gathered buffer, depend only on the
configuration and on the model (the same on every rank), never on rank-local state such as
an armed snapshot, the events this rank's hooks recorded or the gradients it holds, so ranks
cannot desync whatever ran on each of them:

- on a checked or scheduled step, the events: a fixed slot per hooked module and key
  (:mod:`tbprobe.probe.dist_events`), identity rows where a key did not fire on this rank;
  their non-finite counts are summed over the ranks (so rank 0's diagnosis sees a NaN made on
  rank 1), and on a scheduled step their whole rows are merged;
- gradients, parameters and updates of the trainable parameters held as DTensors (FSDP2)
  contribute the stats rows of their local shards (identity rows for an empty shard, a
  replica counted elsewhere or a gradient this rank does not hold); plain tensors (DDP:
  replicated, gradients already averaged) are this rank's own. Updates are those of the
  probed optimizer's parameters (another optimizer's step is not seen), as on one device;
- on a histogram step, every tensor histogrammed over all ranks (DTensors, and with
  ``reduce_activations`` every hooked module's activation) contributes its local part's stats
  row and its bin counts on TensorBoard's fixed "tensorflow" edges (:data:`GLOBAL_BINS`),
  which every rank knows before anything is binned: the counts add up exactly and the merged
  stats row gives the written histogram's min, max, num, sum and sum of squares (a tensor no
  rank held has no elements and is not written). Rank-local tensors keep ``hist_bins`` linear
  bins over their own range, as on one device. Gradients are binned, like their rows, at
  the end of the backward pass (:mod:`tbprobe.probe.dist_grads`), before any clipping;
- on a checked or scheduled step, which ranks' own tensors held a NaN or ±Inf: one stats
  row, count 1 and min = max = the rank where its events (activations, their gradients and
  the modules' inputs: rank-local, unlike DDP's all-reduced parameter gradients) or, without
  events, its gradients were not finite; ``sum`` 1 from every rank (the world size);
- a flag: 1 from a rank that failed to compute its partials.

All of the above go through **one** :class:`PackedGather` per step, histogram steps included.

A step is packed in three phases, so that a failure on one rank never leaves the others
waiting in the collective: the plan (the slots, of how many values, from the configuration
and the model alone), this rank's partials (host bookkeeping and device work; if it raises,
the error is recorded and the rank sends identity rows, zero counts and the flag instead),
and, after the gather, the write-back of the merged values. The flag travels in the packed
step to the writer side, which skips a step some rank failed
(:func:`tbprobe.probe.emit.is_broken`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from tbprobe import kernels
from tbprobe.probe.batch import index_on
from tbprobe.probe.dist_events import (
    NF,
    EventLayout,
    declare,
    event_layout,
    local_events,
    write_events,
)
from tbprobe.probe.dist_grads import (
    grad_parts,
    held_grads,
    norm_rows,
    reduce_grads_distributed,
    taken_for,
)
from tbprobe.probe.dist_slots import GLOBAL_BINS, Gather, Part, global_bins, local_rows, part_of
from tbprobe.probe.distributed import collective_device, identity_rows, is_dtensor
from tbprobe.probe.pack import pack_events

__all__ = [
    "GLOBAL_BINS",
    "DistContext",
    "Part",
    "global_bins",
    "local_rows",
    "pack_distributed",
    "part_of",
    "reduce_grads_distributed",  # tbprobe.probe.dist_grads': pack.reduce_grads calls it here
]

_WHERE = "distributed pack"  # probe.errors' "where" of a failure to pack this rank's partials


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the default process group and the probe's distributed options;
    ``layouts`` caches the event layouts of the probe's modules (by ``backward``)."""

    rank: int
    world: int
    reduce_acts: bool
    per_rank: bool
    layouts: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class _Plan:
    """What this step gathers, from the configuration and the model alone (the same on
    every rank), then this rank's parts of it (:func:`_parts`)."""

    events: EventLayout | None = None  # the events' slots (None: not gathered)
    named: list = field(default_factory=list)  # [(name, param)], the probe's parameters
    gmerged: list = field(default_factory=list)  # per param: its gradient merged over ranks
    grad_rows: bool = False  # gradient rows this step
    trainable: list = field(default_factory=list)  # [(name, param)]
    pmerged: list = field(default_factory=list)  # per trainable param: merged over ranks
    params: bool = False  # param rows this step
    updated: list = field(default_factory=list)  # trainable indices of the pre-step copies
    umerged: list = field(default_factory=list)  # per updated param: merged over ranks
    acts: list = field(default_factory=list)  # modules whose activations are binned globally
    n_glob: int = 0  # histograms binned over all ranks
    gather: Gather = field(default_factory=Gather)
    # This rank's parts (host bookkeeping, may fail on one rank only):
    grads: list = field(default_factory=list)  # [(name, grad or None)], as ``named``
    gparts: list = field(default_factory=list)  # [Part], as ``named``
    pparts: list = field(default_factory=list)  # [Part], as ``trainable``
    items: list = field(default_factory=list)  # [(tag, Part, unscale)] histogrammed
    glob: list = field(default_factory=list)  # indices into items binned over all ranks
    taken: tuple | None = None  # the end of the backward pass's results for these grads
    binned: dict = field(default_factory=dict)  # {index into items: its Histogram}, taken
    device: torch.device | None = None


@dataclass
class _Local:
    """This rank's partials: the slots to gather and what the write-back needs."""

    slots: dict = field(default_factory=dict)
    events: object = None  # dist_events.LocalEvents
    grows: torch.Tensor | None = None
    prow: torch.Tensor | None = None
    urow: torch.Tensor | None = None
    hists: list = field(default_factory=list)  # aligned with plan.items; None if global


def _idx(flags: list[bool]) -> list[int]:
    return [i for i, f in enumerate(flags) if f]


def _plan(probe, st) -> _Plan:
    """The slots of the step's gather: which, and of how many values, decided from the
    configuration (the step's flags) and the model (its hooked modules and parameters) only,
    never from what this rank's hooks recorded."""
    cfg, ctx = probe.cfg, probe._dist
    plan = _Plan()
    g = plan.gather
    modules = [n for n, _ in probe.modules]
    if (st.checked or st.scheduled) and modules:
        plan.events = ctx.layouts.get(st.backward)
        if plan.events is None:
            plan.events = ctx.layouts[st.backward] = event_layout(modules, st.backward)
        declare(g, plan.events, wide=st.scheduled)
    plan.named = list(probe._params)
    plan.trainable = [(n, p) for n, p in plan.named if p.requires_grad]
    plan.gmerged = [p.requires_grad and is_dtensor(p) for _, p in plan.named]
    plan.pmerged = [is_dtensor(p) for _, p in plan.trainable]
    if plan.named and (st.checked or st.scheduled or st.hist):
        plan.grad_rows = True
        g.rows("grad", sum(plan.gmerged))
    if st.scheduled and "params" in cfg.track and plan.trainable:
        plan.params = True
        g.rows("param", sum(plan.pmerged))
        plan.updated = _updated(probe._prev, plan.trainable)
        plan.umerged = [plan.pmerged[i] for i in plan.updated]
        g.rows("upd", sum(plan.umerged))
    if st.checked or st.scheduled:
        g.rows("ranks", 1)
    if st.hist:
        plan.acts = modules if st.keep_hists else []
        plan.n_glob = sum(plan.gmerged) + sum(plan.pmerged) + len(plan.acts)
        g.rows("hstats", plan.n_glob)
        g.sum("hcounts", plan.n_glob * global_bins())
    first = plan.named[0][1] if plan.named else None
    plan.device = first.device if first is not None else collective_device()
    return plan


def _updated(prev, trainable: list) -> list[int]:
    """Indices into ``trainable`` of the parameters that ``prev`` ``(names, copies)`` holds
    pre-step copies of (the probed optimizer's, in its order; the same on every rank); none
    without copies or when one of them is not trainable here."""
    if prev is None:
        return []
    at = {n: i for i, (n, _) in enumerate(trainable)}
    if any(n not in at for n in prev[0]):
        return []
    return [at[n] for n in prev[0]]


def _parts(probe, st, plan: _Plan) -> None:
    """This rank's local parts of the planned tensors (host bookkeeping; a gradient this rank
    does not hold is an empty part that does not contribute)."""
    plan.grads = held_grads(plan.named, st)
    plan.pparts = [part_of(p) for _, p in plan.trainable]
    empty = torch.empty(0, device=plan.device)
    plan.gparts = grad_parts([gr for _, gr in plan.grads], plan.gmerged, plan.device)
    plan.taken = taken_for(st, [gr for _, gr in plan.grads])  # at the end of the backward
    if not st.hist:
        return
    hists = plan.taken[2] if plan.taken is not None else None
    items = []
    for i, ((n, gr), p) in enumerate(zip(plan.grads, plan.gparts, strict=True)):
        if p.merged or gr is not None:
            if hists is not None and hists[i] is not None:
                plan.binned[len(items)] = hists[i]
            items.append((f"grad_hist/{n}", p, True))
    params = zip(plan.trainable, plan.pparts, strict=True)
    items += [(f"param_hist/{n}", p, False) for (n, _), p in params]
    keep = st.act_keep  # binned in the hooks already
    items += [
        (f"act_hist/{m}", Part(empty, True, m in keep, keep.get(m)), False) for m in plan.acts
    ]
    plan.items = items
    plan.glob = [i for i, (_, p, _) in enumerate(items) if p.merged]
    if len(plan.glob) != plan.n_glob:
        raise RuntimeError(f"histograms: {len(plan.glob)} binned over the ranks, planned otherwise")


def _local(probe, st, plan: _Plan) -> _Local:
    """This rank's partials of every planned slot (device work, no host sync)."""
    cfg, loc = probe.cfg, _Local()
    _parts(probe, st, plan)
    st.flush(cfg.hist_bins)
    if plan.events is not None:
        loc.events = local_events(st, plan.events, st.scheduled, plan.device)
        loc.slots.update(loc.events.slots)
    gparts, pparts = plan.gparts, plan.pparts
    if plan.grad_rows:
        if plan.taken is not None:
            loc.grows = plan.taken[1]
        else:
            loc.grows = probe.amp.unscale(local_rows(gparts, norm_rows))
        loc.slots["grad"] = _select(loc.grows, _idx(plan.gmerged))
    if plan.params:
        loc.prow = local_rows(pparts, norm_rows)
        loc.slots["param"] = _select(loc.prow, _idx(plan.pmerged))
    if plan.updated:
        prev, ups = probe._prev[1], [pparts[i] for i in plan.updated]
        torch._foreach_sub_(prev, [p.local for p in ups])  # -Δw, in place
        uparts = [Part(d, p.merged, p.contributes) for d, p in zip(prev, ups, strict=True)]
        loc.urow = local_rows(uparts, norm_rows)
        loc.slots["upd"] = _select(loc.urow, _idx(plan.umerged))
    if plan.items:
        loc.hists, hstats, hcounts = _hist_partials(probe, plan)
        if plan.glob:
            loc.slots["hstats"], loc.slots["hcounts"] = hstats, hcounts
    if "ranks" in plan.gather.keys:
        loc.slots["ranks"] = _rank_row(loc, probe._dist.rank, plan.device)
    return loc


def _rank_row(loc: _Local, rank: int, device) -> torch.Tensor:
    """``(1, 10)``: this rank's part of the "ranks" slot (see the module docstring), on the
    device (no sync)."""
    s = loc.slots
    if "ev" in s:
        ev = s["ev"]
        bad = (ev[:, NF] if ev.dim() == 2 else ev).sum() + s["evin"].sum()
    elif loc.grows is not None:
        bad = loc.grows[:, NF].sum()
    else:
        bad = torch.zeros((), dtype=torch.float64, device=device)
    hit = bad > 0
    row = identity_rows(1, device)
    row[0, 0] = hit.double()
    row[0, 1] = 1.0
    at = torch.full((), float(rank), dtype=torch.float64, device=device)
    row[0, 3] = torch.where(hit, at, row[0, 3])
    row[0, 4] = torch.where(hit, at, row[0, 4])
    return row


def _select(rows: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return rows.index_select(0, index_on(idx, rows.device))


def _hist_partials(probe, plan: _Plan):
    """Local histograms of the rank-local items (``hist_bins`` linear bins, as on one
    device), and of the global ones their local ``(G, 10)`` stats rows and ``(G, bins)``
    float64 counts on :data:`GLOBAL_BINS` (identity rows and zeros where a part is empty or
    counted on another rank)."""
    items, binned = plan.items, plan.binned  # binned: at the end of the backward pass
    scaled = [i for i, (_, p, unscale) in enumerate(items) if unscale and i not in binned]
    tensors = [p.local for _, p, _ in items]
    if scaled:
        for i, t in zip(scaled, probe.amp.unscaled([tensors[i] for i in scaled]), strict=True):
            tensors[i] = t
    out: list = [None] * len(items)
    local = [i for i, (_, p, _) in enumerate(items) if not p.merged]
    todo = [i for i in local if i not in binned]
    done = dict(binned)
    if todo:
        hs = kernels.histogram_many([tensors[i] for i in todo], bins=probe.cfg.hist_bins)
        done.update(zip(todo, hs, strict=True))
    for i in local:
        out[i] = done[i]
    glob = plan.glob
    if not glob:
        return out, None, None
    parts = []
    for i in glob:
        p = items[i][1]
        hist = done.get(i) if p.hist is None else p.hist  # binned in a hook or at backward's end
        parts.append(Part(tensors[i], True, p.contributes, hist))
    live = [j for j, p in enumerate(parts) if p.live]
    stats = identity_rows(len(glob), plan.device)
    counts = torch.zeros(len(glob), global_bins(), dtype=torch.float64, device=plan.device)
    if live:
        todo = [j for j in live if parts[j].hist is None]  # activations were binned in hooks
        done = {}
        if todo:
            binned = kernels.histogram_many([parts[j].local for j in todo], bins=GLOBAL_BINS)
            done = dict(zip(todo, binned, strict=True))
        hs = [parts[j].hist if parts[j].hist is not None else done[j] for j in live]
        sel = index_on(live, stats.device)
        stats.index_copy_(0, sel, torch.stack([h.stats.to(stats.device) for h in hs]))
        got = torch.stack([h.counts.to(counts.device) for h in hs]).to(torch.float64)
        counts.index_copy_(0, index_on(live, counts.device), got)
    return out, stats, counts


def pack_distributed(probe, st, pk, meta) -> None:
    """Fill the packer ``pk`` and ``meta`` with step ``st``'s global values (see the module
    docstring); the distributed counterpart of :func:`tbprobe.probe.pack.pack_step`'s body.
    Every rank must call it at the same step boundary. It raises only where its plan does
    (from the configuration and the model: the same on every rank): a failure of this rank's
    bookkeeping, reductions or write-back is recorded in ``probe.errors`` and flags the step
    as broken instead, after this rank took its part in the collective.

    Example::

        pack_distributed(probe, probe.state, Packer(), StepMeta(step=0, scheduled=True, full=True))
    """
    plan = _plan(probe, st)
    gather = plan.gather
    loc, buf = None, None
    try:
        loc = _local(probe, st, plan)
        if gather.keys:
            buf = gather.pack(loc.slots, plan.device)
    except Exception as exc:  # this rank still takes part, with partials that change nothing
        _failed(probe, exc)
        loc = None
        if gather.keys:
            buf = gather.identities(plan.device)
    ok, merged = loc is not None, {}
    try:
        merged = gather.run(buf) if buf is not None else {}
        if ok:
            _write_back(probe, st, plan, loc, merged, pk, meta)
    except Exception as exc:  # never out of here: this rank must join the next collective
        _failed(probe, exc)
        ok = False
    flag = merged.get("broken")
    if flag is None:
        flag = torch.zeros(1, dtype=torch.float64, device=plan.device)
    pk.add("broken", flag if ok else flag + 1.0)


def _failed(probe, exc: Exception) -> None:
    """Record in ``probe.errors`` (and warn about) the first failure to pack this rank's
    partials. Packing is not disabled: the rank must keep joining the collective on every
    logged step, sending identities while it fails."""
    errors = probe._own_errors
    if any(where == _WHERE for _, where, _ in errors):
        return
    errors.append(("step", _WHERE, exc))
    warnings.warn(
        f"tbprobe: packing this rank's partial statistics failed ({type(exc).__name__}: {exc}); "
        "it keeps taking part in the ranks' gather, the steps it fails are not written; "
        "training continues",
        RuntimeWarning,
        stacklevel=4,
    )


def _write_back(probe, st, plan: _Plan, loc: _Local, merged: dict, pk, meta) -> None:
    """Put the merged values in place and add the step's tensors to ``pk``."""
    from tbprobe.probe.pack import _pack_hists

    ctx = probe._dist
    if "ranks" in merged:
        pk.add("ranks", merged["ranks"])
    if loc.events is not None:
        own = not (ctx.reduce_acts and st.scheduled)  # this rank's rows where it fired
        write_events(
            st, plan.events, loc.events, merged, pk, meta, own=own, others=not ctx.per_rank
        )
    else:
        _local_events(st, pk, meta)
    for key, dst, idx in (
        ("grad", loc.grows, _idx(plan.gmerged)),
        ("param", loc.prow, _idx(plan.pmerged)),
        ("upd", loc.urow, _idx(plan.umerged)),
    ):
        if key in merged:
            dst.index_copy_(0, index_on(idx, dst.device), merged[key])
    grows = loc.grows
    if grows is not None:
        seq = st.grad_seq
        held = [(i, n) for i, (n, gr) in enumerate(plan.grads) if gr is not None]
        held.sort(key=lambda i_n: seq.get(i_n[1], 1 << 60))
        if held:
            pk.add("grad", _select(grows, [i for i, _ in held]))
            meta.grads = [(seq.get(n) or st.next_seq(), n) for _, n in held]
    if loc.prow is not None:
        pk.add("param", loc.prow)
        meta.params = [n for n, _ in plan.trainable]
    if loc.urow is not None:
        pk.add("upd", loc.urow)
        meta.updates = list(probe._prev[0])
    kept = [(tag, h) for (tag, _, _), h in zip(plan.items, loc.hists, strict=True) if h is not None]
    meta.hists.extend(tag for tag, _ in kept)
    hists = [h for _, h in kept]
    for name, h in st.act_hists.items():
        if h is not None:
            meta.hists.append(f"act_hist/{name}")
            hists.append(h)
    _pack_hists(pk, hists)
    if plan.glob:
        pk.add("gstats", merged["hstats"])
        pk.add("gcounts", merged["hcounts"].reshape(len(plan.glob), global_bins()))
        meta.ghists = [plan.items[i][0] for i in plan.glob]


def _local_events(st, pk, meta) -> None:
    """A step whose events are not gathered (neither checked nor scheduled: histograms or a
    snapshot only): this rank's own rows, as on one device."""
    pack_events(st, pk, meta)
