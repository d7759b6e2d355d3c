"""The probe's place among torch.distributed ranks: who writes where, the model it probes."""

from __future__ import annotations

import os

from torch import nn

from tbprobe.probe.dist_pack import DistContext
from tbprobe.probe.distributed import is_distributed, rank, world_size


def dist_context(reduce_activations: bool, per_rank: bool) -> DistContext | None:
    """This rank's :class:`DistContext`, or None outside a process group of several ranks.

    Example::

        ctx = dist_context(False, False)  # None in a single process
    """
    if not is_distributed():
        return None
    return DistContext(
        rank=rank(),
        world=world_size(),
        reduce_acts=reduce_activations is True,
        per_rank=per_rank is True,
    )


def output_writer(writer, ctx: DistContext | None, per_rank: bool):
    """What this rank writes to: the writer, None (a rank other than 0), or with
    ``per_rank`` a zero-argument factory of a writer on ``<writer logdir>/rank<r>``.

    ``writer=None`` is accepted on ranks other than 0 only (without ``per_rank``); a writer
    given there is not written to (rank 0 writes the global values).

    Example::

        out = output_writer(SummaryWriter("runs/x"), None, False)  # the writer itself
    """
    r = 0 if ctx is None else ctx.rank
    if writer is None and ctx is not None and r != 0 and not per_rank:
        return None
    if not callable(getattr(writer, "add_scalar", None)):
        why = " (None is accepted on ranks other than 0 without per_rank)" if writer is None else ""
        raise TypeError(f"writer: expected a SummaryWriter, got {type(writer).__name__}{why}")
    if per_rank:
        if not callable(getattr(writer, "get_logdir", None)):
            raise TypeError(
                f"writer: per_rank=True needs a writer with get_logdir(), got "
                f"{type(writer).__name__}"
            )
        logdir = os.path.join(writer.get_logdir(), f"rank{r}")

        def open_writer():
            from tbprobe.writer import SummaryWriter

            return SummaryWriter(logdir)

        return open_writer
    return writer if r == 0 else None


def agreed_every(every: int, ctx: DistContext | None) -> int:
    """The default ``every`` (the writer's ``log_freq``) as rank 0 sees it, on every rank:
    the ranks must schedule the same steps (they join the same collectives). A collective
    at construction, never on the step."""
    if ctx is None:
        return every
    import torch.distributed as dist

    box = [every]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose names the probe uses: inside ``DistributedDataParallel`` (``.module``)
    and ``torch.compile`` (``._orig_mod``), in any nesting.

    Example::

        unwrap(DistributedDataParallel(net)) is net  # True
    """
    from torch.nn.parallel import DistributedDataParallel

    for _ in range(8):
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model
