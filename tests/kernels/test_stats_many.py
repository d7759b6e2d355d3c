"""The multi-tensor CPU ``tensor_stats`` (``reference_many``) against the per-tensor oracle."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tbprobe import kernels
from tbprobe.kernels import reference_many as many
from tbprobe.kernels.reference import STAT_NAMES, stats_row
from tests.kernels.catalogue import DTYPES, SHAPES, UNSIGNED_WIDE
from tests.kernels.catalogue import stats_reference as numpy_stats

EXACT = [STAT_NAMES.index(s) for s in STAT_NAMES if s not in ("sum", "sum_sq")]
SUM, SUM_SQ = STAT_NAMES.index("sum"), STAT_NAMES.index("sum_sq")


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    """Each test starts with an empty plan cache."""
    monkeypatch.setattr(many, "_plans", OrderedDict())


def _sample(shape, dtype, seed=0, specials=True):
    """Fixed-seed values of ``dtype``; floats get NaN/±Inf/0 at seeded places, integers their
    extremes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        x = (x * 2.0 ** min(info.bits - 4, 50)).clamp(info.min, info.max)
        x = x.abs() if info.min == 0 else x
        x = x.to(dtype)
        if x.numel() >= 2:
            x.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
        return x
    x = x.to(dtype)
    flat = x.view(-1)
    if specials and flat.numel():
        vals = [math.nan, 0.0] if dtype == torch.float8_e4m3fn else [math.nan, math.inf]
        vals += [] if dtype == torch.float8_e4m3fn else [-math.inf, 0.0]
        where = torch.randint(0, flat.numel(), (len(vals) * 2,), generator=g)
        for i, pos in enumerate(where.tolist()):
            flat[pos] = vals[i % len(vals)]
    return x


def _check(rows, tensors):
    """Counts, min, max, abs_max equal the oracle exactly; sums within 1e-9 of the sum of
    magnitudes (far inside the 1e-6 contract), sum_sq within 1e-9 relative."""
    assert rows.dtype == torch.float64 and rows.shape == (len(tensors), len(STAT_NAMES))
    assert not rows.requires_grad
    for i, x in enumerate(tensors):
        want, got = stats_row(x).numpy(), rows[i].numpy()
        np.testing.assert_array_equal(got[EXACT], want[EXACT], err_msg=f"row {i} {x.dtype}")
        np.testing.assert_array_equal(got[EXACT], numpy_stats(x.detach())[EXACT])
        xd = x.detach().double().numpy().reshape(-1)
        scale = np.abs(xd[np.isfinite(xd)]).sum()
        assert abs(got[SUM] - want[SUM]) <= 1e-9 * scale, (i, got[SUM], want[SUM])
        np.testing.assert_allclose(got[SUM_SQ], want[SUM_SQ], rtol=1e-9, err_msg=f"row {i}")


def _catalogue(dtype):
    """Every catalogue shape, a gapped slice, a transpose and an expanded view."""
    xs = [_sample(s, dtype, seed=i) for i, s in enumerate(SHAPES)]
    base = _sample((64, 96), dtype, seed=99)
    return [*xs, base[::3, 1::2], base.t(), base[:1].expand(5, 96)]


@pytest.mark.parametrize("dtype", DTYPES + UNSIGNED_WIDE, ids=str)
def test_every_dtype_every_shape(dtype):
    """Every catalogue shape of one dtype, non-contiguous views included, in one call."""
    xs = _catalogue(dtype)
    _check(many.tensor_stats(xs), xs)


def test_nonfinite_counted_apart_and_never_poison():
    """NaN/±Inf are counted and never reach the moments; no finite value gives the
    identities; -0.0 is a zero and gives abs_max +0.0."""
    x = torch.tensor([1.0, -2.0, math.nan, math.inf, -math.inf, math.nan, 0.0])
    xs = [x, torch.full((5,), math.nan, dtype=torch.bfloat16), torch.zeros(0)]
    xs += [torch.tensor([math.inf, -math.inf] * 40), torch.tensor([-0.0, -0.0])]
    rows = many.tensor_stats(xs)
    _check(rows, xs)
    got = [dict(zip(STAT_NAMES, r, strict=True)) for r in rows.tolist()]
    assert got[0].pop("sum_sq") == pytest.approx(5.0, rel=1e-15)  # a squared fp64 norm
    assert got[0] == {
        "count": 3,
        "sum": -1.0,
        "min": -2.0,
        "max": 1.0,
        "abs_max": 2.0,
        "nan": 2,
        "pos_inf": 1,
        "neg_inf": 1,
        "zeros": 1,
    }
    identity = {"count": 0, "sum": 0, "sum_sq": 0, "min": math.inf, "max": -math.inf}
    identity |= {"abs_max": 0, "nan": 0, "pos_inf": 0, "neg_inf": 0, "zeros": 0}
    assert got[1] == {**identity, "nan": 5}
    assert got[2] == identity
    assert got[3] == {**identity, "pos_inf": 40, "neg_inf": 40}
    assert math.copysign(1.0, rows[4, STAT_NAMES.index("abs_max")].item()) == 1.0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's own squares
def test_nonfinite_laden_and_extreme_values():
    """Tensors dense with NaN/±Inf/0 (each flag byte near full), values whose squares leave
    the fp32 range, and fp64 values near its limits."""
    g = torch.Generator().manual_seed(7)
    xs = []
    for i, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16, torch.float64] * 2):
        x = torch.randn(3000 + 977 * i, generator=g).to(dtype)
        pick = torch.randint(0, 5, x.shape, generator=g)
        for code, v in enumerate([math.nan, math.inf, -math.inf, 0.0]):
            x[pick == code] = v
        xs.append(x)
    xs += [torch.tensor([1e-40, -3e-39, 1e-30, 1e30, -3e38, 2e38, 0.0, 5.0])]
    xs += [torch.tensor([1e-300, -1e300, 1e-320, 5.0], dtype=torch.float64)]
    xs += [torch.full((4096,), math.nan), torch.zeros(2048)]
    _check(many.tensor_stats(xs), xs)


def test_many_mixed_tensors_in_input_order():
    """300 tensors of every dtype and sizes 0..70k, fp32-wide and fp64-wide groups
    interleaved, come back one row per tensor in input order."""
    g = torch.Generator().manual_seed(3)
    sizes = (10 ** (torch.rand(300, generator=g) * 4.85)).long().tolist()
    sizes[::37] = [0] * len(sizes[::37])
    xs = [_sample((n,), DTYPES[i % len(DTYPES)], seed=i) for i, n in enumerate(sizes)]
    xs[5] = xs[5][::2]  # a strided view among them
    _check(kernels.tensor_stats(xs), xs)


@pytest.mark.parametrize("cap", [64, 2048, 1 << 14])
def test_chunked_equals_unchunked(monkeypatch, cap):
    """With a small chunk cap a tensor spans several chunks and a chunk holds several
    tensors; the rows equal the oracle and the one-chunk result."""
    xs = [_sample((n,), torch.float32, seed=n) for n in (5000, 7, 2048, 0, 33, 40_000)]
    xs += [_sample((3000,), torch.int32, seed=1), _sample((4096,), torch.float64, seed=2)]
    whole = many.tensor_stats(xs)
    monkeypatch.setattr(many, "_CAP", cap)
    monkeypatch.setattr(many, "_plans", OrderedDict())
    rows = many.tensor_stats(xs)
    _check(rows, xs)
    exact = torch.tensor(EXACT)
    assert torch.equal(rows[:, exact], whole[:, exact])
    g32 = many._plan(xs)[0]
    assert sum(any(part[0] == 5 for part in c.parts) for c in g32.chunks) > 1  # 40k split


class _Ops(TorchDispatchMode):
    """Records the aten ops run while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


_VIEWS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.detach", "aten.alias"}
_VIEWS |= {"aten.slice", "aten.narrow", "aten.select", "aten.t", "aten.unbind", "aten.unsqueeze"}


def _compute_ops(xs):
    with _Ops() as rec:
        many.tensor_stats(xs)
    return [op for op in rec.ops if op not in _VIEWS]


def test_op_count_per_group_not_per_tensor():
    """A repeated call runs the same number of compute ops for 10 tensors as for 300 (views
    aside), and none of them syncs with the host (.item(), nonzero, masked_select)."""
    few = [_sample((100 + i,), torch.float32, seed=i) for i in range(10)]
    lots = [_sample((100 + i,), torch.float32, seed=i) for i in range(300)]
    many.tensor_stats(few), many.tensor_stats(lots)  # plans built
    ops_few, ops_lots = _compute_ops(few), _compute_ops(lots)
    assert len(ops_few) == len(ops_lots) < 40, (ops_few, ops_lots)
    syncs = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}
    assert not syncs & set(ops_lots)


def test_plan_cached_and_deterministic():
    """The plan is built once per (device, dtypes, sizes) and reused; repeated calls agree to
    the bit; a gradient-tracking input gives rows without a graph."""
    xs = [torch.randn(3000, requires_grad=True), torch.randn(7, 3).t(), torch.ones(5).half()]
    first = many.tensor_stats(xs)
    (plan,) = many._plans.values()
    again = many.tensor_stats(xs)
    assert list(many._plans.values()) == [plan] and torch.equal(first, again)
    _check(first, [x.detach() for x in xs])


def test_lone_small_tensor_and_whole_view():
    """A lone small tensor (oracle path) and a lone large one whose rows are a view of it
    (no copy) both give the oracle's row."""
    small, big = _sample((300,), torch.float32), _sample((1 << 16,), torch.float32, seed=4)
    _check(many.tensor_stats([small]), [small])
    _check(many.tensor_stats([big]), [big])
    (g,) = many._plan([big])
    assert all(c.whole for c in g.chunks)


def test_bad_input():
    """An empty list, complex tensors, non-tensors and mixed devices raise, naming tensors."""
    with pytest.raises(ValueError, match="tensors"):
        many.tensor_stats([])
    with pytest.raises(TypeError, match=r"tensors\[1\].*complex"):
        many.tensor_stats([torch.ones(2), torch.ones(2, dtype=torch.complex64)])
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        many.tensor_stats([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        many.tensor_stats([torch.ones(2), torch.ones(2, device="meta")])


def test_bad_tensor_lists_name_the_argument():
    """A lone tensor, a non-iterable and a non-tensor element are refused naming them (the
    host path too, whose large float tensors take their own way)."""
    from tbprobe import kernels

    with pytest.raises(TypeError, match=r"tensors: expected a list of tensors, got one tensor"):
        kernels.tensor_stats(torch.ones(3))
    with pytest.raises(TypeError, match=r"tensors: expected a list of tensors, got NoneType"):
        kernels.tensor_stats(None)
    with pytest.raises(TypeError, match=r"tensors\[1\]: expected a torch.Tensor, got str"):
        kernels.tensor_stats([torch.ones(40000), "x"])
    with pytest.raises(TypeError, match=r"tensors\[1\]: expected a torch.Tensor or numpy"):
        kernels.histogram_many([torch.ones(3), 5])
