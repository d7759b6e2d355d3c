"""Triton ``tensor_stats`` under the interpreter against numpy statistics in float64."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton sees the kernels

import math  # noqa: E402
from collections import OrderedDict  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tbprobe.kernels import triton_stats  # noqa: E402
from tbprobe.kernels import triton_stats_plan as plans  # noqa: E402
from tbprobe.kernels.reference import STAT_NAMES  # noqa: E402
from tbprobe.kernels.triton_stats import _decode  # noqa: E402
from tests.kernels.catalogue import DTYPES as CAT_DTYPES
from tests.kernels.catalogue import SHAPES, UNSIGNED_WIDE
from tests.kernels.catalogue import stats_reference as _stats_reference

pytestmark = pytest.mark.interpreter

DTYPES = CAT_DTYPES + UNSIGNED_WIDE
EXACT = [STAT_NAMES.index(s) for s in STAT_NAMES if s not in ("sum", "sum_sq")]
SUM, SUM_SQ = STAT_NAMES.index("sum"), STAT_NAMES.index("sum_sq")
BIG = 2**31 + 64  # element offsets past int32 (a multiple of the BLOCK used with it)


def _sample(shape, dtype, seed=0):
    """Fixed-seed values of ``dtype``: floats carry NaN/±Inf, integers reach their extremes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    flat = x.view(-1)
    if dtype.is_floating_point:
        x = x.to(dtype)
        flat = x.view(-1)
        specials = [math.nan, math.inf, -math.inf, 0.0]
        if dtype == torch.float8_e4m3fn:  # NaN but no infinities
            specials = [math.nan, 0.0]
        for i, v in enumerate(specials[: max(flat.numel() - 1, 0)]):
            flat[i] = v
        return x
    if dtype == torch.bool:
        return x > 0
    info = torch.iinfo(dtype)
    scale = 2.0 ** min(info.bits - 4, 50)  # int32/int64 values far beyond fp32's 2^24
    if info.min == 0:
        x = x.abs()
    x = (x * scale).clamp(info.min, info.max).to(dtype)
    if x.numel() >= 3:  # the extremes themselves, which fp32 would round
        x.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return x


def _check(rows, tensors):
    """Counts, min, max and abs_max exact; sums within 1e-6 relative (plus 1e-12 of the sum
    of magnitudes: what fp64 rounding itself leaves of a sum that cancels) and sum_sq within
    1e-6 relative."""
    assert rows.dtype == torch.float64 and rows.shape == (len(tensors), len(STAT_NAMES))
    for i, x in enumerate(tensors):
        ref, got = _stats_reference(x), rows[i].numpy()
        np.testing.assert_array_equal(got[EXACT], ref[EXACT], err_msg=f"row {i}")
        xd = x.double().numpy().reshape(-1)
        scale = np.abs(xd[np.isfinite(xd)]).sum()
        tol = 1e-6 * abs(ref[SUM]) + 1e-12 * scale
        assert abs(got[SUM] - ref[SUM]) <= tol, (i, got[SUM], ref[SUM])
        np.testing.assert_allclose(got[SUM_SQ], ref[SUM_SQ], rtol=1e-6, err_msg=f"row {i}")


_EMPTY_BUFFER = plans.new_buffer


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Partial and output buffers start as NaN, so a row a kernel skips fails the test; each
    test starts with an empty plan cache (its plans get poisoned partials)."""

    def nan_buffer(shape, device):
        return torch.full(shape, math.nan, dtype=torch.float64, device=device)

    monkeypatch.setattr(plans, "new_buffer", nan_buffer)
    monkeypatch.setattr(plans, "_plans", OrderedDict())


class _CountingLauncher:
    """Wraps a kernel; counts ``kernel[grid](...)`` launches and their constexprs."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(tuple(kwargs.get(k) for k in ("ELEM", "ACC", "DECODE")))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _catalogue(dtype):
    """Every catalogue shape, plus a strided slice (copied) and a transpose (read in place)."""
    xs = [_sample(s, dtype, seed=i) for i, s in enumerate(SHAPES)]
    base = _sample((64, 96), dtype, seed=99)
    return [*xs, base[::3, 1::2], base.t(), base.t()[5:]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_every_shape(dtype):
    """Every catalogue shape of one dtype, in one call, equals the float64 statistics."""
    xs = _catalogue(dtype)
    _check(triton_stats.tensor_stats(xs), xs)


@pytest.mark.parametrize("nan", [False, True], ids=["fast", "exact"])
def test_sums_that_cancel_stay_within_1e6_relative(nan):
    """Zero-mean data (a sum far below its sum of magnitudes) on the fast path and, with a
    NaN, on the exact path: fp32 partial sums were off by up to 1e-5 relative here."""
    gen = torch.Generator().manual_seed(16)
    xs = [torch.randn(20000, generator=gen), torch.randn(65537, generator=gen) * 50]
    spike = torch.zeros(16384)
    spike[0], spike[2048], spike[4096] = 1e8, 1.0, -1e8  # sum 1: the 1e8s cancel exactly
    xs.append(spike)
    if nan:
        for x in xs:
            x[7] = math.nan
    rows = triton_stats.tensor_stats(xs)
    for i, x in enumerate(xs):
        xd = x.double()
        ref = float(xd[xd.isfinite()].sum())
        assert abs(float(rows[i, SUM]) - ref) <= 1e-6 * abs(ref), (i, float(rows[i, SUM]), ref)


def test_nonfinite_counted_apart_and_never_poison():
    """NaN/±Inf are counted and never reach the moments; no finite value gives identities."""
    x = torch.tensor([1.0, -2.0, math.nan, math.inf, -math.inf, math.nan, 0.0])
    nan = torch.full((5,), math.nan, dtype=torch.bfloat16)
    rows = triton_stats.tensor_stats([x, nan, torch.zeros(0)])
    got = [dict(zip(STAT_NAMES, r, strict=True)) for r in rows.tolist()]
    assert got[0] == {
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
    identity = {"count": 0, "sum": 0, "sum_sq": 0, "min": math.inf, "max": -math.inf}
    identity |= {"abs_max": 0, "pos_inf": 0, "neg_inf": 0, "zeros": 0}
    assert got[1] == {**identity, "nan": 5}
    assert got[2] == {**identity, "nan": 0}


@triton.jit
def _decode_kernel(p_bits, p_out, DECODE: tl.constexpr, N: tl.constexpr):
    """``out = float32(decode(bits))`` for one block of ``N`` raw values."""
    o = tl.arange(0, N)
    tl.store(p_out + o, _decode(tl.load(p_bits + o), tl.float32, DECODE))


@pytest.mark.parametrize(
    "dtype, decode, bits",
    [(torch.bfloat16, 1, torch.uint16), (torch.float8_e4m3fn, 2, torch.uint8)]
    + [(torch.float8_e5m2, 3, torch.uint8)],
    ids=str,
)
def test_decode_every_bit_pattern(dtype, decode, bits):
    """Every bf16/fp8 bit pattern decodes to torch's float32 value (subnormals, ±0, NaN, Inf)."""
    n = 1 << torch.finfo(dtype).bits
    raw = torch.arange(n, dtype=torch.int32).to(bits)
    out = torch.full((n,), math.nan)
    _decode_kernel[(1,)](raw, out, DECODE=decode, N=n)
    want = raw.view(dtype).float()
    same = (out == want) | (out.isnan() & want.isnan())
    assert same.all(), raw[~same][:8].tolist()
    assert torch.equal(out.signbit() | out.isnan(), want.signbit() | want.isnan())  # -0.0 kept


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fp32 squares, redone
def test_tiny_and_huge_values():
    """Values whose squares over- or underflow fp32 (|x| ~ 1e-40 .. 3e38) give fp64 sums."""
    vals = [1e-40, -3e-39, 1e-30, 1e30, -3e38, 2e38, 0.0, 5.0]
    xs = [torch.tensor(vals), torch.tensor([1e-40, 2e-41]), torch.tensor([3e38, 3e38, -3e38])]
    xs += [torch.tensor(vals).bfloat16(), torch.tensor([6e-8, -6e-8, 1e-5]).half()]
    xs += [torch.zeros(5000), torch.full((3000,), 1e-25)]
    _check(triton_stats.tensor_stats(xs), xs)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_every_fp8_bit_pattern(dtype):
    """All 256 fp8 bit patterns, 16 to a tensor, decode exactly (NaN, ±Inf, subnormals, -0)."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    xs = list(bits.split(16))
    _check(triton_stats.tensor_stats(xs), xs)


def test_many_tensors_mixed_dtypes_one_launch_per_dtype(monkeypatch):
    """A model-like list (1 element to 60k, seven dtypes, many chunks) takes exactly one launch
    per kernel variant (dtype, with bool and uint8 sharing one), the folds included, and every
    row is right and in input order."""
    chunks = _CountingLauncher(triton_stats._stats_chunks_kernel)
    monkeypatch.setattr(triton_stats, "_stats_chunks_kernel", chunks)
    sizes = [1, 60_000, 3, 0, 4096, 257, 7, 12_345, 1, 512, 9999, 2]
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.bool]
    dtypes += [torch.uint8, torch.float8_e5m2]  # uint8 shares bool's kernel variant
    xs = [_sample((n,), dtypes[i % len(dtypes)], seed=i) for i, n in enumerate(sizes * 2)]
    rows = triton_stats._tensor_stats(xs, block=1024, chunk_blocks=8)  # 8192-element chunks
    _check(rows, xs)
    assert sorted(map(str, chunks.launches)) == sorted({str(e) for e in chunks.launches})
    assert len(chunks.launches) == len(dtypes) - 1


@pytest.mark.parametrize("numel", [63, 64, 65, 128, 2 * 64 + 17])
def test_chunk_boundaries(numel):
    """Tensors ending just before, on and after a chunk edge (64 elements) are read whole."""
    xs = [_sample((numel,), torch.float32, seed=numel), _sample((numel,), torch.int64)]
    _check(triton_stats._tensor_stats(xs, block=16, chunk_blocks=4), xs)


def _launch_chunks(table, partials, counts, out, first, n, block=64):
    """``_stats_chunks_kernel`` over chunks ``first .. first + n`` of a hand-made fp32 table."""
    triton_stats._stats_chunks_kernel[(n,)](
        table, partials, counts, out, first, ELEM=tl.float32, ACC=tl.float32, DECODE=0,
        ALIGNED=False, BLOCK=block, BLOCK_C=16,
    )  # fmt: skip


def test_int64_offsets_by_construction():
    """A chunk starting past 2^31 elements is addressed with int64 arithmetic.

    The interpreter is too slow for a real 2^31-element tensor, so the table is built by hand:
    the base address is moved back by BIG elements and the chunk starts at BIG, which lands on
    a small real tensor. A real >2^31-element run is left to the GPU check.
    """
    x = _sample((300,), torch.float32, seed=5)
    base = x.data_ptr() - BIG * 4
    # (address, start, end, row, first chunk of the row, chunks of the row) per chunk
    table = torch.tensor(
        [base, BIG, BIG + 128, 0, 0, 2, base, BIG + 128, BIG + 300, 0, 0, 2], dtype=torch.int64
    )
    partials = torch.full((2, 10), math.nan, dtype=torch.float64)
    out = torch.full((1, 10), math.nan, dtype=torch.float64)
    counts = torch.zeros(1, dtype=torch.int32)
    _launch_chunks(table, partials, counts, out, 0, 2)
    _check(out, [x])
    assert counts.tolist() == [0]  # reset by the folding program for the next call


def test_fold_by_whichever_chunk_finishes_last():
    """The last chunk of a row to finish folds its partials in chunk order: launched one
    chunk at a time, in reverse order (chunk 0 last), the row is the same to the bit, and the
    arrival counter is back at 0 after each full pass."""
    x = _sample((1000,), torch.float32, seed=6)
    x[17] = math.nan
    n = 8  # chunks of 128 (the last 104)
    rec = [[x.data_ptr(), k * 128, min(1000, (k + 1) * 128), 0, 0, n] for k in range(n)]
    table = torch.tensor(rec, dtype=torch.int64).view(-1)
    rows = []
    for order in (range(n), reversed(range(n)), [3, 7, 0, 5, 1, 6, 2, 4]):
        partials = torch.full((n, 10), math.nan, dtype=torch.float64)
        out = torch.full((1, 10), math.nan, dtype=torch.float64)
        counts = torch.zeros(1, dtype=torch.int32)
        for i, k in enumerate(order):
            _launch_chunks(table, partials, counts, out, k, 1)
            assert counts.tolist() == [(i + 1) % n]
            assert out.isnan().all() == (i < n - 1)  # written by the last arrival only
        rows.append(out)
    _check(rows[0], [x])
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])


def test_host_table_int64_past_2_31():
    """The host table gives int64 chunk starts/ends and row ranges for a >2^31-element tensor
    (a stand-in with numel/data_ptr/dtype: nothing is allocated)."""

    class Fake:
        def __init__(self, n, dtype, ptr):
            self.n, self.dtype, self.ptr = n, dtype, ptr

        def numel(self):
            return self.n

        def data_ptr(self):
            return self.ptr

    chunk = 1 << 20
    fakes = [Fake(BIG, torch.float16, 1 << 40), Fake(5, torch.float32, 4096)]
    fakes.append(Fake(3 * chunk, torch.float16, 1 << 44))
    fakes.append(Fake(0, torch.float32, 0))  # zero-size: one empty chunk writes its row
    host, groups, total = plans.build_table(fakes, chunk)
    n_big = -(-BIG // chunk)
    assert total == n_big + 3 + 1 + 1
    assert host.dtype == np.int64 and host.shape == (plans.RECORD * total,)
    rec = host.reshape(-1, plans.RECORD)  # (address, start, end, row, first, count)
    assert rec[n_big - 1].tolist() == [1 << 40, (n_big - 1) * chunk, BIG, 0, 0, n_big]
    assert rec[n_big].tolist() == [1 << 44, 0, chunk, 2, n_big, 3]  # fp16 group continues
    assert rec[-2].tolist() == [4096, 0, 5, 1, n_big + 3, 1]  # then the fp32 group
    assert rec[-1].tolist() == [0, 0, 0, 3, n_big + 4, 1]
    assert [g[-2:] for g in groups] == [(0, n_big + 3), (n_big + 3, 2)]


def test_views_read_in_place_or_copied():
    """Transposed/permuted tensors are read in place; gapped or expanded views are copied and
    still counted element by element; a view off 16-byte alignment is read unvectorised."""
    base = _sample((40, 50, 3), torch.float32, seed=3)
    assert plans.source(base.permute(2, 0, 1), 0).data_ptr() == base.data_ptr()
    gapped = base[:, ::2]
    assert plans.source(gapped, 0).data_ptr() != base.data_ptr()
    flat = base.view(-1)
    aligned = [g[3] for g in plans.build_table([flat, flat[1:]], 1024)[1]]
    assert aligned == [False]  # one launch; an address off 16 bytes turns vector loads off
    assert [g[3] for g in plans.build_table([flat], 1024)[1]] == [True]
    expanded = torch.arange(7.0).expand(5, 7)
    neg = torch._neg_view(base)  # a lazily negated view
    xs = [base.permute(2, 0, 1), gapped, expanded, neg, flat[1:]]
    _check(triton_stats.tensor_stats(xs), [x.contiguous() for x in xs])


def test_rare_float_dtype_widened():
    """A real dtype without a Triton element type (fp8 e4m3fnuz) is widened and still right."""
    x = _sample((100,), torch.float32, seed=4).nan_to_num(0.0).to(torch.float8_e4m3fnuz)
    _check(triton_stats.tensor_stats([x]), [x])


def test_plan_cached_and_deterministic():
    """Repeated calls on the same tensors reuse the plan (table, partials, counters), leave
    every arrival counter at 0 and agree bit for bit, multi-chunk tensors included."""
    xs = [_sample((3000,), torch.float32), _sample((5,), torch.bfloat16), torch.ones(0)]
    xs.append(_sample((700,), torch.int64, seed=2))
    first = triton_stats._tensor_stats(xs, block=64, chunk_blocks=4)  # 256-element chunks
    (plan,) = plans._plans.values()
    assert plan.partials.shape == (12 + 1 + 1 + 3, 10) and plan.counts.tolist() == [0] * 4
    again = triton_stats._tensor_stats(xs, block=64, chunk_blocks=4)
    assert list(plans._plans.values()) == [plan] and plan.counts.tolist() == [0] * 4
    assert torch.equal(first, again)
    _check(first, xs)


class _CountOps(TorchDispatchMode):
    """Records every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_repeated_call_is_one_allocation_and_one_launch_per_dtype(monkeypatch):
    """A repeated call on the same small list (the hot path) runs no torch op but its output
    allocation, and one launch per dtype group: no table copy, slice, detach or fold launch."""
    xs = [torch.randn(100, requires_grad=True), torch.randn(7, 3).t(), torch.ones(5).half()]
    _check(triton_stats.tensor_stats(xs), [x.detach() for x in xs])  # builds the plan
    monkeypatch.setattr(plans, "new_buffer", _EMPTY_BUFFER)  # the product's, not the poison
    launches = []

    class _Recorder:  # records the launch only: the interpreter's own torch ops stay out
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs["ELEM"]))

    monkeypatch.setattr(triton_stats, "_stats_chunks_kernel", _Recorder())
    with _CountOps() as counted:
        triton_stats.tensor_stats(xs)
    assert counted.ops == ["aten.empty.memory_format"]
    assert launches == [((2,), tl.float32), ((1,), tl.float16)]


def test_bad_input():
    """An empty list, complex tensors, non-tensors and mixed devices raise, naming tensors;
    more loop steps per chunk than the packed lane counts hold are refused."""
    with pytest.raises(ValueError, match="tensors"):
        triton_stats.tensor_stats([])
    with pytest.raises(TypeError, match=r"tensors\[1\].*complex"):
        triton_stats.tensor_stats([torch.ones(2), torch.ones(2, dtype=torch.complex64)])
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        triton_stats.tensor_stats([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        triton_stats.tensor_stats([torch.ones(2), torch.ones(2, device="meta")])
    with pytest.raises(ValueError, match="chunk_blocks"):
        triton_stats._tensor_stats([torch.ones(2)], chunk_blocks=1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fast_chunks_and_their_exact_fallback(dtype):
    """Chunks of ordinary values take the unmasked fp32 path; a chunk holding a NaN, an Inf,
    a value whose square overflows fp32, only tiny values or only zeros is redone exactly.
    Chunks are 8 blocks of 64 (two groups of four), with a partial last block."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(512 * 6 + 100, generator=g) * 3
    cases = [base.clone() for _ in range(6)]
    cases[1][700] = math.nan
    cases[2][1500] = -math.inf
    cases[3][2100:2110] = 3e30 if dtype != torch.float16 else 6e4
    cases[4][512 * 2 : 512 * 3] = 1e-20 if dtype != torch.float16 else 1e-7
    cases[5][:1024] = 0.0
    xs = [c.to(dtype) for c in cases]
    _check(triton_stats._tensor_stats(xs, block=64, chunk_blocks=8), xs)


def test_chunk_size_grows_only_with_calls_that_fill_every_sm():
    """Chunks stay 16 blocks until a call gives every SM 4 programs of longer ones; then the
    largest power of two that still does, at most 512; the interpreter keeps 16."""
    block, sms = 2048, 132
    per_program = block * 4 * sms  # elements a call needs per block of chunk length
    assert triton_stats.chunk_blocks_for(0, sms) == 16
    assert triton_stats.chunk_blocks_for(17 * per_program - 1, sms) == 16
    assert triton_stats.chunk_blocks_for(32 * per_program, sms) == 32
    assert triton_stats.chunk_blocks_for(63 * per_program, sms) == 32
    assert triton_stats.chunk_blocks_for(64 * per_program, sms) == 64
    assert triton_stats.chunk_blocks_for(1 << 40, sms) == 512
    assert triton_stats.chunk_blocks_for(1 << 40, None) == 16
    for total in (1 << 24, 1 << 26, 1 << 28, 1 << 30, 1 << 33):
        cb = triton_stats.chunk_blocks_for(total, sms)
        chunks = -(-total // (block * cb))
        assert cb == 16 or chunks >= 4 * sms, total  # every SM keeps 4 programs at least
        assert cb < 1024  # the kernel's packed per-lane counts hold up to 1023 loop steps
