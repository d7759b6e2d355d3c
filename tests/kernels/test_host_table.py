"""The fp32 table kernel: dense keys, the key count, and the split fold of large inputs (a
helper takes the statistics in big blocks while the caller counts keys), against numpy."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tbprobe import kernels
from tbprobe.kernels import host, host_table
from tbprobe.kernels.reference import STAT_NAMES
from tests.kernels.catalogue import stats_reference

_SPECIAL_F32 = np.array(
    [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45, 1e-40, -1e-40]
    + [1.17549435e-38, -1.17549435e-38, 3.4028235e38, -3.4028235e38, 1e-12, -1e-12, 1.0, -1.0]
    + [9.92e19, -9.92e19, 1e25, -1e25],  # beyond the last default edge
    dtype=np.float32,
)
# NaNs with the sign bit set and signalling NaNs: other bit patterns than np.nan's
_ODD_NANS = np.array([0xFFC00000, 0xFF800001, 0x7F800001, 0x7FFFFFFF], np.uint32).view(np.float32)
_EDGE_SETS = {
    "tensorflow": kernels.tensorflow_edges().numpy(),
    "mixed": np.array([-3.0, -1.0, 0.0, 0.5, 2.0000001, 5.0]),
    "infinite": np.array([-math.inf, -1.0, 0.0, 1.0, math.inf]),
    "negative": np.array([-5.0, -2.0]),
    "linear": np.linspace(-3, 3, 65),
}
_CROWDED = np.linspace(-4, 4, 1001)  # several bounds per region: the sort kernel


def _oracle(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.histogram(x.astype(np.float64), edges)[0]


def _with_specials(n: int, seed: int, edges: np.ndarray) -> np.ndarray:
    """``(n,)`` fp32 normal noise with every special value, values on the (rounded) edges and
    values one ulp either side of them, scattered over the whole array."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    finite = edges[np.isfinite(edges)].astype(np.float32)
    down = np.nextafter(finite, np.float32(-np.inf))
    up = np.nextafter(finite, np.float32(np.inf))
    on = np.concatenate((finite, down, up))
    specials = np.concatenate((np.repeat(_SPECIAL_F32, 7), np.repeat(_ODD_NANS, 5), on))
    x[rng.choice(n, len(specials), replace=False)] = specials
    return x


def _check_stats(got: np.ndarray, x: torch.Tensor) -> None:
    """Counts, min/max and non-finite counts exactly; the fp64 sum within 1e-12 of the sum of
    magnitudes (the inputs cancel ±3.4e38); the sum of squares within 1e-6."""
    ref = stats_reference(x)
    exact = [i for i, k in enumerate(STAT_NAMES) if k not in ("sum", "sum_sq")]
    np.testing.assert_array_equal(got[exact], ref[exact])
    xd = x.double().numpy().reshape(-1)
    fin = xd[np.isfinite(xd)]
    i_sum, i_sq = STAT_NAMES.index("sum"), STAT_NAMES.index("sum_sq")
    assert abs(got[i_sum] - math.fsum(fin)) <= 1e-12 * np.abs(fin).sum()
    np.testing.assert_allclose(got[i_sq], ref[i_sq], rtol=1e-6)


def _check(x: np.ndarray, edges: np.ndarray) -> None:
    h = kernels.histogram(x, edges)
    np.testing.assert_array_equal(h.counts.numpy(), _oracle(x, edges))
    _check_stats(h.stats.numpy(), torch.from_numpy(x))


@pytest.mark.parametrize("name", list(_EDGE_SETS))
def test_keys_step_exactly_at_every_bound(name):
    """The key of a bit pattern is the number of bounds at or below it, at, just below and
    just above every bound and at random patterns (what makes the counts exact)."""
    x, _ = host_table._thresholds(_EDGE_SETS[name])
    plan = host_table.TablePlan.for_edges(_EDGE_SETS[name])
    bounds = np.unique(np.concatenate((x, [host_table._SIGN], host_table._ZERO_BOUNDS)))
    rng = np.random.default_rng(0)
    probe = np.concatenate((bounds - 1, bounds, bounds + 1, rng.integers(0, 2**32, 100_000)))
    probe = probe[(probe >= 0) & (probe < 2**32)]
    keys = host_table._keys_of(probe, plan.table, plan.r_bits)
    np.testing.assert_array_equal(keys, np.searchsorted(bounds, probe, side="right"))
    assert plan.n_keys == len(bounds) + 1


def test_count_matches_bincount_of_keys_for_every_bit_pattern_class():
    """The kernel's count (table lookup, int16 keys, torch.bincount slices) equals a bincount
    of the oracle keys, on random bit patterns (NaNs and denormals included) over several
    slices."""
    plan = host_table.TablePlan.for_edges(_EDGE_SETS["tensorflow"])
    rng = np.random.default_rng(1)
    u = rng.integers(0, 2**32, 3 * host_table.COUNT_SLICE + 5, dtype=np.uint32)
    hist = np.zeros(plan.n_keys, np.int64)
    plan.count(u.view(np.float32), hist)
    want = np.bincount(host_table._keys_of(u, plan.table, plan.r_bits), minlength=plan.n_keys)
    np.testing.assert_array_equal(hist, want)


@pytest.mark.parametrize("name", list(_EDGE_SETS))
def test_split_fold_matches_numpy(name):
    """A large fp32 input (the split fold) gives numpy's counts and the fp64 statistics, with
    NaN, ±Inf, ±0, denormals, values on and beside every edge and beyond the last one."""
    edges = _EDGE_SETS[name]
    x = _with_specials(host.SPLIT_MIN + 12_345, seed=2, edges=edges)
    assert isinstance(host._plan(x, edges), host_table.TablePlan)
    _check(x, edges)


def test_crowded_edges_take_the_sort_kernel_and_match_numpy():
    """Edges too crowded for a key table fall back to the sort kernel, still exact."""
    x = _with_specials(host.SPLIT_MIN + 1, seed=9, edges=_CROWDED)
    assert host_table.TablePlan.for_edges(_CROWDED) is None
    _check(x, _CROWDED)


def test_split_fold_without_nonfinite_and_all_nonfinite_block():
    """Blocks of only NaN/Inf and blocks with none both fold right in the split path."""
    edges = _EDGE_SETS["tensorflow"]
    x = np.random.default_rng(3).standard_normal(host.SPLIT_MIN + 7).astype(np.float32)
    _check(x, edges)
    x[: host.STATS_BLOCK] = np.float32(math.nan)
    x[host.STATS_BLOCK : host.STATS_BLOCK + 1000] = np.float32(-math.inf)
    _check(x, edges)


def test_split_fold_one_cpu_and_busy_pool(monkeypatch):
    """With one CPU, and with a pool too busy to start the helper, the caller folds the
    statistics itself and the result is unchanged."""
    edges = _EDGE_SETS["tensorflow"]
    x = _with_specials(host.SPLIT_MIN + 99, seed=4, edges=edges)
    both = kernels.histogram(x, edges)
    monkeypatch.setattr(host, "_cpus", lambda: 1)
    one = kernels.histogram(x, edges)
    monkeypatch.undo()

    release = threading.Event()
    busy = ThreadPoolExecutor(max_workers=1)
    busy.submit(release.wait, 30)  # occupies the only worker: the helper cannot start
    monkeypatch.setattr(host, "_executor", lambda: busy)
    try:
        stalled = kernels.histogram(x, edges)
    finally:
        release.set()
        busy.shutdown()
    for h in (one, stalled):
        np.testing.assert_array_equal(h.counts.numpy(), both.counts.numpy())
        np.testing.assert_allclose(h.stats.numpy(), both.stats.numpy(), rtol=1e-12)
    np.testing.assert_array_equal(both.counts.numpy(), _oracle(x, edges))


def test_non_contiguous_large_input():
    """A strided fp32 view over the split threshold histograms like its contiguous copy."""
    edges = _EDGE_SETS["tensorflow"]
    base = _with_specials(2 * host.SPLIT_MIN + 10, seed=5, edges=edges)
    view = torch.from_numpy(base)[::2]
    h = kernels.histogram(view)
    np.testing.assert_array_equal(h.counts.numpy(), _oracle(view.contiguous().numpy(), edges))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_large_other_dtypes(dtype):
    """fp16 (table kernel, widened per chunk), bf16 (widened to fp32: split fold) and int32
    (sort kernel) inputs over the split threshold give numpy's counts and statistics."""
    x = torch.from_numpy(_with_specials(host.SPLIT_MIN + 3, seed=6, edges=_EDGE_SETS["mixed"]))
    x = x.nan_to_num(0.0, 1e4, -1e4) if dtype == torch.int32 else x
    x = x.to(dtype)
    h = kernels.histogram(x)
    xd = x.double().numpy()
    np.testing.assert_array_equal(h.counts.numpy(), _oracle(xd, _EDGE_SETS["tensorflow"]))
    _check_stats(h.stats.numpy(), x)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, host_table.COUNT_SLICE + 1])
def test_small_inputs(n):
    """One element, fewer than eight (no fp32 rows of squares) and one past a count slice."""
    vals = np.array([1.5, -0.0, 1e-40, 2.0, -3.0, 7.25, 0.0, -1e-12, 4.0, math.nan], np.float32)
    _check(np.resize(vals, n), _EDGE_SETS["tensorflow"])


def test_empty_input_has_no_counts():
    """An empty array folds to zero counts and identity statistics (the writer raises before)."""
    h = kernels.histogram(np.zeros(0, np.float32))
    assert h.counts.sum().item() == 0 and h.stats[0].item() == 0


def test_int32_keys_when_bounds_exceed_int16():
    """Edge sets with more than 32766 bounds count with int32 keys and stay exact."""
    regions = np.arange(0, 0x7F80, dtype=np.uint32)  # every positive 2**16-pattern region
    pos = ((regions << 16) | 0x8000).view(np.float32).astype(np.float64)
    neg = -pos[1000:1300][::-1]
    edges = np.concatenate((neg, pos))
    plan = host_table.TablePlan.for_edges(edges)
    assert plan is not None and plan.key_dtype == np.int32 and plan.r_bits == 16
    x = _with_specials(200_000, seed=8, edges=edges[::97])
    x[:4000] = edges[1000:5000].astype(np.float32)
    h = kernels.histogram(x, edges)
    np.testing.assert_array_equal(h.counts.numpy(), _oracle(x, edges))


def test_a_forked_child_histograms_even_if_the_pool_lock_was_held_at_the_fork():
    """The child of a fork taken while another thread held the pool's lock gets a fresh lock
    and pool: its first large histogram completes (it would deadlock otherwise)."""
    import os
    import select

    import torch

    from tbprobe import kernels
    from tbprobe.kernels import host

    x = torch.randn(host.SPLIT_MIN + 5, generator=torch.Generator().manual_seed(0))
    want = kernels.histogram(x).counts.sum().item()
    read_end, write_end = os.pipe()
    with host._pool_lock:  # as if another thread were creating the pool right now
        pid = os.fork()
        if pid == 0:  # the child
            try:
                got = kernels.histogram(x).counts.sum().item()
                os.write(write_end, str(got).encode())
            finally:
                os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 60)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung on the histogram pool's lock")
    got = int(os.read(read_end, 64).decode() or -1)
    os.waitpid(pid, 0)
    assert got == want == x.numel()
