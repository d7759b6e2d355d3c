"""Training loops on 2 gloo ranks that touch the gradients or steps around the probe, under
DDP and FSDP2. Gradient clipping after the last of 2 accumulated backward passes: rank 0's
grad_norm/_total is the global gradient's norm before clipping (what clip_grad_norm_
returns), and its gradient histograms are of that same unclipped gradient. A second optimizer
stepping the head after the probed one: update_ratio of the probed optimizer's parameters,
none of the head's (as on one device)."""

from __future__ import annotations

import os

import pytest

from tests.probe import dist_harness as H
from tests.probe.dist_expect import expected, mismatches, report
from tests.probe.util import read_run

pytestmark = pytest.mark.filterwarnings("ignore:tbprobe:RuntimeWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_clip"))
    return out, H.run_scenarios(out, H.CLIP_NAMES + H.TWO_OPT_NAMES + H.VIEW_NAMES, timeout_s=120)


def _written(runs, name: str) -> dict:
    return read_run(os.path.join(runs[0], name, "run"))


@pytest.mark.parametrize("name", H.CLIP_NAMES)
def test_grad_norm_is_taken_before_clipping(runs, name):
    dumps = H.load(runs, name)
    assert [d["probe_errors"] for d in dumps] == [[], []]
    pre = dumps[0]["preclip"]
    assert pre == pytest.approx(dumps[1]["preclip"], rel=1e-6)  # the same global gradient
    assert min(pre) > 10 * 1e-3  # the clip changed every step's gradients
    got = _written(runs, name)["scalars"]["grad_norm/_total"]
    assert [got[s] for s in range(len(pre))] == pytest.approx(pre, rel=1e-5)


@pytest.mark.parametrize("name", H.CLIP_NAMES)
def test_grad_hists_are_taken_before_clipping(runs, name):
    """On the histogram steps (0 and 2) grad_hist/<param> is the histogram of the accumulated
    gradient before clipping, exactly (bins, counts, min, max, sum, sum of squares), like
    grad_norm/<param>: binned over the ranks under FSDP2, rank 0's own under DDP; and the
    end of the backward pass syncs nothing with the host."""
    dumps = H.load(runs, name)
    assert [d["probe_errors"] for d in dumps] == [[], []]
    run = dict(H.truth(dumps), grads=dumps[0]["preclip_grads"])
    sc = H.SCENARIO[name]
    want = expected(run, sc.steps, [0], tf=sc.wrap == "fsdp", hist_steps=[0, 2])
    bad = mismatches(_written(runs, name), want, families=("grad_norm", "grad_hist"))
    assert not bad, report(bad, "the gradients before clipping")
    assert [d["syncs"] for d in dumps] == [[], []]


@pytest.mark.parametrize("name", H.TWO_OPT_NAMES)
def test_update_ratio_with_a_second_optimizer(runs, name):
    """The probe watches the optimizer of every parameter but the head's; a second one steps
    the head after it. update_ratio/<param> of the probed optimizer's parameters is their
    update at its step; the head gets param_norm but no update_ratio (its update is not seen;
    not 0.0)."""
    dumps = H.load(runs, name)
    assert [d["probe_errors"] for d in dumps] == [[], []]
    sc = H.SCENARIO[name]
    want = expected(H.truth(dumps), sc.steps, [0])
    head = f"update_ratio/{sc.second_opt}"
    want["scalars"] = {t: v for t, v in want["scalars"].items() if not t.startswith(head)}
    assert len([t for t in want["scalars"] if t.startswith("update_ratio/")]) > 10
    got = _written(runs, name)
    bad = mismatches(got, want, families=("param_norm", "update_ratio"))
    assert not bad, report(bad, "the updates of the probed optimizer")
    assert set(got["scalars"][f"param_norm/{sc.second_opt}.weight"]) == set(range(sc.steps))


def test_ddp_bucket_view_gradients_are_the_reduced_ones(runs):
    """DDP(gradient_as_bucket_view=True) points each ``.grad`` at its all-reduced bucket
    after the gradient hooks ran: grad_norm and grad_hist are of the global gradient (the
    one the optimizer steps with), not of rank 0's local one, on every step."""
    name = "ddp_bucket_view"
    dumps = H.load(runs, name)
    assert [d["probe_errors"] for d in dumps] == [[], []]
    sc = H.SCENARIO[name]
    want = expected(H.truth(dumps), sc.steps, [0], hist_steps=[0, 2])
    bad = mismatches(_written(runs, name), want, families=("grad_norm", "grad_hist"))
    assert not bad, report(bad, "the all-reduced gradients")
