"""Batched reductions of one step: hooks queue tensors, one multi-tensor call reduces them.

A hook does not reduce the tensor it sees: :meth:`Rows.add` queues it and returns a *row id*
at once. :meth:`Rows.flush` reduces the whole queue with one ``kernels.tensor_stats`` call
(one launch per dtype on CUDA) at phase boundaries (end of the forward, end of the backward,
the step boundary) and whenever the queue holds more than ``MAX_TENSORS`` tensors or
``MAX_BYTES`` bytes, so that no tensor is kept alive much longer than it would be anyway.
Rows stay on the device; the host merges the rows of one event after the packed step has
landed (:mod:`tbprobe.probe.emit`). A step with very many rows (long loops of forwards
inside one optimizer step) is compacted on the device to one row per group, so memory stays
bounded (at a hook's start, where no row id is in flight).

A tensor modified in place between its hook and the flush (``nn.ReLU(inplace=True)`` after
a hooked conv) would be reduced after the modification: its version counter says so, and
the key it was queued under is reported to ``on_changed`` so that later steps reduce it at
once (``eager``).

Host (CPU) tensors are not queued: each is reduced in its hook by host code
(:func:`on_host`, ``host_stats.lean_row``/``nonfinite_count``), so it is never kept alive
for a batch (there are no launches to save on the CPU, while memory held to the phase
boundary costs fresh pages every step), and an in-place change after the hook cannot reach
it. Their rows join the device rows at the next flush.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from tbprobe import kernels
from tbprobe.kernels import host_stats
from tbprobe.kernels.dispatch import use_triton

MAX_TENSORS = 128  # queued tensors before a flush
MAX_BYTES = 256 << 20  # queued bytes before a flush
MAX_ROWS = 8192  # rows of one step before they are compacted to one per group
NF = slice(6, 9)  # nan, pos_inf, neg_inf in kernels.STAT_NAMES
_CPU = torch.empty(0)  # asks on_host about the CPU without an op in the step
_consts: dict = {}


def _const(device: torch.device):
    """Column masks (min-merged, max-merged) and the identity row, built on ``device`` once
    (no host-to-device copy)."""
    c = _consts.get(device)
    if c is None:
        cols = torch.arange(10, device=device)
        ident = torch.zeros(10, dtype=torch.float64, device=device)
        ident[3] = math.inf  # min
        ident[4] = -math.inf  # max (abs_max's identity is 0)
        c = _consts[device] = (cols == 3, (cols == 4) | (cols == 5), ident)
    return c


def nonfinite_counts(tensors: list[torch.Tensor]) -> torch.Tensor:
    """float64 ``(len(tensors),)`` counts of NaN and ±Inf elements, on the tensors' device:
    the stats kernel on CUDA (one launch per dtype, no sync), host code on the CPU.

    Example::

        nonfinite_counts([torch.tensor([1.0, math.nan]), torch.ones(3)])  # tensor([1., 0.])
    """
    if tensors[0].is_cuda:
        return kernels.tensor_stats(tensors)[:, NF].sum(1)
    if tensors[0].device.type == "cpu":
        return host_stats.nonfinite_counts(tensors)
    counts = [torch.count_nonzero(t - t) for t in tensors]  # other devices: x - x is NaN
    return torch.stack(counts).to(torch.float64)  # exactly where x is not finite


def probe_stats(tensors: list[torch.Tensor], extremes: bool = True) -> torch.Tensor:
    """float64 ``(len(tensors), 10)`` stats rows of the probe's tensors, without a sync.

    Every column where the stats kernel runs (CUDA: the whole row costs one read). On the
    CPU, where each column is a pass of its own, only what the probe reads
    (``host_stats.lean_stats``): ``count``, ``sum_sq``, the non-finite counts and, with
    ``extremes`` (forward outputs: ``act_absmax``), ``min``/``max``/``abs_max``; the other
    columns are NaN.

    Example::

        probe_stats([torch.ones(4)], extremes=False)[0, 2]  # sum of squares: 4.0
    """
    if on_host(tensors[0]):
        return host_stats.lean_stats(tensors, extremes)
    return kernels.tensor_stats(tensors)


def on_host(t: torch.Tensor) -> bool:
    """True for a tensor the probe reduces with host code, at once (a CPU tensor, unless
    ``TBPROBE_KERNELS=triton`` forces the kernels)."""
    return t.device.type == "cpu" and not use_triton(t.device)


def index_on(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 index tensor on ``device`` from a host list, copied without a sync."""
    idx = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


class Rows:
    """Rows of one step: ``(n, 10)`` stats rows when ``full``, else ``(n,)`` non-finite
    counts; row ids are handed out at :meth:`add` time."""

    __slots__ = (
        "_bytes",
        "_ext",
        "_host",
        "_host_rids",
        "bad",
        "cpu_host",
        "_keys",
        "_nf",
        "_nf_rids",
        "_queue",
        "_rids",
        "_versions",
        "blocks",
        "compactions",
        "full",
        "n",
        "on_changed",
        "order",
        "_owner",
        "watch",
    )

    def __init__(self, full: bool, on_changed=None, owner=None):
        self.full = full
        self.on_changed = on_changed  # called with the key of a tensor changed in place
        # The object with .groups() -> (merge groups, nf groups), for compaction. Held weakly:
        # the StepState owns its Rows, and a reference cycle would leave every step's state
        # (hundreds of objects) to the cyclic garbage collector instead of freeing it at once.
        self._owner = None if owner is None else weakref.ref(owner)
        self.blocks: list[torch.Tensor] = []  # reduced rows, in ``order``
        self.order: list[int] = []  # the row id of each reduced row
        self.n = 0  # row ids handed out
        self.compactions = 0
        self.watch: list = []  # (tensor, version, key) reduced at once, checked at the flush
        self._queue: list[torch.Tensor] = []
        self._rids: list[int] = []
        self._versions: list[int] = []
        self._keys: list = []
        self._ext: list[bool] = []  # forward outputs: also min/max/abs_max (see probe_stats)
        self._host: list = []  # rows (or counts) of host tensors, reduced when added
        self._host_rids: list[int] = []
        self.bad: set[int] = set()  # row ids of host tensors found non-finite when added
        self.cpu_host = on_host(_CPU)  # once per step: whether CPU tensors take host code
        self._bytes = 0
        self._nf: list[torch.Tensor] = []  # queued for their non-finite count only
        self._nf_rids: list[int] = []

    @property
    def owner(self):
        return None if self._owner is None else self._owner()

    def host(self, t: torch.Tensor) -> bool:
        """:func:`on_host` of ``t``, with the backend choice made once for the step."""
        return self.cpu_host and t.is_cpu

    def all_host(self) -> bool:
        """Every row so far came from host code (no tensor queued for a device reduction):
        then ``bad`` holds every row with a NaN/±Inf."""
        if not self.cpu_host or self._queue or self._nf:
            return False
        return all(b.device.type == "cpu" for b in self.blocks)

    def reduce(self, tensors: list[torch.Tensor], extremes: bool = True) -> torch.Tensor:
        if self.full:
            return probe_stats(tensors, extremes)
        return nonfinite_counts(tensors)

    def add_nf(self, t: torch.Tensor) -> int:
        """Queue ``t`` for its non-finite count only (a row holding just that count, in the
        ``nan`` column, when ``full``); returns its row id."""
        if self.host(t):
            rid = self.n
            self.n += 1
            count = host_stats.nonfinite_count(t)
            if count > 0:
                self.bad.add(rid)
            self._host.append(_count_row(count) if self.full else count)
            self._host_rids.append(rid)
            return rid
        if not self.full or t.is_cuda:  # on CUDA one stats launch per dtype is cheaper
            return self.add(t)
        rid = self.n
        self.n += 1
        self._nf.append(t.detach())
        self._nf_rids.append(rid)
        self._bytes += t.numel() * t.element_size()
        if len(self._queue) + len(self._nf) >= MAX_TENSORS or self._bytes >= MAX_BYTES:
            self.flush()
        return rid

    def add(
        self,
        t: torch.Tensor,
        key=None,
        eager: bool = False,
        watch: bool = False,
        extremes: bool = True,
    ) -> int:
        """Queue ``t`` for reduction (``eager``: reduce it now); returns its row id.
        ``watch``: also check at the next flush that ``t`` was not changed in place.
        ``extremes``: its min/max/abs_max are read (see :func:`probe_stats`)."""
        t = t.detach()
        rid = self.n
        self.n += 1
        if self.host(t):  # reduced now: the tensor is not kept alive (see host_stats.lean_row)
            if self.full:
                row = host_stats.lean_row(t, extremes)
                bad = row[6] + row[7] + row[8] > 0
            else:
                row = host_stats.nonfinite_count(t)
                bad = row > 0
            if bad:
                self.bad.add(rid)
            self._host.append(row)
            self._host_rids.append(rid)
            if watch:
                self.watch.append((t, version(t), key))
            return rid
        if eager:
            self.blocks.append(self.reduce([t], extremes))
            self.order.append(rid)
            if watch:
                self.watch.append((t, version(t), key))
            return rid
        self._queue.append(t)
        self._rids.append(rid)
        self._versions.append(version(t))
        self._keys.append(key)
        self._ext.append(extremes)
        self._bytes += t.numel() * t.element_size()
        if len(self._queue) + len(self._nf) >= MAX_TENSORS or self._bytes >= MAX_BYTES:
            self.flush()
        return rid

    def check_watch(self) -> None:
        """Report the watched tensors changed in place since they were reduced (call at a
        phase boundary: by then the op that follows a module has run)."""
        watch, self.watch = self.watch, []
        for t, v, k in watch:
            if k is not None and version(t) != v:
                self.on_changed(k)

    def flush(self) -> None:
        """Reduce every queued tensor in one call; report tensors changed since queued.
        The queue is emptied first, so a failing reduction is not retried by every hook
        (its rows are missing and read as zeros)."""
        nf, nf_rids = self._nf, self._nf_rids
        q, rids, versions, keys = self._queue, self._rids, self._versions, self._keys
        ext = self._ext
        if self._host:
            # numpy builds a float64 array from Python floats about twice as fast as torch
            self.blocks.append(torch.from_numpy(np.array(self._host, dtype=np.float64)))
            self.order.extend(self._host_rids)
            self._host, self._host_rids = [], []
        self._nf, self._nf_rids, self._bytes = [], [], 0
        self._queue, self._rids, self._versions, self._keys, self._ext = [], [], [], [], []
        if nf:
            counts = nonfinite_counts(nf)
            self.blocks.append(_count_rows(counts, counts.device))
            self.order.extend(nf_rids)
        if not q:
            return
        if not self.full or all(ext) or q[0].is_cuda:  # one call (CUDA: every column anyway)
            self.blocks.append(self.reduce(q))
            self.order.extend(rids)
        else:
            for want in (True, False):
                idx = [i for i, e in enumerate(ext) if e is want]
                if idx:
                    self.blocks.append(self.reduce([q[i] for i in idx], want))
                    self.order.extend(rids[i] for i in idx)
        if self.on_changed is not None:
            for t, v, k in zip(q, versions, keys, strict=True):
                if k is not None and version(t) != v:
                    self.on_changed(k)

    def maybe_compact(self) -> None:
        """Compact when there are too many rows; only where no row id is held in flight."""
        queued = len(self._queue) + len(self._nf) + len(self._host)
        if len(self.order) + queued > MAX_ROWS and self.owner is not None:
            self.compact()

    def rows(self) -> tuple[torch.Tensor | None, list[int]]:
        """All rows (after a flush), concatenated, and the row id of each."""
        self.flush()
        if not self.blocks:
            return None, []
        if len(self.blocks) > 1:
            dev = next((b.device for b in self.blocks if b.device.type != "cpu"), None)
            if dev is not None:  # host rows of CPU modules beside device ones
                self.blocks = [b if b.device == dev else _to_device(b, dev) for b in self.blocks]
            self.blocks = [torch.cat(self.blocks)]
        return self.blocks[0], self.order

    # ---------------------------------------------------------------- compaction
    def compact(self) -> None:
        """Replace every row by one row per group of the owner: merged rows of each
        ``merge`` group, a non-finite count of each ``nf`` group (row ids are renumbered)."""
        owner = self.owner
        merge, nf = owner.groups()
        rows, order = self.rows()
        if rows is None:
            return
        pos = {rid: i for i, rid in enumerate(order)}
        dev = rows.device
        out = []
        if merge:
            src = [pos[r] for g in merge for r in g]
            grp = [i for i, g in enumerate(merge) for _ in g]
            out.append(self._merge(rows, src, grp, len(merge), dev))
        if nf:
            src = [pos[r] for g in nf for r in g]
            grp = [i for i, g in enumerate(nf) for _ in g]
            out.append(self._nf_rows(rows, src, grp, len(nf), dev))
        self.blocks = [torch.cat(out)] if out else []
        self.bad = set()
        self.n = len(merge) + len(nf)
        self.order = list(range(self.n))
        for i, g in enumerate(merge):
            g[:] = [i]
        for i, g in enumerate(nf, start=len(merge)):
            g[:] = [i]
        self.compactions += 1
        owner.compacted()

    def _merge(self, rows, src, grp, n, dev) -> torch.Tensor:
        sel = rows.index_select(0, index_on(src, dev))
        g = index_on(grp, dev)
        shape = (n, *rows.shape[1:])
        total = torch.zeros(shape, dtype=rows.dtype, device=dev).index_add_(0, g, sel)
        if not self.full:
            return total
        lo, hi, ident = _const(dev)
        g2 = g.unsqueeze(1).expand_as(sel)
        mn = ident.expand(shape).clone().scatter_reduce_(0, g2, sel, "amin")
        mx = ident.expand(shape).clone().scatter_reduce_(0, g2, sel, "amax")
        return torch.where(lo, mn, torch.where(hi, mx, total))

    def _nf_rows(self, rows, src, grp, n, dev) -> torch.Tensor:
        sel = rows.index_select(0, index_on(src, dev))
        nf = sel[:, NF].sum(1) if self.full else sel
        counts = torch.zeros(n, dtype=rows.dtype, device=dev).index_add_(0, index_on(grp, dev), nf)
        return _count_rows(counts, dev) if self.full else counts


def version(t: torch.Tensor) -> int:
    """``t._version``; 0 for an inference tensor (``torch.inference_mode``), which has no
    version counter (the hooks reduce those at once: an in-place change cannot be seen)."""
    try:
        return t._version
    except RuntimeError:
        return 0


def _count_row(count: float) -> list[float]:
    """:func:`_count_rows` of one host count, as a list."""
    return [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, count, 0.0, 0.0, 0.0]


def _to_device(b: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if dev.type == "cuda":
        return b.pin_memory().to(dev, non_blocking=True)
    return b.to(dev)


def _count_rows(counts: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Stats rows ``(n, 10)`` whose only content is a non-finite count (in ``nan``)."""
    out = _const(dev)[2].expand(counts.shape[0], 10).clone()
    out[:, 6] = counts
    return out
