"""Triton histograms under the interpreter: counts equal np.histogram(x.double(), edges) exactly."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the @triton.jit module is imported

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tbprobe import kernels  # noqa: E402
from tbprobe.kernels import reference  # noqa: E402
from tbprobe.kernels import triton_histogram as th  # noqa: E402
from tests.kernels.catalogue import DTYPES

pytestmark = pytest.mark.interpreter

INF = math.inf
EDGES = [-3.0, -1.0, 0.0, 0.5, 2.0000001, 5.0]
EDGES_DUP_INF = [-INF, -3.0, -1.0, -1.0, 0.0, 0.5, 2.0, 2.0, 5.0, INF]
BINS = {  # id -> (bins, range)
    "tensorflow": ("tensorflow", None),
    "int": (7, None),
    "int_range": (7, (-3, 5)),
    "edges": (EDGES, None),
    "edges_dup_inf": (EDGES_DUP_INF, None),
}
SHAPES = [(), (1,), (17,), (1024,), (1041,), (311, 384), (5, 9999), (0,), (3, 0, 4)]
ALL_BITS_16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)  # every 16-bit pattern
ALL_BITS_8 = torch.arange(1 << 8, dtype=torch.int32).to(torch.uint8)
signalling_nan_cast = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")


def _sample(shape, dtype, seed=0, nonfinite=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if x.numel() >= 8:  # values exactly on edges, and ±0.0
        x.view(-1)[3:8] = torch.tensor([-1.0, 0.0, -0.0, 5.0, 0.5])
    if dtype.is_floating_point:
        x = x.to(dtype)
        if nonfinite and x.numel() >= 4:
            x.view(-1)[0] = math.nan
            if dtype != torch.float8_e4m3fn:  # e4m3fn has NaN but no infinities
                x.view(-1)[1:3] = torch.tensor([math.inf, -math.inf])
        return x
    if dtype == torch.bool:
        return x > 0
    info = torch.iinfo(dtype)
    return (x * 10).clamp(info.min, info.max).to(dtype)


def _numpy(x, bins, range_=None):
    """numpy's (counts, edges) for x.double(), NaN/Inf left out when numpy picks the range."""
    xd = x.double().numpy().reshape(-1)
    if bins == "tensorflow":
        return np.histogram(xd, kernels.tensorflow_edges().numpy())
    if isinstance(bins, int) and range_ is None:
        return np.histogram(xd[np.isfinite(xd)], bins)
    return np.histogram(xd, bins, range=range_)


def _assert_matches_numpy(h, x, bins, range_=None):
    counts, edges = _numpy(x, bins, range_)
    assert h.counts.dtype == torch.int64 and h.edges.dtype == torch.float64
    np.testing.assert_array_equal(h.edges.numpy(), edges)
    np.testing.assert_array_equal(h.counts.numpy(), counts)
    rule = np.histogram(x.double().numpy().reshape(-1), h.edges.numpy())[0]  # searchsorted rule
    np.testing.assert_array_equal(h.counts.numpy(), rule)


def _neighbours(edges: torch.Tensor) -> list[torch.Tensor]:
    """The edges, and the next representable values above and below each, in edges' dtype."""
    up = torch.nextafter(edges, torch.full_like(edges, INF))
    down = torch.nextafter(edges, torch.full_like(edges, -INF))
    return [edges, up, down]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(BINS))
def test_every_dtype_every_bins_kind(dtype, case):
    """Counts and edges equal numpy's for every dtype and every way of giving bins."""
    bins, range_ = BINS[case]
    x = _sample((37, 129), dtype)
    _assert_matches_numpy(th.histogram(x, bins, range=range_), x, bins, range_)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape_catalogue(shape):
    """Scalars, odd, prime and zero-size shapes give numpy's counts; zero-size gives zeros."""
    x = _sample(shape, torch.float32, seed=1)
    for bins in ("tensorflow", 10):
        h = th.histogram(x, bins)
        _assert_matches_numpy(h, x, bins)
        assert int(h.counts.sum()) == int(torch.isfinite(x).sum())


def test_noncontiguous_and_transposed():
    """Strided, transposed and sliced inputs histogram like their contiguous copies."""
    base = _sample((64, 96), torch.float32, seed=2)
    for x in (base.t(), base[::3, 1::2], base.t()[5:], base.view(-1)[::7]):
        assert not x.is_contiguous()
        for bins in ("tensorflow", 16, EDGES):
            _assert_matches_numpy(th.histogram(x, bins), x.contiguous(), bins)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nan_and_inf_laden(dtype):
    """A third NaN and a fifth ±Inf: never counted, except ±Inf on an infinite outer edge."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5003, generator=g, dtype=torch.float64) * 2
    u = torch.rand(5003, generator=g)
    x[u < 0.33] = math.nan
    x[(u > 0.5) & (u < 0.6)] = INF
    x[(u > 0.6) & (u < 0.7)] = -INF
    x = x.to(dtype)
    for bins, range_ in [*BINS.values(), ([-INF, 0.0, 1.0], None), ([0.0, 1.0, INF], None)]:
        _assert_matches_numpy(th.histogram(x, bins, range=range_), x, bins, range_)
    h = th.histogram(torch.full((100,), math.nan, dtype=dtype), 4)
    np.testing.assert_array_equal(h.edges.numpy(), np.linspace(0, 1, 5))
    assert int(h.counts.sum()) == 0


def _edge_cases():
    g = torch.Generator().manual_seed(4)
    lin = torch.from_numpy(np.linspace(-3.3, 7.1, 98))
    odd = torch.sort(torch.randn(300, generator=g, dtype=torch.float64) * 5).values
    odd = torch.cat([odd[:100], odd[99:101], odd[100:]])  # one duplicated edge
    return [("tensorflow", kernels.tensorflow_edges()), ("linear", lin), ("edges", odd)]


@pytest.mark.parametrize(
    "kind, edges", _edge_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_on_and_next_to_edges(kind, edges, dtype):
    """x = each edge, and its next value up and down (fp64 and fp32): exact with every kind.

    Each set holds at most one value per bin and side, so a bin found one off shows in the
    counts; for "tensorflow" this checks the log guess plus one correction at every edge."""
    for x in _neighbours(edges.to(dtype)):
        got = th.bin_counts(x, edges, kind)
        np.testing.assert_array_equal(got.numpy(), np.histogram(x.double(), edges.numpy())[0])
    if kind == "linear":  # numpy's own fast path agrees too
        n, lo, hi = edges.numel() - 1, float(edges[0]), float(edges[-1])
        for x in _neighbours(edges.to(dtype)):
            ref = np.histogram(x.double().numpy(), n, range=(lo, hi))[0]
            np.testing.assert_array_equal(th.bin_counts(x, edges, kind).numpy(), ref)


def test_tensorflow_bins_across_the_fp64_range():
    """Log-uniform magnitudes from 1e-300 to 1e300 of both signs, subnormals and ±0.0."""
    g = torch.Generator().manual_seed(5)
    mag = 10.0 ** (torch.rand(20000, generator=g, dtype=torch.float64) * 600 - 300)
    sign = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0).double()
    x = torch.cat([mag * sign, torch.tensor([0.0, -0.0, 5e-324, -5e-324, 1.7e308, -1.7e308])])
    edges = kernels.tensorflow_edges()
    np.testing.assert_array_equal(
        th.bin_counts(x, edges, "tensorflow").numpy(), np.histogram(x.numpy(), edges.numpy())[0]
    )


@signalling_nan_cast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_value(dtype):
    """All 65536 fp16/bf16 values (subnormals, ±0.0, ±Inf, NaNs) with every kind of bins."""
    x = ALL_BITS_16.view(dtype)
    tiny = [-6e-8, -1e-8, -0.0, 1e-8, 6e-5, 1e-3]  # fp16 subnormals sit below 6.1e-5
    for bins, range_ in [*BINS.values(), (tiny, None), (9, (-1e-4, 1e-4))]:
        _assert_matches_numpy(th.histogram(x, bins, range=range_), x, bins, range_)


@signalling_nan_cast
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_fp8_value(dtype):
    """All 256 fp8 values with every kind of bins."""
    x = ALL_BITS_8.view(dtype)
    for bins, range_ in BINS.values():
        _assert_matches_numpy(th.histogram(x, bins, range=range_), x, bins, range_)


def test_int64_rounds_like_numpy():
    """int64 beyond 2^53 is compared after numpy's rounding to float64 (ties to even)."""
    big = 2**53
    x = torch.tensor([big + d for d in range(-4, 6)] + [2**62 + 1, -(2**63), 2**63 - 1])
    ends = [-(2.0**63), big - 2.0, big, big + 2.0, big + 4.0, 2.0**62, 2.0**63]
    edges = torch.tensor(ends, dtype=torch.float64)
    np.testing.assert_array_equal(
        th.bin_counts(x, edges, "edges").numpy(), np.histogram(x.double(), edges.numpy())[0]
    )
    for bins in ("tensorflow", 5, [float(big), big + 2.0, big + 4.0]):
        _assert_matches_numpy(th.histogram(x, bins), x, bins)


def test_more_bins_than_registers_hold():
    """Over 2047 bins the kernel adds each element atomically: still numpy's counts."""
    g = torch.Generator().manual_seed(6)
    x = _sample((4099,), torch.float32, seed=7)
    many = torch.sort(torch.randn(3000, generator=g, dtype=torch.float64) * 4).values
    for bins in (5000, many.tolist(), [-INF, *many[::2].tolist(), INF]):
        _assert_matches_numpy(th.histogram(x, bins), x, bins)


@pytest.mark.parametrize("case", list(BINS))
def test_histogram_many_matches_single(case):
    """The batched form (mixed dtypes, sizes, zero-size) equals numpy per tensor."""
    bins, range_ = BINS[case]
    tensors = [
        _sample((311,), torch.float32, seed=8),
        _sample((17,), torch.float16, seed=9),
        _sample((0,), torch.bfloat16),
        _sample((5, 7), torch.int64, seed=10).t(),
        _sample((33,), torch.bool, seed=11),
        _sample((64,), torch.float8_e5m2, seed=12),
        _sample((1041,), torch.float32, seed=13),
        _sample((200, 201), torch.float32, seed=15),  # several programs, several blocks each
        torch.full((9,), math.nan),
    ]
    results = th.histogram_many(tensors, bins, range=range_)
    assert len(results) == len(tensors)
    for h, x in zip(results, tensors, strict=True):
        if isinstance(bins, int) and range_ is None and not torch.isfinite(x.double()).any():
            np.testing.assert_array_equal(h.edges.numpy(), np.linspace(0, 1, bins + 1))
            assert int(h.counts.sum()) == 0
            continue
        _assert_matches_numpy(h, x, bins, range_)
        np.testing.assert_allclose(h.stats.numpy(), reference.stats_row(x).numpy(), rtol=1e-6)


def test_linear_edges_kernel_equals_numpy_linspace():
    """The one-launch linear edges equal numpy's linspace bit for bit, row by row: ranges from
    stats, equal ends widened by 0.5, no finite element giving 0..1, tiny (step 0) ranges."""
    from tbprobe.kernels import triton_edges

    lo = [-3.3, 0.0, 1e-300, -1e10, 2.5, 7.0, 2.0**52 + 1, 0.0, 5e-324, -0.1]
    hi = [7.1, 1.0, 3e-300, 1e10 + 1, 2.5 + 2**-40, 7.0, 2.0**52 + 1, 0.0, 1e-323, 1e300]
    stats = torch.zeros(len(lo), 10, dtype=torch.float64)
    stats[:, 0] = 5.0
    stats[:, 3] = torch.tensor(lo, dtype=torch.float64)
    stats[:, 4] = torch.tensor(hi, dtype=torch.float64)
    stats[7, 0] = 0.0  # no finite element: numpy's 0..1
    for n_bins in (1, 13, 64, 1500):
        rows = triton_edges.linear_edges_from_stats(stats, n_bins)
        for r, (a, b) in enumerate(zip(lo, hi, strict=True)):
            a, b = (0.0, 1.0) if r == 7 else (a, b)
            want = triton_edges.uniform_range((a, b), n_bins)
            np.testing.assert_array_equal(rows[r].numpy(), want)
            if a == b:
                np.testing.assert_array_equal(want, np.linspace(a - 0.5, b + 0.5, n_bins + 1))


@pytest.mark.parametrize(
    "kind, edges", _edge_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_poisoned_surroundings_stay_untouched(kind, edges):
    """No bin is written outside the counts (poisoned around), and no element past numel is
    read (the input is a slice of a poisoned buffer whose extra values would be counted)."""
    n = edges.numel() - 1
    buf = torch.full((n + 128,), -7, dtype=torch.int64)
    counts = buf[64 : 64 + n]
    counts.zero_()
    source = torch.full((9000,), float(edges[n // 2]))  # every value would land in one bin
    source[100:8100] = _sample((8000,), torch.float32, seed=14)
    x = source[100:8100]
    expected = np.histogram(x.double(), edges.numpy())[0]
    th._launch_one(x, edges, kind, counts)
    assert (buf[:64] == -7).all() and (buf[64 + n :] == -7).all()
    np.testing.assert_array_equal(counts.numpy(), expected)

    buf = torch.full((2 * n + 128,), -7, dtype=torch.int64)  # the batched launch, two rows
    rows = buf[64 : 64 + 2 * n].view(2, n)
    rows.zero_()
    tail = source[8100:]
    th._launch_many([x, tail], edges, 0, kind, rows)
    assert (buf[:64] == -7).all() and (buf[64 + 2 * n :] == -7).all()
    np.testing.assert_array_equal(rows[0].numpy(), expected)
    np.testing.assert_array_equal(rows[1].numpy(), np.histogram(tail.double(), edges.numpy())[0])


def test_bad_inputs():
    """Complex inputs, bad kinds and wrong edges raise errors naming the argument."""
    with pytest.raises(TypeError, match="x: complex"):
        th.histogram(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"tensors\[1\]: complex"):
        th.histogram_many([torch.ones(3), torch.ones(3, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="tensors"):
        th.histogram_many([])
    two = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="kind"):
        th.bin_counts(torch.ones(3), two, "log")
    with pytest.raises(ValueError, match="edges"):
        th.bin_counts(torch.ones(3), two, "tensorflow")
    with pytest.raises(TypeError, match="edges"):
        th.bin_counts(torch.ones(3), torch.tensor([0.0, 1.0], dtype=torch.float32))
    with pytest.raises(ValueError, match="bins"):
        th.histogram(torch.ones(3), 0)


# One large int64, its own min == max: numpy widens to (v - 0.5, v + 0.5), a range a few
# float64 ulps wide, so linspace repeats edges (the GPU check's int64[]/bins64 failures).
BIG_INT64 = [1513956522011077, -483821196629905, 2**52 + 1, 2**53 + 2, -(2**62), 2**63 - 1]


@pytest.mark.parametrize("v", BIG_INT64)
def test_large_int64_min_equals_max_repeats_edges(v):
    """min == max at a large int64: the element lands in the last of the repeated edges."""
    for x in (torch.tensor(v), torch.tensor([v, v, v])):
        h = th.histogram(x, 64)
        lo, hi = float(v) - 0.5, float(v) + 0.5
        np.testing.assert_array_equal(h.edges.numpy(), np.linspace(lo, hi, 65))
        want = np.histogram(x.double().numpy().reshape(-1), h.edges.numpy())[0]
        np.testing.assert_array_equal(h.counts.numpy(), want)
    hs = th.histogram_many([torch.tensor([v]), torch.tensor([v], dtype=torch.float64)], 64)
    for h in hs:
        want = np.histogram(np.array([float(v)]), h.edges.numpy())[0]
        np.testing.assert_array_equal(h.counts.numpy(), want)


def test_narrow_linear_range_uses_exact_search():
    """A range a few ulps wide (repeated edges) given explicitly: numpy's searchsorted rule."""
    x = torch.tensor([1.0, 1.0 + 2**-52, 1.0 + 2**-51, 1.0 + 3 * 2**-52], dtype=torch.float64)
    for range_ in [(1.0, 1.0 + 2**-50), (1.0, 1.0)]:
        h = th.histogram(x, 16, range=range_)
        want = np.histogram(x.numpy(), h.edges.numpy())[0]
        np.testing.assert_array_equal(h.counts.numpy(), want)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32,
              torch.int64, torch.int16],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("kind", ["tensorflow", "linear"])
def test_edges_and_neighbours_in_narrow_dtypes(dtype, kind):
    """Each edge and its fp64 neighbours, rounded to a narrow float or integer dtype, land in
    numpy's bin (the O(1) guess plus the near-edge correction)."""
    if kind == "tensorflow":
        edges = kernels.tensorflow_edges()
    else:
        edges = torch.from_numpy(np.linspace(-300.0, 500.0, 129))
    values = torch.cat(_neighbours(edges))
    if dtype.is_floating_point:
        big = torch.finfo(dtype).max
        x = values.clamp(-big, big).to(dtype)
    else:
        info = torch.iinfo(dtype)
        x = values.clamp(info.min, info.max).round().to(dtype)
        x = torch.cat([x, x + 1, x - 1])
    got = th.bin_counts(x, edges, kind)
    np.testing.assert_array_equal(got.numpy(), np.histogram(x.double(), edges.numpy())[0])


def test_tensorflow_window_moves_between_blocks():
    """Blocks whose values span few bins (counted in the moving window) at magnitudes far
    apart, a block spanning every bin (the full histogram), NaN, zeros and both signs."""
    g = torch.Generator().manual_seed(16)
    n = 8192  # the interpreter's block
    parts = []
    for k, scale in enumerate([1.0, 1e-9, -3e4, 1e15, 1.0, -2e-11, 7.0]):
        parts.append(scale * (1 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)))
        if k == 3:  # one block across the whole range
            mag = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 40 - 14)
            parts.append(mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double())
    x = torch.cat(parts)
    x[::97] = 0.0
    x[5::101] = math.nan
    edges = kernels.tensorflow_edges()
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype)
        got = th.bin_counts(xd, edges, "tensorflow")
        np.testing.assert_array_equal(got.numpy(), np.histogram(xd.double(), edges.numpy())[0])


def test_tensorflow_folded_window_on_blocks_of_both_signs():
    """TensorBoard bins count a block of values of both signs in one window over |x|'s bins
    (a block of Gaussian values spans ~600 bins, but only ~100 bins of |x|): Gaussian blocks
    at magnitudes far apart (the window moves), ReLU-like blocks (half exact zeros), blocks
    of ±0.0 and values below 1e-12 (the two bins next to 0, counted apart), values on
    TensorBoard's edges and their neighbours, and one block too wide for any window."""
    g = torch.Generator().manual_seed(17)
    n = 8192  # the interpreter's block
    edges = kernels.tensorflow_edges()
    parts = [torch.randn(n, generator=g, dtype=torch.float64) * s for s in (1.0, 1e-6, 3e3)]
    relu = torch.randn(n, generator=g, dtype=torch.float64).clamp(min=0)
    tiny = torch.randn(n, generator=g, dtype=torch.float64) * 1e-12
    tiny[::3] = 0.0
    tiny[1::3] = -0.0
    on_edges = edges[700:860].repeat(n // 160 + 1)[:n]
    wide = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 30 - 15)
    wide *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    parts += [relu, tiny, on_edges, torch.nextafter(on_edges, torch.zeros(n).double()), wide]
    half = 774  # bin half + m holds x > 0 whose |x| has bin m; bin half - 1 - m holds -x
    for span in (254, 255):  # |x|'s bins 10 and 10 + span: the widest that fits, and one more
        pair = torch.stack([edges[half + 10], edges[half - 1 - (10 + span)]])
        parts.append(pair.repeat(n // 2))
    parts.append(torch.randn(n, generator=g, dtype=torch.float64) * 0.02)
    x = torch.cat(parts)
    x[7::211] = math.nan
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        got = th.bin_counts(xd, edges, "tensorflow")
        np.testing.assert_array_equal(got.numpy(), np.histogram(xd.double(), edges.numpy())[0])


def test_tensorflow_counts_next_to_zero_of_both_signs():
    """Each program counts more than 2^16 values next to 0 of each sign (the two counts are
    packed side by side in one 64-bit sum): every one lands in its bin."""
    n = 4 * 8192 * 20  # 20 blocks for each of the interpreter's 4 programs
    x = torch.zeros(n)
    x[1::2] = -1e-13  # bin [-1e-12, 0)
    x[::16] = 1.0
    edges = kernels.tensorflow_edges()
    got = th.bin_counts(x, edges, "tensorflow")
    np.testing.assert_array_equal(got.numpy(), np.histogram(x.double(), edges.numpy())[0])


@pytest.mark.parametrize(
    "dtype",
    [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz],
    ids=str,
)
def test_rarer_dtypes_widened_exactly(dtype):
    """Dtypes the kernel does not read directly are widened (integers to float64, fp8
    variants to fp32: exact) and counted as numpy counts x.double()."""
    x = (torch.arange(200) % 61).to(dtype)
    for bins, range_ in ((7, None), ("tensorflow", None), (5, (3.0, 40.0))):
        _assert_matches_numpy(th.histogram(x, bins, range=range_), x, bins, range_)
