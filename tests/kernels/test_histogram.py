"""Histograms and statistics of the torch reference and the host path against numpy in fp64."""

import math

import numpy as np
import pytest
import torch

from tbprobe import kernels
from tbprobe.kernels import reference
from tbprobe.kernels.reference import STAT_NAMES
from tests.kernels.catalogue import DTYPES
from tests.kernels.catalogue import stats_reference as _stats_reference

SHAPES = [(), (1,), (17,), (1024,), (1041,), (311, 384), (5, 9999), (0,), (3, 0, 4)]
BINS = ["tensorflow", 1, 7, 64, [-3.0, -1.0, 0.0, 0.5, 2.0000001, 5.0]]


def _sample(shape, dtype, seed=0, nonfinite=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if dtype.is_floating_point:
        x = x.to(dtype)
        if nonfinite and x.numel() >= 4 and dtype not in (torch.float8_e4m3fn,):
            flat = x.view(-1)
            flat[0], flat[1], flat[2] = math.nan, math.inf, -math.inf
        elif nonfinite and x.numel() >= 4:  # e4m3fn has NaN but no infinities
            x.view(-1)[0] = math.nan
        return x
    if dtype == torch.bool:
        return x > 0
    info = torch.iinfo(dtype)
    return (x * 10).clamp(info.min, info.max).to(dtype)


def _np_reference(x, bins):
    xd = x.double().numpy().reshape(-1)
    if bins == "tensorflow":
        return np.histogram(xd, kernels.tensorflow_edges().numpy())
    if isinstance(bins, int):
        finite = xd[np.isfinite(xd)]
        return np.histogram(finite, bins)
    return np.histogram(xd, bins)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bins", BINS, ids=str)
def test_counts_equal_numpy_every_dtype(dtype, bins):
    """Host and torch-reference counts equal np.histogram(x.double()) exactly, every dtype."""
    x = _sample((311, 384), dtype)
    ref_counts, ref_edges = _np_reference(x, bins)
    h = kernels.histogram(x, bins)
    assert h.counts.dtype == torch.int64
    np.testing.assert_array_equal(h.counts.numpy(), ref_counts)
    np.testing.assert_array_equal(h.edges.numpy(), ref_edges)
    ref = reference.bin_counts(x, torch.from_numpy(ref_edges))
    np.testing.assert_array_equal(ref.numpy(), ref_counts)
    np.testing.assert_allclose(h.stats.numpy(), _stats_reference(x), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_counts_and_stats_every_shape(shape):
    """Odd, zero-size and scalar shapes give numpy's counts and fp64 statistics."""
    x = _sample(shape, torch.float32, seed=1, nonfinite=False)
    for bins in ("tensorflow", 10):
        ref_counts, _ = _np_reference(x, bins)
        h = kernels.histogram(x, bins)
        np.testing.assert_array_equal(h.counts.numpy(), ref_counts)
        np.testing.assert_allclose(h.stats.numpy(), _stats_reference(x), rtol=1e-6)
        np.testing.assert_allclose(reference.stats_row(x).numpy(), _stats_reference(x), rtol=1e-9)


def test_noncontiguous_and_transposed():
    """Non-contiguous and transposed inputs histogram like their contiguous copies."""
    base = _sample((64, 96), torch.float32, seed=2)
    for x in (base.t(), base[::3, 1::2], base.t()[5:]):
        ref_counts, _ = _np_reference(x.contiguous(), 16)
        np.testing.assert_array_equal(kernels.histogram(x, 16).counts.numpy(), ref_counts)


def test_nonfinite_counted_apart_and_never_poison():
    """NaN/±Inf are counted in stats, left out of bins, and never reach min/max/sum."""
    x = torch.tensor([1.0, -2.0, math.nan, math.inf, -math.inf, math.nan, 0.0])
    h = kernels.histogram(x, 4)
    stats = dict(zip(STAT_NAMES, h.stats.tolist(), strict=True))
    assert stats == {
        "count": 3,
        "sum": -1.0,
        "sum_sq": 5.0,
        "min": -2.0,
        "max": 1.0,
        "abs_max": 2.0,
        "nan": 2,
        "pos_inf": 1,
        "neg_inf": 1,
        "zeros": 1,
    }
    assert int(h.counts.sum()) == 3


def test_all_nan_uses_numpy_default_range():
    """With no finite value, integer bins span [0, 1] like numpy's empty-input default."""
    h = kernels.histogram(torch.full((10,), math.nan), 4)
    np.testing.assert_array_equal(h.edges.numpy(), np.linspace(0, 1, 5))
    assert int(h.counts.sum()) == 0
    assert h.stats[3].item() == math.inf and h.stats[4].item() == -math.inf


def test_range_and_constant_input():
    """An explicit range and a constant input follow numpy's edge rules."""
    x = torch.full((100,), 3.0)
    np.testing.assert_array_equal(
        kernels.histogram(x, 3).edges.numpy(), np.histogram(x.double().numpy(), 3)[1]
    )
    y = _sample((1000,), torch.float32, nonfinite=False)
    got = kernels.histogram(y, 5, range=(-1, 1))
    ref = np.histogram(y.double().numpy(), 5, range=(-1, 1))
    np.testing.assert_array_equal(got.counts.numpy(), ref[0])
    np.testing.assert_array_equal(got.edges.numpy(), ref[1])


def test_large_parallel_path_matches_numpy():
    """Arrays big enough for the parallel sort give numpy's counts and fp64 sums (1e-6)."""
    x = _sample((3_000_017,), torch.float32, seed=3)
    ref_counts, _ = _np_reference(x, "tensorflow")
    h = kernels.histogram(x)
    np.testing.assert_array_equal(h.counts.numpy(), ref_counts)
    np.testing.assert_allclose(h.stats.numpy(), _stats_reference(x), rtol=1e-6)


def test_numpy_input_and_edge_values():
    """numpy arrays work, and values on edges follow [e_i, e_i+1) with the last bin closed."""
    edges = [0.0, 1.0, 2.0, 3.0]
    x = np.array([0.0, 1.0, 2.0, 3.0, 3.0, -0.0, 2.9999], dtype=np.float32)
    np.testing.assert_array_equal(kernels.histogram(x, edges).counts.numpy(), [2, 1, 4])


@pytest.mark.parametrize(
    "bins, error",
    [
        ("auto", ValueError),
        (0, ValueError),
        (True, TypeError),
        ([1.0], ValueError),
        ([2.0, 1.0], ValueError),
        ([0.0, math.nan], ValueError),
        ({"a": 1}, TypeError),
    ],
)
def test_bad_bins(bins, error):
    """Bad bins raise a clear error naming the argument."""
    with pytest.raises(error, match="bins"):
        kernels.histogram(torch.ones(3), bins)


def test_bad_inputs():
    """Complex tensors and bad ranges raise TypeError/ValueError naming the argument."""
    with pytest.raises(TypeError, match="complex"):
        kernels.histogram(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="range"):
        kernels.histogram(torch.ones(3), 4, range=(2, 1))
    with pytest.raises(TypeError, match="x"):
        kernels.histogram("abc")
    with pytest.raises(ValueError, match="tensors"):
        kernels.tensor_stats([])


def test_tensor_stats_rows():
    """tensor_stats gives one float64 STAT_NAMES row per tensor."""
    ts = [_sample((7, 5), torch.float32, seed=s) for s in range(3)] + [torch.zeros(0)]
    out = kernels.tensor_stats(ts)
    assert out.shape == (4, len(STAT_NAMES)) and out.dtype == torch.float64
    for row, t in zip(out, ts, strict=True):
        np.testing.assert_allclose(row.numpy(), _stats_reference(t), rtol=1e-9)


# ----------------------------------------------------------------------------- host kernels

_SPECIAL_F32 = np.array(
    [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 1e-12, -1e-12, 3.4e38, -3.4e38]
    + [1.0, -1.0, 2.0, 0.5, 9.9e19, -9.9e19, 1.17549435e-38],
    dtype=np.float32,
)
_NEG_NAN = np.array([0xFFC00000, 0xFF800001, 0x7F800001], dtype=np.uint32).view(np.float32)
_EDGE_SETS = [
    "tensorflow",
    [-3.0, -1.0, 0.0, 0.5, 2.0000001, 5.0],
    [-math.inf, 0.0, math.inf],
    [-math.inf, -1.0],
    [0.0, 1.0, 2.0, 3.0],
    [-5.0, -2.0],
    [-1e39, 1e39],
    [0.0, 0.0, 1.0],
    [-0.0, 0.0],
    [1e-45, 2e-45, 1e-40],  # crowded: the table kernel cannot separate them, the sort kernel does
    list(np.linspace(-4, 4, 1001)),
]


def _host_oracle(x: np.ndarray, edges) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        xd = x.astype(np.float64)
    return np.histogram(xd, np.asarray(edges, dtype=np.float64))[0]


@pytest.mark.parametrize("edges", _EDGE_SETS, ids=lambda e: e if isinstance(e, str) else len(e))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=str)
def test_host_kernels_special_values_every_edge_set(edges, dtype):
    """Both host kernels count zeros, ±0, subnormals, ±Inf, NaNs of either sign and values
    on the edges exactly like np.histogram on fp64, over several chunks and threads."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(200_003) * 4).astype(dtype)
    tf = kernels.tensorflow_edges().numpy()
    if dtype == np.float32:
        x[: len(_SPECIAL_F32)] = _SPECIAL_F32
        x[20:23] = _NEG_NAN
        x[30:1030] = rng.choice(tf, 1000).astype(np.float32)  # on (rounded) edges
    h = kernels.histogram(x, edges)
    bins = tf if isinstance(edges, str) else edges
    np.testing.assert_array_equal(h.counts.numpy(), _host_oracle(x, bins))
    with np.errstate(invalid="ignore"):  # signalling NaNs raise 'invalid' when widened
        xd = x.astype(np.float64)
    fin = xd[np.isfinite(xd)]
    got = dict(zip(STAT_NAMES, h.stats.tolist(), strict=True))
    assert got["count"] == fin.size and got["zeros"] == np.sum(xd == 0)
    assert got["nan"] == np.isnan(xd).sum() and got["pos_inf"] == np.sum(xd == math.inf)
    assert got["min"] == fin.min() and got["max"] == fin.max()
    np.testing.assert_allclose(got["sum_sq"], (fin * fin).sum(), rtol=1e-6)


def test_host_sum_of_squares_within_1e6_on_adversarial_bf16():
    """fp64 sum of squares stays within 1e-6 on bf16 values whose fp32 squares all round the
    same way, and on values whose squares underflow or overflow fp32."""
    g = torch.Generator().manual_seed(7)
    base = (1 + torch.rand(3_000_000, generator=g) * 2**-7).bfloat16()  # mantissas near 1
    for x in (base, base * 1e-20, base * 1e-30, base * 3e18, base * 1e-42):
        h = kernels.histogram(x)
        xd = x.double().numpy()
        np.testing.assert_allclose(h.stats[2].item(), (xd * xd).sum(), rtol=1e-6)
        np.testing.assert_allclose(h.stats[1].item(), xd.sum(), rtol=1e-9)


def test_host_parallel_chunks_match_one_thread(monkeypatch):
    """Histograms split over many chunks and threads equal the single-thread result."""
    from tbprobe.kernels import host

    x = _sample((1_000_003,), torch.float32, seed=11)
    many = kernels.histogram(x)
    monkeypatch.setattr(host, "_cpus", lambda: 1)
    one = kernels.histogram(x)
    np.testing.assert_array_equal(many.counts.numpy(), one.counts.numpy())
    np.testing.assert_allclose(many.stats.numpy(), one.stats.numpy(), rtol=1e-12)


def test_bins_and_range_that_numpy_refuses_are_refused():
    """A float bin count, 2-D edges and a range whose width overflows float64 raise, naming
    the argument, instead of giving NaN edges or flattened ones; the fp32 maximum as data
    bins without a warning."""
    import warnings

    from tbprobe import kernels

    x = torch.ones(3)
    with pytest.raises(TypeError, match=r"bins: expected 'tensorflow', an int or edges, got 2.5"):
        kernels.histogram(x, bins=2.5)
    with pytest.raises(ValueError, match=r"bins: edges must be 1-D"):
        kernels.histogram(x, bins=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"range: max - min overflows float64"):
        kernels.histogram(x, bins=4, range=(-1.7e308, 1.7e308))
    fm = torch.finfo(torch.float32).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = kernels.histogram(torch.tensor([fm, -fm, 0.0]), bins=7)
    assert h.counts.tolist() == [1, 0, 0, 1, 0, 0, 1]
