"""Global statistics from per-rank partials: the merge, the packed layout, gloo with DTensors."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from tbprobe import kernels
from tbprobe.probe import distributed as D

COLS = {n: i for i, n in enumerate(kernels.STAT_NAMES)}


def _sample(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    x[::7] = 0.0
    x[5] = math.nan
    x[11] = math.inf
    x[13] = -math.inf
    return x


def _assert_rows_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    exact = [
        COLS[n] for n in ("count", "min", "max", "abs_max", "nan", "pos_inf", "neg_inf", "zeros")
    ]
    assert torch.equal(got[:, exact], want[:, exact]), (got, want)
    moments = [COLS["sum"], COLS["sum_sq"]]
    torch.testing.assert_close(got[:, moments], want[:, moments], rtol=1e-12, atol=1e-12)


def test_merge_rows_of_chunks_equals_stats_of_whole():
    """Stats of uneven chunks merged equal the stats of the whole tensor."""
    x = _sample(1001, 0)
    chunks = [x[:1], x[1:400], x[400:], x[:0]]  # an empty chunk is the identity
    rows = torch.stack([kernels.tensor_stats([c]) for c in chunks])  # (4, 1, 10)
    _assert_rows_equal(D.merge_rows(rows), kernels.tensor_stats([x]))


def test_identity_rows_leave_a_merge_unchanged():
    """Identity rows (no elements) merged with real rows change nothing."""
    x = _sample(50, 1)
    row = kernels.tensor_stats([x])
    merged = D.merge_rows(torch.stack([row, D.identity_rows(1, "cpu")]))
    _assert_rows_equal(merged, row)
    assert D.identity_rows(2, "cpu")[0].tolist() == list(D.IDENTITY_ROW)


def test_merge_rows_rejects_a_wrong_shape():
    """A gathered tensor of the wrong shape is refused, naming the argument."""
    with pytest.raises(ValueError, match="gathered"):
        D.merge_rows(torch.zeros(2, 3))


def test_packed_round_trip_with_simulated_ranks():
    """pack -> (W, size) -> merge -> unpack gives merged rows and summed segments."""
    layout = D.Packed()
    layout.add_rows(2)
    layout.add_sum(5)
    xs = [_sample(300, s) for s in range(4)]
    per_rank = []
    for r in range(2):  # rank r holds half of every tensor
        rows = kernels.tensor_stats(
            [xs[0][r * 150 : (r + 1) * 150], xs[1][r * 150 : (r + 1) * 150]]
        )
        bins = torch.arange(5, dtype=torch.float64) * (r + 1)
        per_rank.append(layout.pack([rows, bins]))
    rows, bins = layout.unpack(layout.merge(torch.stack(per_rank)))
    _assert_rows_equal(rows, kernels.tensor_stats([xs[0], xs[1]]))
    assert bins.tolist() == [0.0, 3.0, 6.0, 9.0, 12.0]
    with pytest.raises(ValueError, match="parts"):
        layout.pack([rows])


def test_outside_torch_distributed():
    """Without a process group: rank 0 of 1, not distributed, plain tensors contribute."""
    assert (D.rank(), D.world_size(), D.is_distributed()) == (0, 1, False)
    t = torch.ones(3)
    local, contributes = D.local_part(t)
    assert local is t and contributes


def _worker(rank: int, world: int, init: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = _sample(7 * 3, 2).reshape(7, 3)  # 7 rows: shards of 4 and 3
        full[6, 1] = math.nan  # lands on rank 1's shard only
        sharded = distribute_tensor(full, mesh, [Shard(0)])
        replicated = distribute_tensor(full, mesh, [Replicate()])
        parts, flags = zip(*(D.local_part(t) for t in (sharded, replicated)), strict=True)
        assert parts[0].shape[0] == (4 if rank == 0 else 3)
        assert flags == (True, rank == 0)
        rows = kernels.tensor_stats(list(parts))
        rows = torch.where(torch.tensor(flags)[:, None], rows, D.identity_rows(2, "cpu"))
        edges = kernels.tensorflow_edges()
        hist = kernels.histogram(parts[0], bins=edges).counts.double()
        layout = D.Packed()
        layout.add_rows(2)
        layout.add_sum(hist.numel())
        g = D.PackedGather(layout, layout.pack([rows, hist]))
        got_rows, got_hist = layout.unpack(g.result())
        want = kernels.tensor_stats([full, full])
        _assert_rows_equal(got_rows, want)
        assert got_rows[0, COLS["nan"]] == 2  # _sample's NaN plus the planted one
        assert torch.equal(got_hist, kernels.histogram(full, bins=edges).counts.double())
        # Tear down only once every rank is done: a rank that destroys the group while another
        # still finishes its gloo work makes both abort at exit (seen ~1 run in 5).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gloo_sharded_and_replicated_dtensors_give_global_stats():
    """Two gloo ranks: a Shard(0) DTensor merges to the full tensor's stats and histogram; a
    Replicate DTensor counts once."""
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        mp.spawn(_worker, args=(2, init), nprocs=2, join=True)
