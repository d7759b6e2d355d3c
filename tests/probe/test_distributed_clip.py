"""Gradient clipping between the backward pass and the optimizer step on 2 gloo ranks: rank
0's grad_norm/_total is the global gradient's norm before clipping (what clip_grad_norm_
returns), under DDP (after its all-reduce) and FSDP2 (over the shards)."""

from __future__ import annotations

import os

import pytest

from tests.probe import dist_harness as H
from tests.probe.util import read_run

pytestmark = pytest.mark.filterwarnings("ignore:tbprobe:RuntimeWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_clip"))
    return out, H.run_scenarios(out, H.CLIP_NAMES, timeout_s=90)


@pytest.mark.parametrize("name", H.CLIP_NAMES)
def test_grad_norm_is_taken_before_clipping(runs, name):
    dumps = H.load(runs, name)
    assert [d["probe_errors"] for d in dumps] == [[], []]
    pre = dumps[0]["preclip"]
    assert pre == pytest.approx(dumps[1]["preclip"], rel=1e-6)  # the same global gradient
    assert min(pre) > 10 * 1e-3  # the clip changed every step's gradients
    got = read_run(os.path.join(runs[0], name, "run"))["scalars"]["grad_norm/_total"]
    assert [got[s] for s in range(len(pre))] == pytest.approx(pre, rel=1e-5)
