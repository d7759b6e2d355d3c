"""Issue 7: the packed gather's layout is the same on every rank whatever its hooks recorded.

Ranks may record different (module, pass, tensor) keys in one step: a module that
data-dependent control flow runs on rank 1 only, a hook that raised on rank 1 only and was
disabled there. The gathered buffer must keep one size (else gloo raises and NCCL hangs), a
key a rank did not fire must change no merge, and rank 0 must write what the ranks that fired
a key measured, and nothing of a key that fired on no rank. In one process (two simulated
ranks) and on two gloo ranks (:mod:`tests.probe.dist_harness`, with a deadline).
"""

from __future__ import annotations

import collections
import math
import os

import pytest
import torch

from tbprobe import kernels
from tbprobe.probe.collect import StepState
from tbprobe.probe.dist_events import declare, event_layout, local_events, write_events
from tbprobe.probe.dist_slots import Gather
from tbprobe.probe.emit import StepMeta, build_record
from tbprobe.probe.stream import Packer
from tests.probe import dist_harness as H
from tests.probe.dist_expect import expected, mismatches, report
from tests.probe.util import read_run

PLANTED = {"module": "blocks.1.fc1", "pass_": "forward", "step": 1}
FC2 = H.HOOK_FAIL[0]
pytestmark = pytest.mark.filterwarnings("ignore:tbprobe:RuntimeWarning")


# ---------------------------------------------------------------- two simulated ranks
def _rank_step(outputs: dict, scheduled: bool, full: bool) -> StepState:
    """One rank's step: each module of ``outputs`` fired its forward output, its input clean."""
    st = StepState(0, scheduled=scheduled, checked=True, full=full, backward=True)
    for m, t in outputs.items():
        ev = st.event(m, "forward", "output")
        ev.rows.append(st.add(t, m))  # a forward output
        ev.inputs = [st.rows.add_nf(torch.ones(2))]
    st.event("c", "forward", "output")  # opened by a hook that failed midway: not fired
    return st


@pytest.mark.parametrize(
    ("scheduled", "full0", "own"),
    [(True, True, True), (True, True, False), (False, False, True), (False, True, True)],
)
def test_ranks_firing_different_keys_gather_one_layout(scheduled, full0, own):
    """Rank 0 fired module a; rank 1 fired a and b (b: one NaN); c fired nowhere. Both pack
    buffers of one size; rank 0's record has a (its own row, or the merged one without
    ``own``) and b (rank 1's row, ordered after a), never c; counts-only steps too, where a
    rank's rows may be full (a snapshot on that rank only)."""
    layout = event_layout(["a", "b", "c"], backward=True)
    x0, x1, bad = (
        torch.tensor([1.0, -2.0, 3.0]),
        torch.tensor([4.0, 5.0]),
        torch.tensor([math.nan, 1.0]),
    )
    states = [
        _rank_step({"a": x0}, scheduled, full0),
        _rank_step({"a": x1, "b": bad}, scheduled, scheduled),
    ]
    g = Gather()
    declare(g, layout, wide=scheduled)
    locs = [local_events(st, layout, scheduled, torch.device("cpu")) for st in states]
    bufs = [g.pack(loc.slots, torch.device("cpu")) for loc in locs]
    assert bufs[0].shape == bufs[1].shape
    _, *values = g.layout.unpack(g.layout.merge(torch.stack(bufs)))
    merged = dict(zip(g.keys, values, strict=True))
    pk, meta = Packer(), StepMeta(step=0, scheduled=scheduled, full=full0)
    write_events(states[0], layout, locs[0], merged, pk, meta, own=own, others=True)
    record = build_record(meta, pk.finish(0, meta).decode())
    got = {(e.module, e.tensor): e for e in record.events}
    assert list(got) == [("a", "output"), ("b", "output")]
    a, b = got["a", "output"], got["b", "output"]
    assert (a.nonfinite, b.nonfinite, a.inputs_nonfinite, b.inputs_nonfinite) == (0, 1, 0, 0)
    assert a.seq < b.seq
    if scheduled:  # the columns the probe reads on the CPU (probe_stats); bad's row is full
        read = [0, 2, 3, 4, 5, 6, 7, 8]
        want_a = kernels.tensor_stats([x0] if own else [torch.cat([x0, x1])])[0].numpy()
        assert a.stats[read].tolist() == want_a[read].tolist()
        assert b.stats.tolist() == kernels.tensor_stats([bad])[0].tolist()


# ---------------------------------------------------------------- two gloo ranks
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The layout scenarios, in one spawn of two ranks: ``(out dir, spawn error or None)``."""
    out = str(tmp_path_factory.mktemp("dist_layout"))
    return out, H.run_scenarios(out, H.LAYOUT_NAMES, timeout_s=90)


def _written(runs, name: str) -> dict:
    return read_run(os.path.join(runs[0], name, "run"))


def _errors(dumps) -> list[list[str]]:
    return [d["probe_errors"] for d in dumps]


def test_ddp_module_run_by_rank1_only_is_written_from_its_part(runs):
    """Under DDP a hooked module that runs on rank 1 only: no error, no hang; rank 0 writes
    every tag as from its own tensors, and the module's activation and output-gradient stats
    from rank 1's part (its histograms are rank-local: rank 0 has none)."""
    dumps = H.load(runs, "ddp_branch")
    assert _errors(dumps) == [[], []]
    run = H.truth(dumps)
    want = expected(run, [0], [0])
    assert not any(t.endswith("/branch") for t in want["scalars"])
    rank1 = expected(run, [0], [1])["scalars"]
    want["scalars"].update({t: v for t, v in rank1.items() if t.endswith("/branch")})
    assert {"act_rms/branch", "outgrad_rms/branch"} <= set(want["scalars"])
    bad = mismatches(_written(runs, "ddp_branch"), want)
    assert not bad, report(bad, "rank 0's tensors and rank 1's branch")


def test_nan_on_rank1_attributed_on_a_counts_step_with_different_keys(runs):
    """Step 1 of "ddp_branch" gathers non-finite counts only, the ranks having fired
    different keys: the NaN planted in blocks.1.fc1 on rank 1 is attributed on rank 0; rank
    0's record holds the branch's output (rank 1's, non-finite) and no key that fired on no
    rank (the embedding's grad_input: its input is integer)."""
    d0, _ = H.load(runs, "ddp_branch")
    first = d0["anomalies"][0]
    assert {k: first[k] for k in PLANTED} == PLANTED, first
    assert (first["kind"], first["producer"]) == ("nonfinite", True), first
    assert first["message"].endswith("; on rank 1 of 2"), first["message"]
    keys = {(m, p, t): nf for m, p, t, nf in d0["last_events"]}
    assert keys[("branch", "forward", "output")] > 0
    assert ("tok", "backward", "grad_input") not in keys
    assert ("tok", "backward", "grad_output") in keys


def test_fsdp_module_run_by_rank1_only_is_merged_from_its_part(runs):
    """Under FSDP2 with reduce_activations a module run on rank 1 only: rank 0 writes its
    stats and its histogram (fixed edges) from rank 1's part, every other tag merged over
    both ranks, exactly."""
    dumps = H.load(runs, "fsdp_branch")
    assert _errors(dumps) == [[], []]
    want = expected(H.truth(dumps), 2, [0, 1], tf=True)
    assert {"act_rms/branch", "act_hist/branch"} <= {*want["scalars"], *want["histos"]}
    bad = mismatches(_written(runs, "fsdp_branch"), want)
    assert not bad, report(bad, "the tensors the ranks held")


@pytest.mark.parametrize("name", ["ddp_hook_fail", "fsdp_hook_fail"])
def test_a_hook_failing_on_rank1_only_leaves_the_other_tags_right(runs, name):
    """Rank 1's forward hook of blocks.0.fc2 raises at step 1 (midway) and is disabled there
    only: no hang; rank 1 records that one error; rank 0 writes every tag as before (DDP: its
    own tensors), fc2's merged ones (FSDP2) from rank 0's part from step 1 on."""
    dumps = H.load(runs, name)
    errors = _errors(dumps)
    assert errors[0] == [] and len(errors[1]) == 1, errors
    assert H.HOOK_FAIL_MESSAGE in errors[1][0] and FC2 in errors[1][0], errors
    run = H.truth(dumps)
    if name == "ddp_hook_fail":
        want = expected(run, 3, [0])
    else:
        want = expected(run, 3, [0, 1], tf=True)
        alone = expected(run, [1, 2], [0], tf=True)
        for kind in ("scalars", "histos"):
            for tag, by_step in alone[kind].items():
                if tag.endswith("/" + FC2):  # act_rms, act_absmax, act_hist, outgrad_rms
                    want[kind][tag].update(by_step)
    bad = mismatches(_written(runs, name), want)
    assert not bad, report(bad, "the tensors the ranks held")


@pytest.mark.parametrize("name", H.LAYOUT_NAMES)
def test_one_collective_and_no_host_sync_per_step_whatever_fired(runs, name):
    """Whatever each rank fired, the probe's code calls one collective per logged step on
    every rank, at the step boundary, and no host sync in the step."""
    dumps = H.load(runs, name)
    for d in dumps:
        per_step = collections.Counter(step for _, step, _ in d["collectives"])
        assert {entry for entry, _, _ in d["collectives"]} <= {"_close_step"}, d["collectives"]
        assert per_step == dict.fromkeys(range(H.SCENARIO[name].steps), 1), d["collectives"]
    assert [d["syncs"] for d in dumps] == [[], []]
