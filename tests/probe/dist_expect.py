"""What a probe should write for a run of :mod:`tests.probe.dist_harness`, computed here in
float64 from the tensors themselves, and the differences with what it wrote.

Histograms come in two binnings: a rank-local tensor (one device, DDP's replicated grads and
params, rank 0's activations) gets ``BINS`` linear bins over its finite range; a tensor binned
over the ranks (FSDP2's DTensors, activations with ``reduce_activations``) gets TensorBoard's
fixed "tensorflow" edges, trimmed to the occupied bins and one empty bin before them.
"""

from __future__ import annotations

import math

import numpy as np

from tbprobe import kernels
from tests.probe import dist_harness as H

# Relative tolerances. TIGHT: a written float32 scalar vs float64 statistics of the very same
# tensors. LOOSE: float32 training vs the float64 reference; measured in one process (the
# control test) at <= 4e-7, except update ratios (<= 4e-5: ||w_after - w_before|| cancels
# float32 rounding of w, ~1 for LayerNorm weights, against an update of ~1e-3).
TIGHT = 1e-6
LOOSE = {"update_ratio": 2e-4}
LOOSE_OTHERS = 1e-5
TF_EDGES = kernels.tensorflow_edges().numpy()


def _flat(ts) -> np.ndarray:
    return np.concatenate([t.detach().double().numpy().ravel() for t in ts])


def hist(x: np.ndarray, tf: bool = False):
    """``(edges, counts, finite values)`` as the probe bins ``x``: ``BINS`` linear bins over
    the finite range (numpy's rule), or with ``tf`` the trimmed "tensorflow" bins (``edges``
    then spans the kept bins: the written bucket limits are ``edges[1:]``)."""
    x = x[np.isfinite(x)]
    if tf:
        counts = np.histogram(x, TF_EDGES)[0]
        occupied = np.flatnonzero(counts)
        start, end = int(occupied[0]), int(occupied[-1]) + 1
        assert start > 0, "values below -9.9e19: not in this test's data"
        return TF_EDGES[start - 1 : end + 1], counts[start - 1 : end], x
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, H.BINS + 1)
    return edges, np.histogram(x, edges)[0], x


def expected(run: dict, steps, act_ranks, tf: bool = False, hist_steps=None) -> dict:
    """``{"scalars": {tag: {step: v}}, "histos": {tag: {step: (edges, counts, values)}}}`` at
    ``steps`` (an int: ``range(steps)``); histograms at ``hist_steps`` (default all), binned
    over the ranks with ``tf``. A module's activations are those of the ``act_ranks`` that
    ran it."""
    steps = range(steps) if isinstance(steps, int) else steps
    hist_steps = set(steps if hist_steps is None else hist_steps)
    sc, hi = {}, {}

    def put(table, tag, step, v):
        table.setdefault(tag, {})[step] = v

    for step in steps:
        grads, before, after = run["grads"][step], run["before"][step], run["after"][step]
        histos = step in hist_steps
        total = 0.0
        for n, g in grads.items():
            x = _flat([g])
            put(sc, f"grad_norm/{n}", step, math.sqrt(x @ x))
            total += x @ x
            w, d = _flat([after[n]]), _flat([before[n]]) - _flat([after[n]])
            put(sc, f"param_norm/{n}", step, math.sqrt(w @ w))
            put(sc, f"update_ratio/{n}", step, math.sqrt(d @ d) / math.sqrt(w @ w))
            if histos:
                put(hi, f"grad_hist/{n}", step, hist(x, tf))
                put(hi, f"param_hist/{n}", step, hist(w, tf))
        put(sc, "grad_norm/_total", step, math.sqrt(total))
        acts = [run["acts"].get((step, r), {}) for r in act_ranks]
        outgrads = [run["outgrads"].get((step, r), {}) for r in act_ranks]
        for m in dict.fromkeys(m for held in acts for m in held):  # a module some rank ran
            a = _flat([held[m] for held in acts if m in held])
            put(sc, f"act_rms/{m}", step, math.sqrt(a @ a / a.size))
            put(sc, f"act_absmax/{m}", step, float(np.abs(a).max()))
            if histos:
                put(hi, f"act_hist/{m}", step, hist(a, tf))
            g = _flat([held[m] for held in outgrads if m in held])
            put(sc, f"outgrad_rms/{m}", step, math.sqrt(g @ g / g.size))
    return {"scalars": sc, "histos": hi}


def _near_edges(x: np.ndarray, edges: np.ndarray, tol: float) -> int:
    """How many values lie within rounding of an inner edge, ``tol`` times the scale of
    ``x`` (they may change bins; near 0, where the "tensorflow" edges are dense, values that
    are rounding noise, like the gradient of a key bias, may land in any bin)."""
    inner = edges[1:-1]
    if not inner.size:
        return 0
    dist = np.abs(x[:, None] - inner[None, :]).min(1)
    scale = max(edges[-1] - edges[0], np.abs(x).max())
    return int((dist <= tol * scale).sum())


def _stats_mismatch(h, x: np.ndarray, rtol: float) -> str | None:
    """The histogram proto's num, min, max, sum and sum of squares against ``x``'s."""
    if h.num != x.size:
        return f"num {h.num} != {x.size}"
    for what, got, want in (("min", h.min, x.min()), ("max", h.max, x.max())):
        if not math.isclose(got, want, rel_tol=rtol, abs_tol=1e-300):
            return f"{what} {got!r} != {want!r}"
    if abs(h.sum - x.sum()) > rtol * np.abs(x).sum():
        return f"sum {h.sum!r} != {x.sum()!r}"
    if not math.isclose(h.sum_squares, x @ x, rel_tol=rtol):
        return f"sum_squares {h.sum_squares!r} != {x @ x!r}"
    return None


def _hist_mismatch(h, want, loose: bool) -> str | None:
    edges, counts, x = want
    limits, got = np.array(h.bucket_limit), np.array(h.bucket, dtype=np.int64)
    tf = np.isin(edges, TF_EDGES).all()
    span = edges[-1] - edges[0]
    etol = LOOSE_OTHERS if loose else 1e-12
    if limits.shape != edges[1:].shape or not np.allclose(
        limits, edges[1:], rtol=etol, atol=0 if tf else etol * span
    ):
        return f"edges {limits[[0, -1]]} != {edges[[1, -1]]}"
    moved = _near_edges(x, edges, etol) if loose else 0
    if got.sum() != counts.sum() or np.abs(got - counts).sum() > 2 * moved:
        return f"counts differ in {int((got != counts).sum())} bins"
    bad = _stats_mismatch(h, x, LOOSE_OTHERS if loose else TIGHT)
    return f"stats: {bad}" if bad else None


def mismatches(written: dict, want: dict, loose: bool = False, families=None) -> list[str]:
    """Every difference between what was written and ``want``, as readable lines. Tight:
    scalars to ``TIGHT``, histogram edges to 1e-12 and counts equal. Loose: ``LOOSE``, and
    counts may differ only by values within rounding of an edge. The written edges are
    ``bucket_limit`` (the upper edges); the histograms' stats are checked too."""
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
        for step, w in by_step.items() if keep(tag) else ():
            h = written["histos"].get(tag, {}).get(step)
            why = "not written" if h is None else _hist_mismatch(h, w, loose)
            if why:
                bad.append(f"{tag} @{step}: {why}")
    fams = {t.split("/")[0] for t in [*want["scalars"], *want["histos"]] if keep(t)}
    for kind in ("scalars", "histos"):
        extra = [t for t in written[kind] if t.split("/")[0] in fams and t not in want[kind]]
        bad += [f"{t}: written but not expected" for t in sorted(extra)]
    return bad


def report(bad: list[str], what: str) -> str:
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
