"""``SummaryWriter._add_scalar_batch``: many scalars of one step in one event, read back as
if each had been written by ``add_scalar``."""

from __future__ import annotations

import math

import pytest

from tbprobe import SummaryWriter

from .conftest import accumulate, values_by_tag


def test_batch_reads_back_like_one_add_scalar_per_tag(tmp_path):
    tags = ["grad_norm/fc.weight", "grad_norm/_total", "act rms/fc", "huge", "nan", "neg"]
    values = [0.5, 3.0, 1e-3, 1e39, math.nan, -2.25]
    for name, batched in (("batch", True), ("single", False)):
        with SummaryWriter(str(tmp_path / name)) as w:
            for step in (0, 7, 300):
                if batched:
                    w._add_scalar_batch(tags, [v * (step + 1) for v in values], step)
                else:
                    for t, v in zip(tags, values, strict=True):
                        w.add_scalar(t, v * (step + 1), step)
    got, want = accumulate(str(tmp_path / "batch")), accumulate(str(tmp_path / "single"))
    assert sorted(got.Tags()["scalars"]) == sorted(want.Tags()["scalars"])
    assert "act_rms/fc" in got.Tags()["scalars"]  # cleaned like add_scalar's tags
    for tag in want.Tags()["scalars"]:
        g = [(e.step, e.value) for e in got.Scalars(tag)]
        w = [(e.step, e.value) for e in want.Scalars(tag)]
        assert len(g) == len(w) == 3, tag
        for (gs, gv), (ws, wv) in zip(g, w, strict=True):
            assert gs == ws and (gv == wv or (math.isnan(gv) and math.isnan(wv))), tag
    assert got.Scalars("huge")[0].value == math.inf
    by_tag = values_by_tag(str(tmp_path / "batch"))  # our strict reader agrees
    assert [s for s, _ in by_tag["grad_norm/_total"]] == [0, 7, 300]


def test_batch_follows_log_freq_and_checks_lengths(tmp_path):
    with SummaryWriter(str(tmp_path), log_freq=10) as w:
        w._add_scalar_batch(["a"], [1.0], 3)  # not a multiple of log_freq: nothing
        w._add_scalar_batch(["a"], [2.0], 20)
        w._add_scalar_batch([], [], 30)  # nothing to write
        with pytest.raises(ValueError, match="values"):
            w._add_scalar_batch(["a", "b"], [1.0], 40)
    assert [(e.step, e.value) for e in accumulate(str(tmp_path)).Scalars("a")] == [(20, 2.0)]
