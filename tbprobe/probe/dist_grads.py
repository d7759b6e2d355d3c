"""A distributed step's gradients, reduced at the end of the backward pass.

As on one device (``pack.reduce_grads``), the gradients are read once the last backward pass
of the step has ended (an autograd final callback, queued behind DistributedDataParallel's
all-reduce and FSDP2's reduce-scatter), before anything between the backward pass and the
optimizer step changes them in place: ``clip_grad_norm_``, ``zero_grad``. Their norms and,
on a histogram step, their histograms are of the same gradients. This rank's partials only:
the step boundary (:mod:`tbprobe.probe.dist_pack`) merges them over the ranks in its one
gather, so nothing here calls a collective, and nothing syncs with the host.
"""

from __future__ import annotations

import torch

from tbprobe import kernels
from tbprobe.probe.batch import probe_stats
from tbprobe.probe.dist_slots import GLOBAL_BINS, Part, local_rows, part_of
from tbprobe.probe.distributed import is_dtensor

__all__ = ["grad_parts", "held_grads", "norm_rows", "reduce_grads_distributed", "taken_for"]


def norm_rows(tensors) -> torch.Tensor:
    """``(len(tensors), 10)`` stats rows without extremes (norms and non-finite counts)."""
    return probe_stats(tensors, extremes=False)


def grad_parts(grads: list, gmerged: list[bool], device) -> list[Part]:
    """The local parts of the gradients (an empty one for a gradient this rank lacks)."""
    empty = torch.empty(0, device=device)
    parts = []
    for gr, merged in zip(grads, gmerged, strict=True):
        part = Part(empty, merged, False) if gr is None else part_of(gr)
        parts.append(Part(part.local, merged, part.contributes))
    return parts


def held_grads(named: list, st) -> list:
    """``[(name, gradient or None)]`` of parameters ``named``: each ``.grad`` as it is now,
    else the tensor its hook saw (``zero_grad(set_to_none=True)`` before a manual
    ``probe.step()``). Not the hook's tensor first: DDP with ``gradient_as_bucket_view=True``
    swaps a fresh gradient for a view into its all-reduced bucket after the hooks ran."""
    seen = st.grads
    return [(n, seen.get(n) if p.grad is None else p.grad) for n, p in named]


def _ids(grads: list) -> list:
    return [None if g is None else id(g) for g in grads]


def taken_for(st, grads: list) -> tuple | None:
    """``(ids, rows, histograms or None)`` that :func:`reduce_grads_distributed` took of
    ``grads`` (the probe's parameters' gradients, None where absent), or None when the
    gradients changed hands since (FSDP2 may assign its sharded gradients later) or no
    backward pass ended (gradients set by hand): then the step boundary reduces them."""
    taken = st.grads_taken
    return taken if taken is not None and taken[0] == _ids(grads) else None


def reduce_grads_distributed(probe, st) -> None:
    """``pack.reduce_grads`` on a distributed probe: this rank's unscaled gradient rows and,
    on a histogram step, their histograms (:func:`_grad_hists`), keyed on the gradient
    tensors they read (:func:`held_grads`). With gradient accumulation, the last backward
    pass's count."""
    if not (st.checked or st.scheduled or st.hist) or not probe._params:
        return
    grads = [g for _, g in held_grads(probe._params, st)]
    gmerged = [p.requires_grad and is_dtensor(p) for _, p in probe._params]
    parts = grad_parts(grads, gmerged, probe._params[0][1].device)
    rows = probe.amp.unscale(local_rows(parts, norm_rows))
    hists = _grad_hists(probe, grads, parts) if st.hist else None
    st.grads_taken = (_ids(grads), rows, hists)


def _grad_hists(probe, grads: list, parts: list[Part]) -> list:
    """Per gradient, its unscaled histogram as the step boundary would bin it: ``hist_bins``
    linear bins of a rank-local one, :data:`GLOBAL_BINS` of this rank's live part of a
    merged one; None where it has neither (no gradient, an empty shard, a replica counted on
    another rank)."""
    held = zip(grads, parts, strict=True)
    local = [i for i, (g, p) in enumerate(held) if not p.merged and g is not None]
    glob = [i for i, p in enumerate(parts) if p.merged and p.live]
    out: list = [None] * len(parts)
    if not local and not glob:
        return out
    ts = probe.amp.unscaled([parts[i].local for i in local + glob])
    for idx, bins, tensors in (
        (local, probe.cfg.hist_bins, ts[: len(local)]),
        (glob, GLOBAL_BINS, ts[len(local) :]),
    ):
        if idx:
            for i, h in zip(idx, kernels.histogram_many(tensors, bins=bins), strict=True):
                out[i] = h
    return out
