"""Global statistics under torch.distributed: local partials, one packed collective, a merge.

Under DDP every rank holds the same (synchronised) gradients, so rank 0's reductions are
already global. Under FSDP2 (``fully_shard``) and other DTensor sharding each rank holds a
shard: it reduces its *local* part with the kernels, and the partial results of every probed
tensor go through **one** asynchronous all-gather of a packed float64 buffer per logged step.
Each rank then merges the gathered partials on its device — sums and counts add, minima and
maxima combine, histogram bins (on fixed edges every rank knows before binning) add — so
rank 0 holds the statistics of the unsharded tensors without a host sync.

A replicated DTensor dimension must count once: only the ranks at coordinate 0 along each
``Replicate`` mesh dimension contribute; the others send identity rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tbprobe.kernels import STAT_NAMES

__all__ = [
    "IDENTITY_ROW",
    "Packed",
    "PackedGather",
    "collective_device",
    "identity_rows",
    "is_distributed",
    "is_dtensor",
    "local_part",
    "merge_rows",
    "rank",
    "world_size",
]

_COL = {name: i for i, name in enumerate(STAT_NAMES)}
# Slices, not lists: a list index on a CUDA tensor is copied there from pageable memory (a
# sync on every merge).
_MIN_COLS = slice(_COL["min"], _COL["min"] + 1)
_MAX_COLS = slice(_COL["max"], _COL["max"] + 2)
assert _COL["abs_max"] == _COL["max"] + 1  # the max-merged columns are adjacent
# The identity of the merge: no elements, min +inf, max -inf (abs_max 0, as for no elements).
IDENTITY_ROW = tuple(
    math.inf if n == "min" else -math.inf if n == "max" else 0.0 for n in STAT_NAMES
)


def is_distributed() -> bool:
    """True inside an initialised default process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 outside torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the default group (1 outside torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device(group=None) -> torch.device:
    """Where a buffer for the group's collectives lives: the current CUDA device under NCCL,
    else the CPU (gloo). For a step with no tensor to take the device from.

    Example::

        buf = torch.zeros(4, device=collective_device())
    """
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed support
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a sharded or replicated tensor)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(local tensor, contributes)`` of a plain tensor or a DTensor.

    A plain tensor is its own local part. A DTensor gives its local shard; ``contributes`` is
    False on the ranks that hold a replica of data another rank already counts (coordinate
    > 0 along a ``Replicate`` mesh dimension). A ``Partial`` placement (values still to be
    summed across ranks) is first redistributed to ``Replicate``.

    Example::

        local, counts = local_part(param.grad)  # (shard,) on this rank
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return t, True
    if any(p.is_partial() for p in t.placements):
        from torch.distributed.tensor import Replicate

        placements = [Replicate() if p.is_partial() else p for p in t.placements]
        t = t.redistribute(t.device_mesh, placements)
    coord = t.device_mesh.get_coordinate()
    if coord is None:  # this rank is not in the tensor's mesh
        return t.to_local(), False
    contributes = all(c == 0 for c, p in zip(coord, t.placements, strict=True) if p.is_replicate())
    return t.to_local(), contributes


def identity_rows(n: int, device) -> torch.Tensor:
    """float64 ``(n, len(STAT_NAMES))`` rows that leave any merge unchanged."""
    rows = torch.zeros(n, len(STAT_NAMES), dtype=torch.float64, device=device)
    rows[:, _COL["min"]] = math.inf  # filled on the device: no host data to copy
    rows[:, _COL["max"]] = -math.inf
    return rows


def merge_rows(gathered: torch.Tensor) -> torch.Tensor:
    """Merge per-rank stat rows: ``(W, n, len(STAT_NAMES))`` -> ``(n, len(STAT_NAMES))``.

    Counts, sums and sums of squares add; ``min`` takes the minimum, ``max`` and ``abs_max``
    the maximum. Exact for counts (float64 holds integers to 2^53).

    Example::

        rows = merge_rows(torch.stack([rows_rank0, rows_rank1]))  # (n, 10)
    """
    if gathered.ndim != 3 or gathered.shape[-1] != len(STAT_NAMES):
        raise ValueError(
            f"gathered: expected shape (W, n, {len(STAT_NAMES)}), got {tuple(gathered.shape)}"
        )
    out = gathered.sum(0)
    out[:, _MIN_COLS] = gathered[:, :, _MIN_COLS].amin(0)
    out[:, _MAX_COLS] = gathered[:, :, _MAX_COLS].amax(0)
    return out


@dataclass
class Packed:
    """A flat float64 layout of stat rows and summed segments (e.g. histogram counts).

    ``add_rows(n)`` and ``add_sum(n)`` reserve segments and return their slot index;
    ``pack(parts)`` concatenates the parts in slot order into one ``(size,)`` buffer;
    ``merge(gathered)`` merges a ``(W, size)`` all-gather and ``unpack`` splits the result
    back into the slots' shapes.
    """

    slots: list[tuple[str, int]] = field(default_factory=list)  # (kind, n)

    def add_rows(self, n: int) -> int:
        self.slots.append(("rows", int(n)))
        return len(self.slots) - 1

    def add_sum(self, n: int) -> int:
        self.slots.append(("sum", int(n)))
        return len(self.slots) - 1

    def _width(self, kind: str, n: int) -> int:
        return n * len(STAT_NAMES) if kind == "rows" else n

    @property
    def size(self) -> int:
        return sum(self._width(k, n) for k, n in self.slots)

    def pack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One ``(size,)`` float64 buffer of ``parts`` (one tensor per slot, in order)."""
        if len(parts) != len(self.slots):
            raise ValueError(f"parts: expected {len(self.slots)} tensors, got {len(parts)}")
        flat = []
        for (kind, n), part in zip(self.slots, parts, strict=True):
            if part.numel() != self._width(kind, n):
                raise ValueError(f"parts: a {kind} slot of {n} got {part.numel()} values")
            flat.append(part.reshape(-1).to(torch.float64))
        return torch.cat(flat)

    def merge(self, gathered: torch.Tensor) -> torch.Tensor:
        """``(W, size)`` per-rank buffers -> ``(size,)`` global buffer."""
        out, at = [], 0
        for kind, n in self.slots:
            width = self._width(kind, n)
            seg = gathered[:, at : at + width]
            if kind == "rows":
                out.append(merge_rows(seg.reshape(-1, n, len(STAT_NAMES))).reshape(-1))
            else:
                out.append(seg.sum(0))
            at += width
        return torch.cat(out) if out else gathered.new_zeros(0)

    def unpack(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split a ``(size,)`` buffer back into ``(n, 10)`` rows and ``(n,)`` segments."""
        parts, at = [], 0
        for kind, n in self.slots:
            width = self._width(kind, n)
            seg = flat[at : at + width]
            parts.append(seg.reshape(n, len(STAT_NAMES)) if kind == "rows" else seg)
            at += width
        return parts


class PackedGather:
    """An asynchronous all-gather of one packed buffer; ``result()`` merges it on the device.

    Started on the training thread with no host sync: under NCCL, waiting on the work only
    orders the current stream after the collective; under gloo (CPU) it returns when done.

    Example::

        g = PackedGather(layout, layout.pack(parts))  # every rank, same layout
        rows, hist = layout.unpack(g.result())  # global values, on every rank
    """

    def __init__(self, layout: Packed, buf: torch.Tensor, group=None):
        import torch.distributed as dist

        self.layout = layout
        self._world = dist.get_world_size(group)
        self._out = buf.new_empty(self._world * buf.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._work = gather(self._out, buf.contiguous(), group=group, async_op=True)

    def result(self) -> torch.Tensor:
        """The merged ``(size,)`` global buffer."""
        self._work.wait()
        return self.layout.merge(self._out.view(self._world, -1))
