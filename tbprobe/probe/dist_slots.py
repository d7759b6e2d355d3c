"""The pieces of a distributed step's packed gather: local parts, their rows, the slots.

:class:`Gather` declares its slots before anything is reduced, from host bookkeeping that is
the same on every rank, so the layout of the one packed all-gather is agreed without a
collective, even by a rank whose reductions then fail (it sends :meth:`Gather.identities`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from tbprobe import kernels
from tbprobe.probe.batch import index_on
from tbprobe.probe.distributed import Packed, PackedGather, identity_rows, is_dtensor, local_part

# The bins of a histogram merged over the ranks: fixed edges that every rank knows before
# anything is binned (TensorBoard's default exponential bins), so local counts just add up.
GLOBAL_BINS = "tensorflow"


@functools.cache
def global_edges() -> np.ndarray:
    """The float64 ``(1549,)`` edges of :data:`GLOBAL_BINS`, on the host (read-only)."""
    edges = kernels.tensorflow_edges().numpy()  # sync-ok: a CPU tensor, built once
    edges.flags.writeable = False
    return edges


@functools.cache
def global_bins() -> int:
    """The number of :data:`GLOBAL_BINS` bins (1548)."""
    return kernels.tensorflow_edges().numel() - 1


@dataclass
class Part:
    """A tensor's local part: ``merged`` if its rows are merged over the ranks,
    ``contributes`` if this rank's part counts in the merge. ``hist``: its histogram on
    :data:`GLOBAL_BINS`, when it was binned already (a non-empty activation, in its hook;
    ``local`` is then an empty placeholder)."""

    local: torch.Tensor
    merged: bool
    contributes: bool
    hist: kernels.Histogram | None = None

    @property
    def live(self) -> bool:
        return self.contributes and (self.hist is not None or self.local.numel() > 0)


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
    """The slots of one packed all-gather, declared before anything is computed.

    ``rows(key, n)`` declares ``n`` stats rows merged over the ranks, ``sum(key, n)`` ``n``
    values summed (``n == 0`` declares nothing). A first, implicit one-value slot counts the
    ranks that failed: 0 from :meth:`pack`, 1 from :meth:`identities`. :meth:`run` returns
    ``{key: merged}`` with ``"broken"`` ``(1,)`` added.

    Example::

        g = Gather()
        g.rows("grad", 3)
        merged = g.run(g.pack({"grad": rows}, rows.device))  # every rank, same slots
    """

    def __init__(self):
        self.layout, self.keys = Packed(), []
        self.layout.add_sum(1)  # "broken"

    def rows(self, key, n: int) -> None:
        if n > 0:  # an empty slot is no slot: ``key`` is then absent from the result
            self.layout.add_rows(n)
            self.keys.append(key)

    def sum(self, key, n: int) -> None:
        if n > 0:
            self.layout.add_sum(n)
            self.keys.append(key)

    def pack(self, parts: dict, device) -> torch.Tensor:
        """This rank's buffer: ``parts[key]`` for every declared key (ValueError on a size
        that differs from the declared one)."""
        flag = torch.zeros(1, dtype=torch.float64, device=device)
        return self.layout.pack([flag, *(parts[k] for k in self.keys)])

    def identities(self, device) -> torch.Tensor:
        """The buffer of a rank that failed: identity rows, zero sums and the flag set."""
        parts = [torch.ones(1, dtype=torch.float64, device=device)]
        for kind, n in self.layout.slots[1:]:
            if kind == "rows":
                parts.append(identity_rows(n, device))
            else:
                parts.append(torch.zeros(n, dtype=torch.float64, device=device))
        return self.layout.pack(parts)

    def run(self, buf: torch.Tensor) -> dict:
        """All-gather ``buf`` and merge it (a collective: every rank calls it)."""
        broken, *values = self.layout.unpack(PackedGather(self.layout, buf).result())
        out = dict(zip(self.keys, values, strict=True))
        out["broken"] = broken
        return out
