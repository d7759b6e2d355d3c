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
- all of the above go through **one** :class:`PackedGather` per step. On a histogram step the
  same gather also carries the stats of every tensor to histogram globally (DTensors, and
  activations with ``reduce_activations``); the edges are then built on the device from the
  merged finite min/max and the local bin counts are summed by a **second** gather, which only
  histogram steps pay (the edges must be agreed before anything can be binned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tbprobe import kernels
from tbprobe.kernels.reference import auto_range, bin_counts, linear_edges
from tbprobe.probe.batch import index_on
from tbprobe.probe.distributed import Packed, PackedGather, identity_rows, is_dtensor, local_part

NF = slice(6, 9)  # nan, pos_inf, neg_inf


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the default process group and the probe's distributed options."""

    rank: int
    world: int
    reduce_acts: bool
    per_rank: bool


@dataclass
class Part:
    """A tensor's local part: ``merged`` if its rows are merged over the ranks,
    ``contributes`` if this rank's part counts in the merge."""

    local: torch.Tensor
    merged: bool
    contributes: bool

    @property
    def live(self) -> bool:
        return self.contributes and self.local.numel() > 0


def part_of(t: torch.Tensor) -> Part:
    """The local part of a gradient or parameter: DTensors are merged, plain tensors are not.

    Example::

        part_of(param.grad).local  # (local rows of dim 0, ...) under FSDP2's Shard(0)
    """
    t = t.detach()  # to_local() of a parameter would record an autograd node
    if is_dtensor(t):
        local, contributes = local_part(t)
        return Part(local.detach(), True, contributes)
    return Part(t.detach(), False, True)


def local_rows(parts: list[Part], reduce) -> torch.Tensor:
    """``(len(parts), 10)`` rows: ``reduce`` of the live local parts, identity rows for the
    others (an empty shard must not read as a 0..1 range).

    Example::

        local_rows([part_of(p) for p in params], kernels.tensor_stats)  # (len(params), 10)
    """
    live = [i for i, p in enumerate(parts) if p.live]
    if len(live) == len(parts):
        return reduce([p.local for p in parts])
    dev = parts[0].local.device
    out = identity_rows(len(parts), dev)
    if live:
        out.index_copy_(0, index_on(live, dev), reduce([parts[i].local for i in live]))
    return out


class Gather:
    """Collects the slots of one packed all-gather; :meth:`run` returns ``{key: merged}``."""

    def __init__(self):
        self.layout, self.parts, self.keys = Packed(), [], []

    def rows(self, key, rows: torch.Tensor) -> None:
        self.layout.add_rows(rows.shape[0])
        self.parts.append(rows)
        self.keys.append(key)

    def sum(self, key, values: torch.Tensor) -> None:
        self.layout.add_sum(values.numel())
        self.parts.append(values)
        self.keys.append(key)

    def run(self) -> dict:
        if not self.parts:
            return {}
        g = PackedGather(self.layout, self.layout.pack(self.parts))
        return dict(zip(self.keys, self.layout.unpack(g.result()), strict=True))


def _merged_into(rows: torch.Tensor, parts: list[Part], key, gather: Gather, later: list):
    """Queue the merged parts' rows of ``rows`` in ``gather``; ``later`` gets the write-back."""
    idx = [i for i, p in enumerate(parts) if p.merged]
    if idx:
        sel = index_on(idx, rows.device)
        gather.rows(key, rows.index_select(0, sel))
        later.append((key, rows, sel))


def pack_distributed(probe, st, pk, meta) -> None:
    """Fill the packer ``pk`` and ``meta`` with step ``st``'s global values (see the module
    docstring); the distributed counterpart of :func:`tbprobe.probe.pack.pack_step`'s body.
    Every rank must call it at the same step boundary.

    Example::

        pack_distributed(probe, probe.state, Packer(), StepMeta(step=0, scheduled=True, full=True))
    """
    from tbprobe.probe.pack import _pack_hists, norm_rows

    cfg, ctx = probe.cfg, probe._dist
    st.flush(cfg.hist_bins)
    synced = st.checked or st.scheduled or st.hist  # the config's: the same on every rank
    gather, later = Gather(), []
    if (st.checked or st.scheduled) and st.rows.n:
        # One row per event (and per group of inputs), in an order every rank agrees on.
        st.events = dict(sorted(st.events.items()))
        st.pending_gout = dict(sorted(st.pending_gout.items()))
        st.rows.compact()
    rows, order = st.rows.rows()
    if rows is not None:
        if st.checked or st.scheduled:
            if ctx.reduce_acts and st.scheduled:
                gather.rows("ev", rows)
            else:
                zero = torch.zeros_like(rows)
                nf = rows[:, NF] if st.full else torch.stack([rows, zero, zero], 1)
                gather.sum("nf", nf)
        evs = sorted(st.events.values(), key=lambda e: e.seq)
        meta.order, meta.n_rows = order, st.rows.n
        meta.events = [(e.seq, e.module, e.pass_, e.tensor) for e in evs]
        meta.event_rows = [e.rows for e in evs]
        meta.event_inputs = [e.inputs for e in evs]
    seen = st.grads
    grads = [(n, seen.get(n, p.grad)) for n, p in probe._params]
    grads = [(n, g) for n, g in grads if g is not None]
    gparts = [part_of(g) for _, g in grads]
    grows = None
    if grads and synced:
        full = st.scheduled or probe._rows_always or st.hist  # a histogram needs min/max
        grows = probe.amp.unscale(local_rows(gparts, kernels.tensor_stats if full else norm_rows))
        _merged_into(grows, gparts, "grad", gather, later)
    trainable = [(n, p) for n, p in probe._params if p.requires_grad]
    pparts = [part_of(p) for _, p in trainable]
    if st.scheduled and "params" in cfg.track and trainable:
        prow = local_rows(pparts, kernels.tensor_stats)
        _merged_into(prow, pparts, "param", gather, later)
        pk.add("param", prow)
        meta.params = [n for n, _ in trainable]
        prev = probe._prev
        if prev is not None and prev[0] == meta.params:
            torch._foreach_sub_(prev[1], [p.local for p in pparts])  # -Δw, in place
            uparts = [
                Part(d, p.merged, p.contributes) for d, p in zip(prev[1], pparts, strict=True)
            ]
            urow = local_rows(uparts, kernels.tensor_stats)
            _merged_into(urow, uparts, "upd", gather, later)
            pk.add("upd", urow)
            meta.updates = list(prev[0])
    items = []  # (tag, Part) histogrammed over all ranks
    if st.hist:
        gl = probe.amp.unscaled([p.local for p in gparts])
        items += [(f"grad_hist/{n}", Part(t, p.merged, p.contributes))
                  for (n, _), t, p in zip(grads, gl, gparts, strict=True)]  # fmt: skip
        items += [(f"param_hist/{n}", p) for (n, _), p in zip(trainable, pparts, strict=True)]
        items += [(f"act_hist/{n}", Part(t, True, True)) for n, t in sorted(st.act_keep.items())]
        glob = [(tag, p) for tag, p in items if p.merged]
        if glob:
            gather.rows("hrange", local_rows([p for _, p in glob], kernels.tensor_stats))
    merged = gather.run()
    if "ev" in merged:
        rows.copy_(merged["ev"])
    elif "nf" in merged:
        if st.full:
            rows[:, NF] = merged["nf"].reshape(-1, 3)
        else:
            rows.copy_(merged["nf"].reshape(-1, 3).sum(1))
    for key, dst, sel in later:
        dst.index_copy_(0, sel, merged[key])
    if rows is not None:
        pk.add("rows", rows)
    if grows is not None:
        canon = {n: i for i, (n, _) in enumerate(grads)}
        seq = st.grad_seq
        named = sorted(grads, key=lambda ng: seq.get(ng[0], 1 << 60))
        perm = [canon[n] for n, _ in named]
        pk.add("grad", grows.index_select(0, index_on(perm, grows.device)))
        meta.grads = [(seq.get(n) or st.next_seq(), n) for n, _ in named]
    hists = []
    if st.hist:
        hists = _histograms(probe, items, merged.get("hrange"), meta)
    for name, h in st.act_hists.items():
        if h is not None:
            meta.hists.append(f"act_hist/{name}")
            hists.append(h)
    _pack_hists(pk, hists)


def _histograms(probe, items, ranges, meta) -> list:
    """Histograms of ``items``: local ones as on one device; merged ones binned on edges from
    the merged finite min/max (``ranges``), their counts summed by a second all-gather."""
    bins = probe.cfg.hist_bins
    out: list = [None] * len(items)
    local = [i for i, (_, p) in enumerate(items) if not p.merged]
    if local:
        hs = kernels.histogram_many([items[i][1].local for i in local], bins=bins)
        for i, h in zip(local, hs, strict=True):
            out[i] = h
    glob = [i for i, (_, p) in enumerate(items) if p.merged]
    if glob:
        edges, counts = [], []
        for j, i in enumerate(glob):
            row, part = ranges[j], items[i][1]
            e = linear_edges(*auto_range(row, None), bins)
            edges.append(e)
            if part.live:
                counts.append(bin_counts(part.local, e).to(torch.float64))
            else:
                counts.append(torch.zeros(bins, dtype=torch.float64, device=row.device))
        second = Gather()  # the edges had to be agreed first: a second, histogram-step gather
        second.sum("counts", torch.stack(counts))
        total = second.run()["counts"].reshape(len(glob), bins)
        for j, i in enumerate(glob):
            out[i] = kernels.Histogram(total[j], edges[j], ranges[j])
    meta.hists.extend(tag for tag, _ in items)
    return out
