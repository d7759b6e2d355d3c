"""Issue 7: a tiny transformer LM trained by 2 gloo ranks on CPU under DDP and FSDP2, a Probe on
every rank. What rank 0 writes must equal the statistics of the synchronised, unsharded tensors
the ranks hold (float32 rounding of a written scalar; histogram counts exactly) and those of a
single-process float64 run of the same global batches (float32 training rounding); a NaN
planted on rank 1 only must be attributed on rank 0; ``per_rank=True`` writes ``rank<r>``."""

from __future__ import annotations

import collections
import os
import threading
import time

import pytest
import torch

import tbprobe
from tbprobe.probe.anomaly import parse_markdown
from tests.probe import dist_harness as H
from tests.probe.dist_expect import LOOSE_OTHERS, expected, mismatches, report
from tests.probe.util import read_run

FAMILIES = ("grad_norm", "param_norm", "update_ratio", "act_rms", "act_absmax", "outgrad_rms")
HIST_FAMILIES = ("grad_hist", "param_hist", "act_hist")
PLANTED = {"module": "blocks.1.fc1", "pass_": "forward", "step": 1}
pytestmark = pytest.mark.filterwarnings("ignore:tbprobe:RuntimeWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario, in one spawn of two ranks: ``(out dir, spawn error or None)``."""
    out = str(tmp_path_factory.mktemp("dist"))
    return out, H.run_scenarios(out, H.BASE_NAMES)


def reference(steps: int) -> dict:
    """The same training in one process in float64: each rank's micro-batch with its own mean
    loss, the gradients averaged over the ranks (as DDP and FSDP2 do), then the SGD step."""
    model = H.make_model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=H.LR)
    names = H.module_names(model)
    cap = H.Capture([(n, model.get_submodule(n)) for n in names], model.named_parameters())
    opt.register_step_pre_hook(cap.pre_step)
    opt.register_step_post_hook(cap.post_step)
    for step in range(steps):
        for r in range(H.WORLD):
            cap.rank = r
            H.lm_loss(model, H.rank_batch(step, r)).backward()
        for p in model.parameters():
            p.grad /= H.WORLD
        opt.step()
        opt.zero_grad()
    cap.remove()
    return cap.data()


@pytest.fixture(scope="module")
def ref64():
    return reference(3)


def _probe_errors(dumps) -> list[str]:
    return [f"rank {d['rank']}: {e}" for d in dumps for e in d.get("probe_errors", [])]


# ---------------------------------------------------------------- controls (one process)
def test_single_process_control_matches_the_expected_values(tmp_path, ref64):
    """One process, the global batch: the probe's tags equal the expectations computed here
    (tightly from its own tensors; to float32 training rounding from the float64 reference)."""
    model = H.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=H.LR)
    names = H.module_names(model)
    cap = H.Capture([(n, model.get_submodule(n)) for n in names], model.named_parameters())
    opt.register_step_pre_hook(cap.pre_step)
    opt.register_step_post_hook(cap.post_step)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, every=1, histogram_every=1, hist_bins=H.BINS)
    for step in range(3):
        H.lm_loss(model, H.global_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    probe.detach()
    writer.close()
    written = read_run(str(tmp_path))
    bad = mismatches(written, expected(cap.data(), 3, [0]))
    assert not bad, report(bad, "its own tensors")
    assert not probe.errors
    # The reference's activations of both ranks are the global batch's; its output gradients
    # are of each rank's own mean loss (WORLD times those of the global mean): not compared.
    fams = [f for f in FAMILIES + HIST_FAMILIES if f != "outgrad_rms"]
    bad = mismatches(written, expected(ref64, 3, [0, 1]), loose=True, families=fams)
    assert not bad, report(bad, "the float64 reference")


def test_single_process_control_attributes_the_planted_nan():
    """One process: the NaN planted in blocks.1.fc1's output at step 1 is the first anomaly."""
    model = H.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=H.LR)
    cap = H.Capture([], [])
    opt.register_step_post_hook(cap.post_step)
    H.plant_nan(model.get_submodule(PLANTED["module"]), cap, PLANTED["step"], 0)
    probe = tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False), opt)
    for step in range(2):
        H.lm_loss(model, H.rank_batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
    probe.detach()
    first = probe.anomalies[0]
    assert {k: getattr(first, k) for k in PLANTED} == PLANTED
    assert (first.kind, first.producer) == ("nonfinite", True)


# ---------------------------------------------------------------- what torch gives the probe
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_ranks_hold_the_averaged_global_gradient(runs, ref64, name):
    """At the optimizer step (where the probe reduces grads) DDP's grads on every rank, and
    FSDP2's gathered shards, equal the reference's averaged gradient; DDP's are bitwise the
    same on both ranks, so rank 0 alone is right for grads under DDP."""
    d0, d1 = H.load(runs, name, probed=False)
    for step in range(3):
        for n, g in d0["grads"][step].items():
            want = ref64["grads"][step][n].float()
            tol = LOOSE_OTHERS
            torch.testing.assert_close(g, want, rtol=tol, atol=tol * want.abs().max())
            if name == "ddp":
                assert torch.equal(g, d1["grads"][step][n]), n


def test_grad_hooks_see_the_tensor_the_step_holds(runs):
    """The post-accumulate-grad hook (the probe's) gets, under DDP, the rank's own unreduced
    grad in the very tensor DDP then averages in place (so reduce it at the step, not in the
    hook); under FSDP2, the sharded DTensor grad already reduce-scattered (the step's)."""
    for name in ("ddp", "fsdp"):
        dumps = H.load(runs, name, probed=False)
        for n in dumps[0]["grad_layout"]:
            (h0, g0), (h1, g1) = (d["hook_grads"][n] for d in dumps)
            assert [h0, h1] == [d["grad_layout"][n][3] for d in dumps], (name, n)  # same tensor
            s0, s1 = (d["grad_layout"][n][4] for d in dumps)
            if name == "ddp":
                assert not torch.equal(g0, g1) and torch.equal(s0, s1), n
            else:
                assert torch.equal(g0, s0) and torch.equal(g1, s1), n


def test_fsdp2_grads_are_sharded_dtensors(runs):
    """Under FSDP2 every param.grad at the step is a DTensor Shard(0) whose local parts split
    dim 0 (uneven: 19 + 18 rows of the head; pos's single row leaves rank 1 empty)."""
    d0, d1 = H.load(runs, "fsdp", probed=False)
    full = {n: t.shape for n, t in d0["grads"][0].items()}
    for n, shape in full.items():
        (k0, p0, s0), (k1, p1, s1) = (d["grad_layout"][n][:3] for d in (d0, d1))
        assert (k0, p0) == (k1, p1) == ("DTensor", "(Shard(dim=0),)"), n
        assert s0[0] + s1[0] == shape[0] and s0[1:] == s1[1:] == tuple(shape[1:]), n
    assert d0["grad_layout"]["head.weight"][2] == (19, H.DIM)
    assert d1["grad_layout"]["pos"][2] == (0, H.SEQ, H.DIM)


# ---------------------------------------------------------------- what rank 0 writes
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_rank0_writes_the_stats_of_the_global_tensors(runs, name):
    """Rank 0's tags equal float64 statistics of the synchronised (DDP) or unsharded (FSDP2)
    grads and params, and of rank 0's activations (DDP) or all ranks' (FSDP2 run with
    reduce_activations=True): scalars to float32 rounding, histogram edges and counts exactly
    (DDP: linear bins over rank 0's finite range; FSDP2: TensorBoard's fixed bins, counts
    summed over the ranks), and the histograms' num, min, max, sum and sum of squares."""
    dumps = H.load(runs, name)
    assert not _probe_errors(dumps), _probe_errors(dumps)
    act_ranks = [0] if name == "ddp" else [0, 1]
    written = read_run(os.path.join(runs[0], name, "run"))
    bad = mismatches(written, expected(H.truth(dumps), 3, act_ranks, tf=name == "fsdp"))
    assert not bad, report(bad, "the tensors the ranks held")


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_rank0_writes_the_single_process_reference(runs, ref64, name):
    """Rank 0's tags equal those of the single-process float64 run of the same global
    batches, to float32 training rounding (counts: up to values within rounding of an edge)."""
    H.load(runs, name)
    act_ranks = [0] if name == "ddp" else [0, 1]
    written = read_run(os.path.join(runs[0], name, "run"))
    bad = mismatches(written, expected(ref64, 3, act_ranks, tf=name == "fsdp"), loose=True)
    assert not bad, report(bad, "the float64 single-process reference")


@pytest.mark.parametrize("name", ["ddp_nan", "fsdp_nan"])
def test_nan_planted_on_rank1_is_attributed_on_rank0(runs, name):
    """A NaN in blocks.1.fc1's forward output on rank 1 only, at step 1: rank 0's first
    anomaly names that module, pass and step, as made there, and the rank; so does its
    anomaly text."""
    dumps = H.load(runs, name)
    found = dumps[0]["anomalies"]
    assert found, f"rank 0 found nothing (rank 1 found {dumps[1].get('anomalies')})"
    first = found[0]
    assert {k: first[k] for k in PLANTED} == PLANTED, first
    assert (first["kind"], first["producer"]) == ("nonfinite", True), first
    assert first["message"].endswith("; on rank 1 of 2"), first["message"]
    texts = read_run(os.path.join(runs[0], name, "run"))["texts"]
    tag = "anomaly/text_summary"  # add_text's tag, tensorboardX naming
    rows = parse_markdown(texts.get(tag, {}).get(PLANTED["step"], ""))
    assert rows, f"no anomaly text at step {PLANTED['step']}: {dict(texts)}"
    assert (rows[0]["where"], rows[0]["pass"]) == (PLANTED["module"], PLANTED["pass_"])


def test_per_rank_writes_one_run_dir_per_rank(runs):
    """per_rank=True (a writer on every rank, one log dir): rank r writes its own activation
    stats and the synchronised grads under <logdir>/rank<r>; nothing of the probe's at the top."""
    dumps = H.load(runs, "ddp_per_rank")
    assert not _probe_errors(dumps), _probe_errors(dumps)
    run = H.truth(dumps)
    base = os.path.join(runs[0], "ddp_per_rank", "run")
    top = read_run(base) if os.path.isdir(base) else {"scalars": {}, "histos": {}}
    probe_tags = [t for k in ("scalars", "histos") for t in top[k] if "/" in t]
    assert not probe_tags, f"written at the top of the log dir: {probe_tags[:5]}"
    for r in range(H.WORLD):
        rdir = os.path.join(base, f"rank{r}")
        assert os.path.isdir(rdir), f"{rdir} missing"
        bad = mismatches(read_run(rdir), expected(run, 2, [r]))
        assert not bad, report(bad, f"rank {r}'s tensors")


# ---------------------------------------------------------------- one collective, no hang
@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_broken"])
def test_one_collective_per_logged_step(runs, name):
    """On every rank the probe's code calls exactly one torch.distributed collective per logged
    step, at the step boundary (its packed all-gather), histogram steps included (every step of
    "ddp" and "fsdp", where FSDP2 bins grads, params and activations over the ranks; steps 0
    and 2 of "fsdp_broken"), and none from its hooks."""
    dumps = H.load(runs, name)
    for d in dumps:
        calls = d["collectives"]
        assert {entry for entry, _, _ in calls} <= {"_close_step"}, calls
        per_step = collections.Counter(step for _, step, _ in calls)
        assert per_step == dict.fromkeys(range(H.SCENARIO[name].steps), 1), calls


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_broken"])
def test_no_host_sync_in_the_distributed_step(runs, name):
    """In the hooks and at the step boundary (packing, the gather, the merge, histogram steps
    and the failing rank included) the probe calls none of item/cpu/tolist/numpy/bool/int/
    float/nonzero on a tensor, on either rank."""
    dumps = H.load(runs, name)
    assert [d["syncs"] for d in dumps] == [[], []]


def test_a_rank_failing_to_pack_leaves_no_rank_waiting(runs):
    """Rank 1's packing raises at step 2 (a histogram step): it still takes its part in the
    step's gather, so the run goes on (no rank waits in the collective), records the error
    once and keeps packing; rank 0, told by the gathered flag, writes nothing of step 2 (its
    global values would lack rank 1's part) and steps 0, 1 and 3 exactly."""
    dumps = H.load(runs, "fsdp_broken")
    errors = [d["probe_errors"] for d in dumps]
    assert errors[0] == [] and len(errors[1]) == 1, errors
    assert H.BREAK_MESSAGE in errors[1][0], errors
    written = read_run(os.path.join(runs[0], "fsdp_broken", "run"))
    at_break = [t for k in ("scalars", "histos") for t, by in written[k].items() if 2 in by]
    assert not at_break, f"written at the broken step: {at_break[:5]}"
    want = expected(H.truth(dumps), [0, 1, 3], [0, 1], tf=True, hist_steps=[0])
    bad = mismatches(written, want)
    assert not bad, report(bad, "the tensors the ranks held")


# ---------------------------------------------------------------- the harness itself
def _failing_child(rank: int, out: str) -> None:
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    threading.Event().wait(120)  # rank 0 stands for a rank stuck in a collective


def test_harness_surfaces_a_rank_failure_with_its_traceback(tmp_path):
    """A rank that raises ends the spawn at once (the other rank is killed) and the error
    carries its traceback."""
    start = time.monotonic()
    with pytest.raises(H.HarnessError, match="planted failure on rank 1") as info:
        H.spawn_ranks(_failing_child, (str(tmp_path),), str(tmp_path), timeout_s=60)
    assert "_failing_child" in str(info.value)  # the child's traceback
    assert time.monotonic() - start < 30  # not the deadline, nor rank 0's wait
