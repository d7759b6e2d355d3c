"""The diagnosis' running baselines: medians and recent maxima of ring-buffered series."""

from __future__ import annotations

import numpy as np
import pytest

from tbprobe.probe.diagnosis_baseline import Baselines


@pytest.mark.parametrize("seed", range(5))
def test_median_equals_nanmedian_of_the_stored_values(seed):
    """Series at every fill state (empty, partial, wrapped) give np.median of what they hold."""
    rng = np.random.default_rng(seed)
    base = Baselines(window=8, warmup=2, min_history=3)
    names = [f"s{i}" for i in range(6)]
    rows = base.rows(names)
    held = {n: [] for n in names}
    for step in range(20):
        vals = rng.lognormal(size=len(names))
        vals[rng.random(len(names)) < 0.2] = np.nan  # dropped, never stored
        live = rng.random(len(names)) < 0.7  # some series are not observed every step
        base.push(rows[live], vals[live])
        for n, v, on in zip(names, vals, live, strict=True):
            if on and np.isfinite(v):
                held[n].append(v)
        got = base.median(rows)
        for j, n in enumerate(names):
            stored = held[n][base.warmup :][-base.window :]
            if len(stored) < base.min_history:
                assert np.isnan(got[j]), (step, n)
            else:
                assert got[j] == np.median(stored), (step, n, stored)


def test_median_of_an_even_count_averages_the_middle_pair():
    base = Baselines(window=4, warmup=0, min_history=1)
    rows = base.rows(["a"])
    for v in (4.0, 1.0, 3.0, 2.0, 10.0):  # the 4.0 falls out of the window
        base.push(rows, np.array([v]))
    assert base.median(rows)[0] == 2.5  # median of 1, 3, 2, 10


def test_recent_max_skips_the_latest_values():
    base = Baselines(window=8, warmup=0, min_history=1)
    rows = base.rows(["a"])
    for v in (1.0, 2.0, 9.0, 3.0, 4.0):
        base.push(rows, np.array([v]))
    assert base.recent_max(rows, 2, 2)[0] == 9.0
    assert np.isnan(base.recent_max(base.rows(["new"]), 0, 1)[0])
    with pytest.raises(ValueError, match="count"):
        base.recent_max(rows, 5, 5)


@pytest.mark.parametrize("seed", range(3))
def test_observe_is_median_recent_max_and_push_in_one(seed):
    """observe() returns what median() and recent_max() return before push(), the largest
    stored value besides, and leaves the same buffer as push()."""
    rng = np.random.default_rng(seed)
    a, b = (Baselines(window=6, warmup=1, min_history=2) for _ in range(2))
    names = [f"s{i}" for i in range(4)]
    for _ in range(25):
        vals = rng.lognormal(size=4)
        vals[rng.random(4) < 0.2] = np.nan
        ra, rb = a.rows(names), b.rows(names)
        med, peak, top = a.observe(ra, vals, 1, 3)
        want_med, want_peak = b.median(rb), b.recent_max(rb, 1, 3)
        held = [b.buf[r, b.window - b.stored[r] :] for r in rb]
        want_top = [h.max() if len(h) else np.nan for h in held]
        b.push(rb, vals)
        np.testing.assert_array_equal(med, want_med)
        np.testing.assert_array_equal(peak, want_peak)
        np.testing.assert_array_equal(top, want_top)
        np.testing.assert_array_equal(a.buf, b.buf)
        np.testing.assert_array_equal(a.stored, b.stored)


@pytest.mark.parametrize("seed", range(4))
def test_observe_matches_plain_lists_whatever_the_order_of_the_names(seed):
    """Series observed in changing orders and subsets (rows gathered) and in their first
    order (rows read as a slice) give the median, recent maximum and largest value of plain
    Python lists of what each series stored."""
    rng = np.random.default_rng(seed)
    base = Baselines(window=5, warmup=1, min_history=2)
    names = [f"s{i}" for i in range(5)]
    held: dict[str, list[float]] = {n: [] for n in names}
    seen = dict.fromkeys(names, 0)
    for step in range(40):
        shuffled = [names[i] for i in rng.permutation(5)[: rng.integers(1, 6)]]
        pick = names if step % 3 else shuffled  # names: their first order, the slice path
        vals = rng.lognormal(size=len(pick))
        vals[rng.random(len(pick)) < 0.15] = np.inf
        med, peak, top = base.observe(base.rows(pick), vals, 1, 2)
        for j, n in enumerate(pick):
            h = held[n]
            want_med = np.median(h) if len(h) >= 2 else np.nan
            recent = h[::-1][1:3]
            np.testing.assert_equal(med[j], want_med)
            np.testing.assert_equal(peak[j], max(recent) if recent else np.nan)
            np.testing.assert_equal(top[j], max(h) if h else np.nan)
            if np.isfinite(vals[j]):
                seen[n] += 1
                if seen[n] > 1:
                    held[n] = (h + [vals[j]])[-5:]
