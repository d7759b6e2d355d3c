"""Packing a finished step: gradient, parameter and update statistics taken at the step
boundary, histograms and thumbnails, all into one device buffer (:mod:`.stream`)."""

from __future__ import annotations

import torch

from tbprobe import kernels
from tbprobe.kernels import host_stats
from tbprobe.probe.batch import probe_stats
from tbprobe.probe.collect import StepState
from tbprobe.probe.emit import StepMeta
from tbprobe.probe.stream import Packer


def pack_step(probe, st: StepState):
    """Pack the results of step ``st`` into one device buffer; returns its ``Pending``."""
    pk = Packer()
    meta = StepMeta(step=st.step, scheduled=st.scheduled, full=st.full)
    meta.snap_modules = st.snap or frozenset()
    meta.volume = st.volume
    meta.param_faults = tuple(st.param_faults)
    if probe.optimizer is not None and (st.checked or st.scheduled):
        meta.lr_groups = lr_groups(probe)
    if probe._dist is not None:  # first: a later failure must not keep a rank from the gather
        from tbprobe.probe.dist_pack import pack_distributed

        pack_distributed(probe, st, pk, meta)
    else:
        _pack_local(probe, st, pk, meta)
    skip = probe.amp.found_inf()
    if skip is not None:
        pk.add("skip", skip)
        pk.add("scale", probe.amp.loss_scale().double())
    for name, (img, shape, kind) in st.thumbs.items():
        pk.add(("t", len(meta.thumbs)), img)
        meta.thumbs.append((name, shape, kind))
    return pk.finish(st.step, meta)


def step_grads(probe, st: StepState) -> list[tuple[str, torch.Tensor]]:
    """``[(name, gradient)]`` of step ``st``, in the order their hooks first fired: the
    parameters whose post-accumulate-grad hook fired in the step (a ``.grad`` left from an
    earlier step, by ``zero_grad(set_to_none=False)`` on a parameter this step did not
    reach, is not this step's gradient); when no hook fired at all (gradients assigned by
    hand), every ``.grad`` there is."""
    if st.grads:
        return [(n, g) for n, g in st.grads.items() if g is not None]
    return [(n, p.grad) for n, p in probe._params if p.grad is not None]


def reduce_grads(probe, st: StepState) -> None:
    """Reduce the gradients of step ``st`` now (at the end of a backward pass: see
    ``hooks.HookSet._grads_done``), unscaled, with their histograms on a histogram step;
    :func:`_pack_local` packs these unless the gradients changed hands since."""
    if probe._dist is not None:
        from tbprobe.probe.dist_pack import reduce_grads_distributed

        reduce_grads_distributed(probe, st)
        return
    if not (st.checked or st.scheduled or st.hist or st.snap):
        return
    grads = step_grads(probe, st)
    if grads:
        st.grads_taken = _grad_results(probe, st, grads)


def _grad_results(probe, st: StepState, grads: list) -> tuple:
    """``(names, rows, histograms or None)`` of ``grads`` ``[(name, gradient)]``: unscaled
    stats rows (norms and non-finite counts), and their histograms on a histogram step (on a
    snapshot step, of the snapshot modules' parameters only; None for the others)."""
    gs = _stat_views([g.detach() for _, g in grads])
    rows = probe.amp.unscale(probe_stats(gs, extremes=False))
    hists = None
    if st.hist:
        hists = kernels.histogram_many(probe.amp.unscaled(gs), bins=probe.cfg.hist_bins)
    elif st.snap:
        at = [i for i, (n, _) in enumerate(grads) if in_modules(n, st.snap)]
        if at:
            hists = [None] * len(grads)
            some = kernels.histogram_many(
                probe.amp.unscaled([gs[i] for i in at]), bins=probe.cfg.hist_bins
            )
            for i, h in zip(at, some, strict=True):
                hists[i] = h
    return [n for n, _ in grads], rows, hists


def in_modules(param: str, modules: frozenset) -> bool:
    """Whether parameter ``param`` (a dotted name) belongs to one of ``modules`` or to a
    submodule of one: a snapshot's parameters.

    Example::

        in_modules("layers.0.attn.weight", frozenset({"layers.0"}))  # True
    """
    parts = param.split(".")
    return any(".".join(parts[:k]) in modules for k in range(len(parts)))


def _pack_local(probe, st: StepState, pk: Packer, meta: StepMeta) -> None:
    """The step's rows, gradient/parameter statistics and histograms, as on one device."""
    cfg = probe.cfg
    st.flush(cfg.hist_bins)
    grads = step_grads(probe, st) if st.checked or st.scheduled or st.hist or st.snap else []
    taken = None
    if grads:
        taken = st.grads_taken
        if taken is None or taken[0] != [n for n, _ in grads]:
            # no backward pass reduced them (gradients set by hand), or hooks fired after
            # the last one's end: reduce them now
            taken = _grad_results(probe, st, grads)
        order = st.grad_seq if st.events else _backward_order(probe, st)
        meta.grads = [(order.get(n) or st.next_seq(), n) for n, _ in grads]
        pk.add("grad", taken[1])
    ps, upd = _params_and_updates(probe, st, meta)
    if ps:  # one call: norms of both (on CUDA one launch per dtype)
        rows = probe_stats(ps + upd, extremes=False)
        pk.add("param", rows[: len(ps)])
        if upd:
            pk.add("upd", rows[len(ps) :])
    if not _clean_on_host(st, meta, None if taken is None else taken[1]):
        pack_events(st, pk, meta)
    hists: list = []
    if st.hist or st.snap:  # a snapshot: its modules' parameters' histograms
        if taken is not None and taken[2] is not None:  # binned with the gradients' rows
            for n, h in zip(taken[0], taken[2], strict=True):
                if h is not None:
                    hists.append(h)
                    meta.hists.append(f"grad_hist/{n}")
        trainable = [
            (n, p.detach())
            for n, p in probe._params
            if p.requires_grad and (st.hist or in_modules(n, st.snap))
        ]
        if trainable:
            names, ts = zip(*trainable, strict=True)
            _hists(probe, meta, hists, "param_hist", names, _stat_views(list(ts)))
    for name, h in st.act_hists.items():
        if h is not None:
            meta.hists.append(f"act_hist/{name}")
            hists.append(h)
    _pack_hists(pk, hists)


def _clean_on_host(st: StepState, meta: StepMeta, grad_rows) -> bool:
    """True for a checked step (counts only) whose every hooked tensor was reduced on the
    host, with no NaN/±Inf there nor in the gradients (``grad_rows``): its events would only
    say "0", and the record of such a step has none (``emit._clean_check``), so they are not
    packed."""
    if st.scheduled or st.full or not meta.grads or not st.rows.all_host() or st.rows.bad:
        return False
    if grad_rows is None or grad_rows.device.type != "cpu":
        return False
    return not host_stats.any_nonfinite(grad_rows)


def _backward_order(probe, st: StepState) -> dict:
    """Gradient ``seq`` numbers for a step whose hooks recorded no module event (a forward
    compiled by ``torch.compile``: its hooks are not run): a compiled backward accumulates
    the gradients in its graph's output order, not in backward order, so they are
    numbered in reverse parameter order, which a backward pass roughly follows; the first
    non-finite gradient is then the one nearest the output, where a NaN made in the
    backward pass starts."""
    names = [n for n, _ in probe._params]
    return {n: st.next_seq() for n in reversed(names)}


def pack_events(st: StepState, pk: Packer, meta: StepMeta) -> None:
    """This rank's own rows of the step and its events (in ``seq`` order), as on one device."""
    rows, order = st.rows.rows()
    if rows is None:
        return
    evs = sorted(st.events.values(), key=lambda e: e.seq)
    pk.add("rows", rows)
    meta.order, meta.n_rows = order, st.rows.n
    meta.events = [(e.seq, e.module, e.pass_, e.tensor) for e in evs]
    meta.event_rows = [e.rows for e in evs]
    meta.event_inputs = [e.inputs for e in evs]
    meta.event_calls = [e.calls for e in evs]


def _pack_hists(pk: Packer, hists: list) -> None:
    """Three stacked tensors, not three per histogram (all have ``hist_bins`` bins)."""
    if hists:
        dev = hists[0].counts.device
        pk.add("hcounts", torch.stack([h.counts.to(dev) for h in hists]))
        pk.add("hedges", torch.stack([h.edges.to(dev) for h in hists]))
        pk.add("hstats", torch.stack([h.stats.to(dev) for h in hists]))


def _params_and_updates(probe, st: StepState, meta: StepMeta) -> tuple[list, list]:
    """The trainable parameters and their updates -Δw (in place in the pre-step copies) on a
    scheduled step that tracks them; their names go into ``meta``."""
    if not (st.scheduled and "params" in probe.cfg.track):
        return [], []
    named = [(n, p.detach()) for n, p in probe._params if p.requires_grad]
    if not named:
        return [], []
    meta.params = [n for n, _ in named]
    ps = [p for _, p in named]
    prev = probe._prev
    if prev is None:
        return _stat_views(ps), []
    cur = ps
    if prev[0] != meta.params:  # the probed optimizer's own parameters (or a changed model)
        at = {n: i for i, n in enumerate(meta.params)}
        if any(n not in at for n in prev[0]):
            return _stat_views(ps), []
        cur = [ps[at[n]] for n in prev[0]]
    torch._foreach_sub_(prev[1], cur)  # -Δw, in place
    meta.updates = list(prev[0])
    if probe.optimizer is not None:  # pack_step read the groups' rates first
        meta.lrs = {n: lr for lr, names, _ in meta.lr_groups for n in names}
    return _stat_views(ps), _stat_views(list(prev[1]))


def lr_groups(probe) -> tuple:
    """``((lr, names, peak), ...)``: the learning rate of each group of the probe's optimizer
    that holds probed parameters (their names, a tuple) and a host number (or CPU tensor) as
    ``lr``, and the peak its schedule set out from (the larger of a torch scheduler's
    ``initial_lr`` and OneCycleLR's ``max_lr``; 0.0 without): a run resumed late in a cycle
    knows the rate a warm restart will return to. The names per group are worked out once
    (again when the groups change)."""
    groups = probe.optimizer.param_groups
    key = [id(g["params"]) for g in groups] + [len(g["params"]) for g in groups]
    cached = probe._lr_names
    if cached is None or cached[0] != key:
        at = {id(p): n for n, p in probe._params}
        names = [tuple(at[id(p)] for p in g["params"] if id(p) in at) for g in groups]
        cached = probe._lr_names = (key, names)
    out = []
    for group, names in zip(groups, cached[1], strict=True):
        lr = _host_lr(group.get("lr"))
        if names and lr is not None:
            hints = (_host_lr(group.get(k)) for k in ("initial_lr", "max_lr"))
            out.append((lr, names, max((h for h in hints if h is not None), default=0.0)))
    return tuple(out)


def _host_lr(lr) -> float | None:
    """A group's ``lr`` as a float; None for a CUDA tensor (no sync) or a non-number."""
    if isinstance(lr, torch.Tensor):
        if lr.device.type != "cpu" or lr.numel() != 1:
            return None
        return float(lr)  # sync-ok: a CPU tensor
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    return None


def _stat_views(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """What the probe reduces for parameters, gradients and updates ``ts`` (all dense, real
    tensors, most often: returned as they are). A sparse tensor (e.g. the gradient of
    ``nn.Embedding(sparse=True)``) gives its stored values, coalesced so that each element
    counts once: their norm is the tensor's, and its histogram is of those values. A complex
    tensor gives its real view (real and imaginary parts): the same norm."""
    for i, t in enumerate(ts):
        if t.layout is not torch.strided or t.is_complex():
            ts = list(ts)
            ts[i:] = [_stat_view(u) for u in ts[i:]]
            break
    return ts


def _stat_view(t: torch.Tensor) -> torch.Tensor:
    if t.layout is torch.sparse_coo:
        # Coalesced, or a repeated index would count twice in the norm; on CUDA that counts
        # the unique indices on the host: a sync, for sparse gradients only.
        t = t.coalesce().values()  # sync-ok: sparse CUDA gradients (see above)
    elif t.layout is not torch.strided:  # compressed sparse layouts, nested tensors
        t = t.values()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    return t


def _hists(probe, meta, out, family, names, tensors) -> None:
    out.extend(kernels.histogram_many(list(tensors), bins=probe.cfg.hist_bins))
    meta.hists.extend(f"{family}/{name}" for name in names)
