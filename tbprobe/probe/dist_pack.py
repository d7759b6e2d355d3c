"""Packing a step under torch.distributed: local partials, one packed all-gather, global rows.

Which collectives run on a step depends only on the configuration and on the model (the same
on every rank), never on rank-local state such as an armed snapshot, so ranks cannot desync:

- on a checked or scheduled step, the events' rows (compacted to one row per event and one
  per group of inputs) contribute their non-finite counts, summed over the ranks (so rank 0's
  diagnosis sees a NaN made on rank 1); with ``reduce_activations`` on a scheduled step the
  whole rows are merged;
- gradients, parameters and updates held as DTensors (FSDP2) contribute the stats rows of
  their local shards (identity rows for an empty shard or a replica counted elsewhere); plain
  tensors (DDP: replicated, gradients already averaged) are this rank's own;
- on a histogram step, every tensor histogrammed over all ranks (DTensors, and activations
  with ``reduce_activations``) contributes its local part's stats row and its bin counts on
  TensorBoard's fixed "tensorflow" edges (:data:`GLOBAL_BINS`), which every rank knows before
  anything is binned: the counts add up exactly and the merged stats row gives the written
  histogram's min, max, num, sum and sum of squares. Rank-local tensors keep ``hist_bins``
  linear bins over their own range, as on one device;
- a flag: 1 from a rank that failed to compute its partials.

All of the above go through **one** :class:`PackedGather` per step, histogram steps included.

A step is packed in three phases, so that a failure on one rank never leaves the others
waiting in the collective: the plan (host bookkeeping only: which slots, of how many values,
the same on every rank), this rank's partials (device work; if it raises, the error is
recorded and the rank sends identity rows, zero counts and the flag instead), and, after the
gather, the write-back of the merged values. The flag travels in the packed step to the
writer side, which skips a step some rank failed (:func:`tbprobe.probe.emit.is_broken`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from tbprobe import kernels
from tbprobe.probe.batch import index_on
from tbprobe.probe.dist_slots import GLOBAL_BINS, Gather, Part, global_bins, local_rows, part_of
from tbprobe.probe.distributed import collective_device, identity_rows

__all__ = [
    "GLOBAL_BINS",
    "DistContext",
    "Part",
    "global_bins",
    "local_rows",
    "pack_distributed",
    "part_of",
]

NF = slice(6, 9)  # nan, pos_inf, neg_inf
_WHERE = "distributed pack"  # probe.errors' "where" of a failure to pack this rank's partials


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the default process group and the probe's distributed options."""

    rank: int
    world: int
    reduce_acts: bool
    per_rank: bool


@dataclass
class _Plan:
    """What this step gathers, decided from host bookkeeping alone (the same on every rank)."""

    sync_rows: bool = False  # compact the events' rows and gather them
    n_ev: int = 0  # rows after the compaction (0: none gathered)
    grads: list = field(default_factory=list)  # [(name, grad)]
    gparts: list = field(default_factory=list)  # [Part]
    grad_rows: bool = False  # gradient rows this step
    grad_full: bool = False  # full stats rows, else norm rows
    trainable: list = field(default_factory=list)  # [(name, param)]
    pparts: list = field(default_factory=list)  # [Part]
    params: bool = False  # param rows this step
    updates: bool = False  # update rows (a pre-step copy of the same params exists)
    items: list = field(default_factory=list)  # [(tag, Part, unscale)] histogrammed
    glob: list = field(default_factory=list)  # indices into items binned over all ranks
    gather: Gather = field(default_factory=Gather)
    device: torch.device | None = None


@dataclass
class _Local:
    """This rank's partials: the slots to gather and what the write-back needs."""

    slots: dict = field(default_factory=dict)
    rows: torch.Tensor | None = None
    order: list = field(default_factory=list)
    grows: torch.Tensor | None = None
    prow: torch.Tensor | None = None
    urow: torch.Tensor | None = None
    hists: list = field(default_factory=list)  # aligned with plan.items; None if global


def _merged(parts: list[Part]) -> list[int]:
    return [i for i, p in enumerate(parts) if p.merged]


def _plan(probe, st) -> _Plan:
    """Host bookkeeping only: no reduction runs here, so every rank gets this far (the one
    exception: :func:`part_of` redistributes a ``Partial`` DTensor, itself a collective)."""
    cfg, ctx = probe.cfg, probe._dist
    plan = _Plan()
    plan.sync_rows = (st.checked or st.scheduled) and st.rows.n > 0
    if plan.sync_rows:
        # One row per event (and per group of inputs), in an order every rank agrees on.
        st.events = dict(sorted(st.events.items()))
        st.pending_gout = dict(sorted(st.pending_gout.items()))
        merge, nf = st.groups()
        plan.n_ev = len(merge) + len(nf)
    g = plan.gather
    if plan.n_ev:
        if ctx.reduce_acts and st.scheduled:
            g.rows("ev", plan.n_ev)
        else:
            g.sum("nf", 3 * plan.n_ev)
    seen = st.grads
    grads = [(n, seen.get(n, p.grad)) for n, p in probe._params]
    plan.grads = [(n, gr) for n, gr in grads if gr is not None]
    plan.gparts = [part_of(gr) for _, gr in plan.grads]
    if plan.grads and (st.checked or st.scheduled or st.hist):
        plan.grad_rows = True
        plan.grad_full = st.scheduled or probe._rows_always
        g.rows("grad", len(_merged(plan.gparts)))
    plan.trainable = [(n, p) for n, p in probe._params if p.requires_grad]
    plan.pparts = [part_of(p) for _, p in plan.trainable]
    if st.scheduled and "params" in cfg.track and plan.trainable:
        plan.params = True
        g.rows("param", len(_merged(plan.pparts)))
        prev = probe._prev
        plan.updates = prev is not None and prev[0] == [n for n, _ in plan.trainable]
        if plan.updates:
            g.rows("upd", len(_merged(plan.pparts)))
    if st.hist:
        grads = zip(plan.grads, plan.gparts, strict=True)
        params = zip(plan.trainable, plan.pparts, strict=True)
        items = [(f"grad_hist/{n}", p, True) for (n, _), p in grads]
        items += [(f"param_hist/{n}", p, False) for (n, _), p in params]
        acts = sorted(st.act_keep.items())
        items += [(f"act_hist/{n}", Part(t, True, True), False) for n, t in acts]
        plan.items = items
        plan.glob = [i for i, (_, p, _) in enumerate(items) if p.merged]
        if plan.glob:
            g.rows("hstats", len(plan.glob))
            g.sum("hcounts", len(plan.glob) * global_bins())
    parts = [p.local for p in plan.gparts + plan.pparts]
    parts += [t for _, t in sorted(st.act_keep.items())]
    plan.device = parts[0].device if parts else collective_device()
    return plan


def _local(probe, st, plan: _Plan) -> _Local:
    """This rank's partials of every planned slot (device work, no host sync)."""
    cfg, loc = probe.cfg, _Local()
    st.flush(cfg.hist_bins)
    if plan.sync_rows:
        st.rows.compact()
    loc.rows, loc.order = st.rows.rows()
    if plan.n_ev:
        rows = loc.rows
        if rows is None or rows.shape[0] != plan.n_ev:
            n = 0 if rows is None else rows.shape[0]
            raise RuntimeError(f"rows: {n} after the compaction, expected {plan.n_ev}")
        if "ev" in plan.gather.keys:
            loc.slots["ev"] = rows
        else:
            zero = torch.zeros_like(rows)
            loc.slots["nf"] = rows[:, NF] if st.full else torch.stack([rows, zero, zero], 1)
    gparts, pparts = plan.gparts, plan.pparts
    if plan.grad_rows:
        reduce = kernels.tensor_stats if plan.grad_full else _norm_rows
        loc.grows = probe.amp.unscale(local_rows(gparts, reduce))
        loc.slots["grad"] = _select(loc.grows, _merged(gparts))
    if plan.params:
        loc.prow = local_rows(pparts, kernels.tensor_stats)
        loc.slots["param"] = _select(loc.prow, _merged(pparts))
    if plan.updates:
        prev = probe._prev[1]
        torch._foreach_sub_(prev, [p.local for p in pparts])  # -Δw, in place
        uparts = [Part(d, p.merged, p.contributes) for d, p in zip(prev, pparts, strict=True)]
        loc.urow = local_rows(uparts, kernels.tensor_stats)
        loc.slots["upd"] = _select(loc.urow, _merged(pparts))
    if plan.items:
        loc.hists, hstats, hcounts = _hist_partials(probe, plan)
        if plan.glob:
            loc.slots["hstats"], loc.slots["hcounts"] = hstats, hcounts
    return loc


def _norm_rows(tensors):
    from tbprobe.probe.pack import norm_rows

    return norm_rows(tensors)


def _select(rows: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return rows.index_select(0, index_on(idx, rows.device))


def _hist_partials(probe, plan: _Plan):
    """Local histograms of the rank-local items (``hist_bins`` linear bins, as on one
    device), and of the global ones their local ``(G, 10)`` stats rows and ``(G, bins)``
    float64 counts on :data:`GLOBAL_BINS` (identity rows and zeros where a part is empty or
    counted on another rank)."""
    items = plan.items
    scaled = [i for i, (_, p, unscale) in enumerate(items) if unscale]
    tensors = [p.local for _, p, _ in items]
    if scaled:
        for i, t in zip(scaled, probe.amp.unscaled([tensors[i] for i in scaled]), strict=True):
            tensors[i] = t
    out: list = [None] * len(items)
    local = [i for i, (_, p, _) in enumerate(items) if not p.merged]
    if local:
        hs = kernels.histogram_many([tensors[i] for i in local], bins=probe.cfg.hist_bins)
        for i, h in zip(local, hs, strict=True):
            out[i] = h
    glob = plan.glob
    if not glob:
        return out, None, None
    parts = [Part(tensors[i], True, items[i][1].contributes) for i in glob]
    live = [j for j, p in enumerate(parts) if p.live]
    stats = identity_rows(len(glob), plan.device)
    counts = torch.zeros(len(glob), global_bins(), dtype=torch.float64, device=plan.device)
    if live:
        hs = kernels.histogram_many([parts[j].local for j in live], bins=GLOBAL_BINS)
        sel = index_on(live, stats.device)
        stats.index_copy_(0, sel, torch.stack([h.stats.to(stats.device) for h in hs]))
        got = torch.stack([h.counts.to(counts.device) for h in hs]).to(torch.float64)
        counts.index_copy_(0, index_on(live, counts.device), got)
    return out, stats, counts


def pack_distributed(probe, st, pk, meta) -> None:
    """Fill the packer ``pk`` and ``meta`` with step ``st``'s global values (see the module
    docstring); the distributed counterpart of :func:`tbprobe.probe.pack.pack_step`'s body.
    Every rank must call it at the same step boundary. It raises only where its host
    bookkeeping does: a failure of this rank's reductions or of the write-back is recorded in
    ``probe.errors`` and flags the step as broken instead, after this rank took its part in
    the collective.

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

    rows = loc.rows
    if "ev" in merged:
        rows.copy_(merged["ev"])
    elif "nf" in merged:
        if st.full:
            rows[:, NF] = merged["nf"].reshape(-1, 3)
        else:
            rows.copy_(merged["nf"].reshape(-1, 3).sum(1))
    if rows is not None:
        evs = sorted(st.events.values(), key=lambda e: e.seq)
        pk.add("rows", rows)
        meta.order, meta.n_rows = loc.order, st.rows.n
        meta.events = [(e.seq, e.module, e.pass_, e.tensor) for e in evs]
        meta.event_rows = [e.rows for e in evs]
        meta.event_inputs = [e.inputs for e in evs]
    gidx, pidx = _merged(plan.gparts), _merged(plan.pparts)
    for key, dst, idx in (("grad", loc.grows, gidx), ("param", loc.prow, pidx)):
        if key in merged and idx:
            dst.index_copy_(0, index_on(idx, dst.device), merged[key])
    if "upd" in merged and pidx:
        loc.urow.index_copy_(0, index_on(pidx, loc.urow.device), merged["upd"])
    grows, grads = loc.grows, plan.grads
    if grows is not None:
        canon = {n: i for i, (n, _) in enumerate(grads)}
        seq = st.grad_seq
        named = sorted(grads, key=lambda ng: seq.get(ng[0], 1 << 60))
        pk.add("grad", _select(grows, [canon[n] for n, _ in named]))
        meta.grads = [(seq.get(n) or st.next_seq(), n) for n, _ in named]
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
