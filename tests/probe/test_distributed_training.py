"""Issue 7: a tiny transformer LM trained by 2 gloo ranks on CPU under DDP and FSDP2, a Probe on
every rank. What rank 0 writes must equal the statistics of the synchronised, unsharded tensors
the ranks hold (float32 rounding of a written scalar; histogram counts exactly) and those of a
single-process float64 run of the same global batches (float32 training rounding); a NaN
planted on rank 1 only must be attributed on rank 0; ``per_rank=True`` writes ``rank<r>``."""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import pytest
import torch

import tbprobe
from tbprobe.probe.anomaly import parse_markdown
from tests.probe import dist_harness as H
from tests.probe.util import read_run

# Relative tolerances. TIGHT: a written float32 scalar vs float64 statistics of the very same
# tensors. LOOSE: float32 training vs the float64 reference; measured in one process (the
# control test) at <= 4e-7, except update ratios (<= 4e-5: ||w_after - w_before|| cancels
# float32 rounding of w, ~1 for LayerNorm weights, against an update of ~1e-3).
TIGHT = 1e-6
LOOSE = {"update_ratio": 2e-4}
LOOSE_OTHERS = 1e-5
FAMILIES = ("grad_norm", "param_norm", "update_ratio", "act_rms", "act_absmax", "outgrad_rms")
HIST_FAMILIES = ("grad_hist", "param_hist", "act_hist")
PLANTED = {"module": "blocks.1.fc1", "pass_": "forward", "step": 1}
pytestmark = pytest.mark.filterwarnings("ignore:tbprobe:RuntimeWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario, in one spawn of two ranks: ``(out dir, spawn error or None)``."""
    out = str(tmp_path_factory.mktemp("dist"))
    return out, H.run_scenarios(out)


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


# ---------------------------------------------------------------- expected values
def _flat(ts) -> np.ndarray:
    return np.concatenate([t.detach().double().numpy().ravel() for t in ts])


def _hist(x: np.ndarray):
    """The probe's bins: ``BINS`` linear bins over the finite range (numpy's rule)."""
    x = x[np.isfinite(x)]
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, H.BINS + 1)
    return edges, np.histogram(x, edges)[0], x


def expected(run: dict, steps: int, act_ranks) -> dict:
    """``{"scalars": {tag: {step: v}}, "histos": {tag: {step: (edges, counts, values)}}}``."""
    sc, hi = {}, {}

    def put(table, tag, step, v):
        table.setdefault(tag, {})[step] = v

    for step in range(steps):
        grads, before, after = run["grads"][step], run["before"][step], run["after"][step]
        total = 0.0
        for n, g in grads.items():
            x = _flat([g])
            put(sc, f"grad_norm/{n}", step, math.sqrt(x @ x))
            total += x @ x
            w, d = _flat([after[n]]), _flat([before[n]]) - _flat([after[n]])
            put(sc, f"param_norm/{n}", step, math.sqrt(w @ w))
            put(sc, f"update_ratio/{n}", step, math.sqrt(d @ d) / math.sqrt(w @ w))
            put(hi, f"grad_hist/{n}", step, _hist(x))
            put(hi, f"param_hist/{n}", step, _hist(w))
        put(sc, "grad_norm/_total", step, math.sqrt(total))
        for m in run["acts"][(step, act_ranks[0])]:
            a = _flat([run["acts"][(step, r)][m] for r in act_ranks])
            put(sc, f"act_rms/{m}", step, math.sqrt(a @ a / a.size))
            put(sc, f"act_absmax/{m}", step, float(np.abs(a).max()))
            put(hi, f"act_hist/{m}", step, _hist(a))
            g = _flat([run["outgrads"][(step, r)][m] for r in act_ranks])
            put(sc, f"outgrad_rms/{m}", step, math.sqrt(g @ g / g.size))
    return {"scalars": sc, "histos": hi}


def _near_edges(x: np.ndarray, edges: np.ndarray, tol: float) -> int:
    """How many values lie within ``tol`` of an inner edge (they may change bins)."""
    inner = edges[1:-1]
    return int((np.abs(x[:, None] - inner[None, :]).min(1) <= tol).sum()) if inner.size else 0


def mismatches(written: dict, want: dict, loose: bool = False, families=None) -> list[str]:
    """Every difference between what was written and ``want``, as readable lines. Tight:
    scalars to ``TIGHT``, histogram edges to 1e-12 and counts equal. Loose: ``LOOSE``, and
    counts may differ only by values within rounding of an edge. The written edges are
    ``bucket_limit`` (the upper edges)."""
    keep = (lambda tag: tag.split("/")[0] in families) if families else (lambda tag: True)
    bad = []
    for tag, by_step in want["scalars"].items():
        rtol = LOOSE.get(tag.split("/")[0], LOOSE_OTHERS) if loose else TIGHT
        for step, v in by_step.items() if keep(tag) else ():
            got = written["scalars"].get(tag, {}).get(step)
            if got is None:
                bad.append(f"{tag} @{step}: not written (expected {v:.7g})")
            elif not math.isclose(got, v, rel_tol=rtol):
                bad.append(f"{tag} @{step}: wrote {got:.7g}, expected {v:.7g}")
    for tag, by_step in want["histos"].items():
        for step, (edges, counts, x) in by_step.items() if keep(tag) else ():
            h = written["histos"].get(tag, {}).get(step)
            if h is None:
                bad.append(f"{tag} @{step}: not written")
                continue
            limits, got = np.array(h.bucket_limit), np.array(h.bucket, dtype=np.int64)
            span = edges[-1] - edges[0]
            etol = LOOSE_OTHERS if loose else 1e-12
            if limits.shape != edges[1:].shape or not np.allclose(
                limits, edges[1:], rtol=etol, atol=etol * span
            ):
                bad.append(f"{tag} @{step}: edges {limits[[0, -1]]} != {edges[[1, -1]]}")
                continue
            moved = _near_edges(x, edges, etol * span) if loose else 0
            if got.sum() != counts.sum() or np.abs(got - counts).sum() > 2 * moved:
                bad.append(f"{tag} @{step}: counts differ in {int((got != counts).sum())} bins")
    fams = {t.split("/")[0] for t in [*want["scalars"], *want["histos"]] if keep(t)}
    for kind in ("scalars", "histos"):
        extra = [t for t in written[kind] if t.split("/")[0] in fams and t not in want[kind]]
        bad += [f"{t}: written but not expected" for t in sorted(extra)]
    return bad


def _report(bad: list[str], what: str) -> str:
    """A summary: how many tags are missing, wrong, unexpected, and a few of each."""
    kinds = {"not written": [], "written but not expected": [], "wrong": []}
    for line in bad:
        key = next((k for k in kinds if k in line), "wrong")
        kinds[key].append(line)
    parts = [f"{len(bad)} mismatches with {what}:"]
    for k, lines in kinds.items():
        if lines:
            parts += [f"  {len(lines)} {k}, e.g.:"] + [f"    {x}" for x in lines[:6]]
    return "\n".join(parts)


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
    assert not bad, _report(bad, "its own tensors")
    assert not probe.errors
    # The reference's activations of both ranks are the global batch's; its output gradients
    # are of each rank's own mean loss (WORLD times those of the global mean): not compared.
    fams = [f for f in FAMILIES + HIST_FAMILIES if f != "outgrad_rms"]
    bad = mismatches(written, expected(ref64, 3, [0, 1]), loose=True, families=fams)
    assert not bad, _report(bad, "the float64 reference")


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
    (bins over the global finite range)."""
    dumps = H.load(runs, name)
    assert not _probe_errors(dumps), _probe_errors(dumps)
    act_ranks = [0] if name == "ddp" else [0, 1]
    written = read_run(os.path.join(runs[0], name, "run"))
    bad = mismatches(written, expected(H.truth(dumps), 3, act_ranks))
    assert not bad, _report(bad, "the tensors the ranks held")


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_rank0_writes_the_single_process_reference(runs, ref64, name):
    """Rank 0's tags equal those of the single-process float64 run of the same global
    batches, to float32 training rounding (counts: up to values within rounding of an edge)."""
    H.load(runs, name)
    act_ranks = [0] if name == "ddp" else [0, 1]
    written = read_run(os.path.join(runs[0], name, "run"))
    bad = mismatches(written, expected(ref64, 3, act_ranks), loose=True)
    assert not bad, _report(bad, "the float64 single-process reference")


@pytest.mark.parametrize("name", ["ddp_nan", "fsdp_nan"])
def test_nan_planted_on_rank1_is_attributed_on_rank0(runs, name):
    """A NaN in blocks.1.fc1's forward output on rank 1 only, at step 1: rank 0's first
    anomaly names that module, pass and step, as made there; so does its anomaly text."""
    dumps = H.load(runs, name)
    found = dumps[0]["anomalies"]
    assert found, f"rank 0 found nothing (rank 1 found {dumps[1].get('anomalies')})"
    first = found[0]
    assert {k: first[k] for k in PLANTED} == PLANTED, first
    assert (first["kind"], first["producer"]) == ("nonfinite", True), first
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
        assert not bad, _report(bad, f"rank {r}'s tensors")


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
