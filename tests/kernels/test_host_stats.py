"""CPU statistics with a finite short path: ``host_stats.tensor_stats`` against the float64
oracle, and the non-finite counts' shortcut."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tbprobe import kernels
from tbprobe.kernels import host_stats
from tbprobe.kernels.reference import stats_row

EXACT = [0, 3, 4, 5, 6, 7, 8, 9]  # count, min, max, abs_max, nan, +inf, -inf, zeros


def _big(dtype, seed, n=host_stats.BIG + 1234):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 3 + 0.5).to(dtype)
    x[::5] = 0.0
    return x


def _check(got: torch.Tensor, tensors) -> None:
    for i, t in enumerate(tensors):
        want = stats_row(t)
        assert torch.equal(got[i, EXACT], want[EXACT]), (i, got[i], want)
        for col in (1, 2):  # sum, sum_sq: within 1e-6 of float64 (the kernels' contract)
            assert float(got[i, col]) == pytest.approx(float(want[col]), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_float_tensors_match_the_float64_oracle(dtype, monkeypatch):
    """Finite large tensors (short path), a NaN/Inf-laden one and small, integer and fp64
    tensors (batched exact path) in one list, rows in input order."""
    from tbprobe.kernels import reference_many

    batched = []
    orig = reference_many.tensor_stats
    monkeypatch.setattr(
        reference_many, "tensor_stats", lambda ts: batched.append(len(ts)) or orig(ts)
    )
    laden = _big(dtype, 1)
    laden[7], laden[11], laden[13] = math.nan, math.inf, -math.inf
    strided = _big(dtype, 2, 3 * host_stats.BIG)[::3]  # non-contiguous
    tensors = [
        _big(dtype, 0).view(-1, 2),
        torch.arange(7),
        laden,
        strided,
        torch.randn(5, dtype=torch.float64),
        torch.zeros(host_stats.BIG, dtype=dtype),
        torch.ones(0, dtype=dtype),
    ]
    got = host_stats.tensor_stats(tensors)
    assert got.dtype == torch.float64 and got.shape == (len(tensors), 10)
    _check(got, tensors)
    assert batched == [4]  # arange, the laden one, fp64, the empty one: 3 took the short path
    assert torch.equal(kernels.tensor_stats(tensors), got)  # the CPU dispatch takes it


def test_finite_values_whose_fp32_sum_overflows_take_the_exact_path():
    x = torch.full((host_stats.BIG,), 3e38)  # finite, but the fp32 sum is inf
    x[1] = -3e38
    got = host_stats.tensor_stats([x])
    _check(got, [x])
    assert got[0, 6:9].sum() == 0 and np.isfinite(float(got[0, 1]))


def test_large_sum_with_cancellation_stays_within_the_contract():
    """1e7 zero-mean values: the fp64 sum of the short path is within 1e-6 of float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_000_000, generator=g)
    _check(host_stats.tensor_stats([x]), [x])


LEAN = [0, 3, 4, 5, 6, 7, 8]  # count, min, max, abs_max, nan, +inf, -inf: exact in lean rows


@pytest.mark.parametrize("kind", ["gauss", "near_equal", "relu"])
@pytest.mark.parametrize("n", [3, host_stats.BIG + 7, 1 << 20, 10_000_019])
def test_lean_rows_match_the_float64_oracle_in_the_columns_they_fill(kind, n):
    """lean_row / lean_stats (the probe's CPU rows): count and extremes exact, sum_sq within
    1e-6 of float64 up to 1e7 elements (near-equal values are the worst case for one long
    dot), sum and zeros NaN; without extremes the extremes are NaN too."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    if kind == "near_equal":
        x = 1.0 + 1e-3 * x
    elif kind == "relu":
        x = x.relu()
    want = stats_row(x).numpy()
    rows = [np.array(host_stats.lean_row(x)), host_stats.lean_stats([x]).numpy()[0]]
    for got in rows:
        assert got[LEAN].tolist() == want[LEAN].tolist()
        assert got[2] == pytest.approx(want[2], rel=1e-6)
        assert math.isnan(got[1]) and math.isnan(got[9])
    bare = host_stats.lean_stats([x], extremes=False).numpy()[0]
    assert bare[[0, 6, 7, 8]].tolist() == want[[0, 6, 7, 8]].tolist()
    assert bare[2] == pytest.approx(want[2], rel=1e-6)
    assert np.isnan(bare[[1, 3, 4, 5, 9]]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_lean_rows_of_other_float_dtypes_and_non_finite_tensors(dtype):
    """Half precision is widened (no overflow of squares: 300² > fp16's max), float64 kept;
    a tensor with NaN/±Inf, an integer and an empty tensor get their full exact rows."""
    x = torch.full((BIG_PLUS := host_stats.BIG + 3,), 300.0, dtype=dtype)
    row = host_stats.lean_row(x)
    assert row[0] == BIG_PLUS and row[2] == pytest.approx(BIG_PLUS * 9e4, rel=1e-6)
    assert row[3:6] == [300.0, 300.0, 300.0]
    bad = _big(dtype, 1)
    bad[[3, 9]] = math.nan
    bad[4] = -math.inf
    for t in (bad, torch.arange(7), torch.zeros(0, dtype=dtype)):
        want = stats_row(t).numpy()
        for got in (host_stats.lean_row(t), host_stats.lean_stats([t], extremes=False)[0]):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def test_nonfinite_count_of_one_tensor_is_exact():
    """nonfinite_count: 0 for finite and integer tensors, the exact count otherwise (fp8,
    fp64, non-contiguous tensors too), also where a finite fp16 sum or fp32 sum of squares
    overflows."""
    x = torch.tensor([1.0, math.nan, math.inf, -math.inf, 2.0])
    assert host_stats.nonfinite_count(x) == 3.0
    assert host_stats.nonfinite_count(torch.full((10,), 6e4, dtype=torch.float16)) == 0.0
    assert host_stats.nonfinite_count(torch.arange(5)) == 0.0
    f8 = torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn)
    assert host_stats.nonfinite_count(f8) == 0.0
    assert host_stats.nonfinite_count(x.half()) == 3.0
    big = torch.full((8,), 1e30)  # finite, but its fp32 sum of squares overflows
    assert host_stats.nonfinite_count(big) == 0.0
    assert host_stats.nonfinite_count(big.double()) == 0.0
    strided = torch.tensor([[1.0, math.nan], [2.0, 3.0]]).t()  # not contiguous: the sum path
    assert host_stats.nonfinite_count(strided) == 1.0
    assert host_stats.nonfinite_count(x.double()) == 3.0


@pytest.mark.parametrize("n", [100, host_stats.BIG + 5, host_stats.ONE_DOT + 9])
def test_lean_rows_of_tiny_values_do_not_underflow(n):
    """Gradients of 1e-25 (fp32 squares underflow to 0) still get their sum of squares within
    1e-6 (a vanishing gradient is not reported as exactly 0); an all-zero tensor reads 0."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-25
    want = float(x.double().square().sum())
    assert want > 0
    for got in (
        host_stats.lean_row(x)[2],
        host_stats.lean_row(x, extremes=False)[2],
        float(host_stats.lean_stats([x], extremes=False)[0, 2]),
    ):
        assert got == pytest.approx(want, rel=1e-6)
    zero = torch.zeros(n)
    assert host_stats.lean_row(zero)[2] == 0.0
    assert float(host_stats.lean_stats([zero], extremes=False)[0, 2]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_small_tensors_share_one_float64_pass(dtype):
    """lean_stats without extremes of many tiny tensors of one dtype (one flat float64
    pass): sums of squares within 1e-12 of float64 also for tiny values (fp32 squares would
    underflow) and huge ones (fp32 squares would overflow), all-zero and non-contiguous
    tensors; a tensor with NaN/±Inf gets its full exact row. Mixed dtypes, and larger tensors,
    take the _foreach_norm path and agree within 1e-6."""
    g = torch.Generator().manual_seed(7)
    ts = [torch.randn(n, generator=g, dtype=dtype) for n in (1, 17, 256, 300)]
    ts += [torch.randn(64, generator=g, dtype=dtype) * 1e-25, torch.zeros(9, dtype=dtype)]
    ts += [torch.full((5,), 1e30, dtype=dtype), torch.randn(12, 10, dtype=dtype).t()]
    bad = torch.randn(40, generator=g, dtype=dtype)
    bad[[2, 7]] = math.nan
    bad[11] = -math.inf
    ts.append(bad)
    got = host_stats.lean_stats(ts, extremes=False).numpy()
    for i, t in enumerate(ts[:-1]):
        want = float(t.double().square().sum())
        assert got[i, 0] == t.numel() and got[i, 6:9].tolist() == [0.0, 0.0, 0.0]
        assert got[i, 2] == pytest.approx(want, rel=1e-12, abs=0.0), i
        assert np.isnan(got[i, [1, 3, 4, 5, 9]]).all()
    np.testing.assert_allclose(got[-1], stats_row(bad).numpy(), rtol=1e-12)
    mixed = host_stats.lean_stats([*ts[:4], ts[0].half(), ts[1].half()], extremes=False).numpy()
    np.testing.assert_allclose(mixed[:4, 2], got[:4, 2], rtol=1e-6)
    larger = [*ts[:-1], torch.randn(20000, generator=g, dtype=dtype)]  # > FLAT_AVG each
    np.testing.assert_allclose(
        host_stats.lean_stats(larger, extremes=False).numpy()[:-1, 2], got[:-1, 2], rtol=1e-6
    )
