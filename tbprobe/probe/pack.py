"""Packing a finished step: gradient, parameter and update statistics taken at the step
boundary, histograms and thumbnails, all into one device buffer (:mod:`.stream`)."""

from __future__ import annotations

import torch

from tbprobe import kernels
from tbprobe.probe.collect import StepState
from tbprobe.probe.emit import StepMeta
from tbprobe.probe.stream import Packer


def pack_step(probe, st: StepState):
    """Pack the results of step ``st`` into one device buffer; returns its ``Pending``."""
    cfg, pk = probe.cfg, Packer()
    meta = StepMeta(step=st.step, scheduled=st.scheduled, full=st.full)
    meta.snap_modules = st.snap or frozenset()
    evs = sorted(st.events.values(), key=lambda e: e.seq)
    if evs:
        pk.add("ev", torch.stack([e.value for e in evs]))
        meta.events = [(e.seq, e.module, e.pass_, e.tensor) for e in evs]
        meta.event_inputs = [i for i, e in enumerate(evs) if e.inputs is not None]
        if meta.event_inputs:
            pk.add("evin", torch.stack([evs[i].inputs for i in meta.event_inputs]))
    seen = st.grads
    grads = [(n, seen.get(n, p.grad)) for n, p in probe._params]
    grads = [(n, g) for n, g in grads if g is not None]
    if grads and (st.checked or st.scheduled or st.hist):
        order = st.grad_seq
        grads.sort(key=lambda ng: order.get(ng[0], 1 << 60))
        rows = probe.amp.unscale(kernels.tensor_stats([g.detach() for _, g in grads]))
        pk.add("grad", rows)
        meta.grads = [(order.get(n) or st.next_seq(), n) for n, _ in grads]
    if st.scheduled and "params" in cfg.track:
        _pack_params(probe, pk, meta)
    if st.hist:
        if grads:
            gs = [g.detach() for _, g in grads]
            _pack_hists(probe, pk, meta, "grad_hist", [n for n, _ in grads], gs, unscale=True)
        trainable = [(n, p.detach()) for n, p in probe._params if p.requires_grad]
        if trainable:
            names, ts = zip(*trainable, strict=True)
            _pack_hists(probe, pk, meta, "param_hist", names, ts)
    for name, h in st.act_hists.items():
        _add_hist(pk, meta, f"act_hist/{name}", h)
    for name, (img, shape, kind) in st.thumbs.items():
        pk.add(("t", len(meta.thumbs)), img)
        meta.thumbs.append((name, shape, kind))
    return pk.finish(st.step, meta)


def _pack_params(probe, pk: Packer, meta: StepMeta) -> None:
    named = [(n, p.detach()) for n, p in probe._params if p.requires_grad]
    if not named:
        return
    pk.add("param", kernels.tensor_stats([p for _, p in named]))
    meta.params = [n for n, _ in named]
    prev = probe._prev
    if prev is not None and prev[0] == meta.params:
        torch._foreach_sub_(prev[1], [p for _, p in named])  # -Δw, in place
        pk.add("upd", kernels.tensor_stats(prev[1]))
        meta.updates = list(prev[0])


def _pack_hists(probe, pk, meta, family, names, tensors, unscale=False) -> None:
    if unscale:
        tensors = probe.amp.unscaled(tensors)
    hs = kernels.histogram_many(list(tensors), bins=probe.cfg.hist_bins)
    for name, h in zip(names, hs, strict=True):
        _add_hist(pk, meta, f"{family}/{name}", h)


def _add_hist(pk: Packer, meta: StepMeta, tag: str, h) -> None:
    dev = h.counts.device
    parts = [h.counts.double(), h.edges.to(dev, torch.float64), h.stats.to(dev)]
    pk.add(("h", len(meta.hists)), torch.cat(parts))
    meta.hists.append(tag)
