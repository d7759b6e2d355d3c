"""Issue 7 in one process: the distributed options' validation, per-rank run dirs, unwrapping
DistributedDataParallel, the local rows and slots that enter the packed gather, and how the
host writes a histogram summed over the ranks or skips a step some rank failed to pack."""

from __future__ import annotations

import math
import os
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import tbprobe
from tbprobe import kernels
from tbprobe.probe.collect import StepState
from tbprobe.probe.config import ProbeConfig
from tbprobe.probe.dist_pack import GLOBAL_BINS, Part, local_rows
from tbprobe.probe.dist_slots import Gather, global_edges
from tbprobe.probe.emit import StepMeta, build_record, write_step
from tbprobe.probe.ranks import unwrap
from tbprobe.writer.histogram import histogram_value
from tests.probe.util import read_run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_writer_none_is_refused_outside_torch_distributed():
    """Without a process group there is only rank 0, which writes: writer=None raises."""
    with pytest.raises(TypeError, match="writer"):
        tbprobe.Probe(_model(), None)


@pytest.mark.parametrize("name", ["reduce_activations", "per_rank"])
def test_distributed_options_must_be_bools(name):
    """reduce_activations= and per_rank= take bools only, named in the TypeError."""
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    with pytest.raises(TypeError, match=name):
        tbprobe.Probe(_model(), writer, **{name: 1})


def test_per_rank_and_reduce_activations_exclude_each_other(tmp_path):
    """per_rank writes each rank's own activations: reduce_activations=True with it raises."""
    writer = tbprobe.SummaryWriter(str(tmp_path))
    with pytest.raises(ValueError, match="reduce_activations"):
        tbprobe.Probe(_model(), writer, per_rank=True, reduce_activations=True)
    writer.close()


def test_per_rank_outside_torch_distributed_writes_rank0(tmp_path):
    """per_rank=True in one process writes the probe's tags under <logdir>/rank0 only."""
    model = _model()
    writer = tbprobe.SummaryWriter(str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = tbprobe.Probe(model, writer, opt, every=1, per_rank=True, watch_requests=False)
    for _ in range(2):
        model(torch.ones(3, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    probe.detach()
    writer.close()
    top = read_run(str(tmp_path))
    assert not [t for k in ("scalars", "histos") for t in top[k]]
    ranked = read_run(os.path.join(str(tmp_path), "rank0"))["scalars"]
    assert set(ranked["grad_norm/0.weight"]) == {0, 1}
    assert "act_rms/2" in ranked


def test_unwrap_finds_the_module_inside_ddp_and_compile(tmp_path):
    """DistributedDataParallel (a one-rank gloo group) and _orig_mod are unwrapped, so a
    probed DDP model's tags carry the inner module's names."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    init = "file://" + os.path.join(str(tmp_path), "store")
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        inner = _model()
        ddp = DistributedDataParallel(inner)
        assert unwrap(ddp) is inner
        wrapper = nn.Module()
        wrapper._orig_mod = ddp
        assert unwrap(wrapper) is inner
        probe = tbprobe.Probe(ddp, tbprobe.SummaryWriter(write_to_disk=False), every=1)
        assert [n for n, _ in probe.modules] == ["0", "2"]
        assert [n for n, _ in probe._params] == [n for n, _ in inner.named_parameters()]
        probe.detach()
    finally:
        dist.destroy_process_group()


def test_local_rows_give_identity_rows_for_empty_and_replica_parts():
    """An empty shard or a replica counted elsewhere gives the merge's identity row (no
    elements, min +inf, max -inf), not the 0..1 range of an empty tensor; live parts their
    stats."""
    x = torch.tensor([1.0, -2.0, math.nan])
    parts = [Part(x, True, True), Part(torch.empty(0), True, True), Part(x, True, False)]
    rows = local_rows(parts, kernels.tensor_stats)
    torch.testing.assert_close(rows[0], kernels.tensor_stats([x])[0])
    for i in (1, 2):
        assert rows[i, 0] == 0 and rows[i, 6] == 0
        assert rows[i, 3] == math.inf and rows[i, 4] == -math.inf


def test_kept_activation_histogram_takes_the_first_call_only():
    """With keep_hists (reduce_activations on a histogram step) a module's first output is
    binned at once on the ranks' shared edges, and not kept alive to the step boundary; a
    second call of the module does not replace it, and an empty output keeps nothing."""
    st = StepState(0, scheduled=True, full=True, hist=True, keep_hists=True)
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.zeros(5)
    alive = weakref.ref(a)
    st.add_hist("m", a, bins=4)
    if "m" not in st.act_hists:  # the hook's own guard
        st.add_hist("m", b, bins=4)
    st.add_hist("empty", torch.empty(0), bins=4)
    want = kernels.histogram(torch.tensor([1.0, -2.0, 3.0]), bins="tensorflow")
    assert torch.equal(st.act_keep["m"].counts, want.counts)
    torch.testing.assert_close(st.act_keep["m"].stats, want.stats)
    assert "empty" not in st.act_keep and st.act_hists == {"m": None, "empty": None}
    del a
    assert alive() is None  # the activation was not kept
    st.close()
    assert st.act_keep == {}


def test_gather_identities_change_no_merge_and_set_the_flag():
    """A rank that failed sends identity rows, zero sums and the flag: merged with a rank
    that packed, the rows and sums are that rank's own and "broken" counts one failure.
    An empty slot declares nothing; a part of the wrong size is refused."""
    g = Gather()
    g.rows("rows", 2)
    g.sum("counts", 3)
    g.rows("none", 0)
    assert g.keys == ["rows", "counts"]
    x = torch.tensor([1.0, -2.0, math.nan, 4.0])
    rows = kernels.tensor_stats([x, x[:2]])
    counts = torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64)
    good = g.pack({"rows": rows, "counts": counts}, "cpu")
    merged = g.layout.merge(torch.stack([good, g.identities("cpu")]))
    broken, got_rows, got_counts = g.layout.unpack(merged)
    assert broken.tolist() == [1.0]
    assert torch.equal(got_rows, rows) and torch.equal(got_counts, counts)
    with pytest.raises(ValueError, match="parts"):
        g.pack({"rows": rows, "counts": counts[:2]}, "cpu")


def _meta(**kw) -> StepMeta:
    return StepMeta(step=3, scheduled=True, full=True, **kw)


class _Recorder:
    """Stands for a writer: records add_histogram_raw and add_scalar calls."""

    def __init__(self):
        self.calls = []

    def add_histogram_raw(self, tag, **kw):
        self.calls.append((tag, kw))

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value))


def test_global_histogram_is_written_trimmed_on_the_fixed_edges():
    """A histogram summed over the ranks is written on TensorBoard's fixed edges, trimmed to
    its occupied bins and one empty bin before them, as add_histogram would write the same
    values; min, max, num, sum and sum of squares come from the merged stats row."""
    x = torch.tensor([-0.5, 0.0, 1e-3, 1e-3, 2.0, math.inf])
    h = kernels.histogram(x, bins=GLOBAL_BINS)
    data = {"gcounts": h.counts.double().numpy()[None], "gstats": h.stats.numpy()[None]}
    out, meta = _Recorder(), _meta(ghists=["act_hist/m"])
    write_step(out, meta, data, build_record(meta, data), ProbeConfig())
    ((tag, kw),) = out.calls
    want = histogram_value("act_hist/m", h.counts.numpy(), h.edges.numpy(), h.stats.numpy())
    assert tag == "act_hist/m"
    assert kw["bucket_limits"] == list(want.histo.bucket_limit)
    assert kw["bucket_counts"] == list(want.histo.bucket)
    assert (kw["min"], kw["max"], kw["num"]) == (-0.5, 2.0, 5)
    assert kw["sum"] == pytest.approx(1.502) and kw["sum_squares"] == pytest.approx(4.250002)
    assert len(global_edges()) == 1549 and not global_edges().flags.writeable


def test_a_broken_step_is_neither_recorded_nor_written():
    """The gathered flag > 0 (a rank failed to pack): the record is empty (nothing for the
    diagnosis), nothing is written and a RuntimeWarning says why; flag 0 changes nothing."""
    meta = _meta(grads=[(1, "w")])
    row = np.array([[4.0, 0.0, 4.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    with pytest.warns(RuntimeWarning, match="failed to pack"):
        record = build_record(meta, {"grad": row, "broken": np.array([1.0])})
    assert (record.step, record.events, dict(record.grad_norms)) == (3, (), {})
    out = _Recorder()
    write_step(out, meta, {"grad": row, "broken": np.array([1.0])}, record, ProbeConfig())
    assert out.calls == []
    record = build_record(meta, {"grad": row, "broken": np.array([0.0])})
    assert record.grad_norms["w"] == 2.0
