"""Thumbnails: the torch reference against a float64 numpy oracle, the Triton kernels (under
the interpreter) against the reference, the grid layout, non-finite values and bad inputs.

Exactness: without downsampling (every window one pixel) all three agree exactly (compiled
for a GPU, Triton may fuse the fp64 scaling into an FMA: expect 1 level there too). With
downsampling the reference sums windows in fp32 (fp64 for fp64/int32/int64) and the oracle
in fp64, and the Triton kernel sums in yet another order, so a window mean whose scaled value
sits within rounding of a .5 boundary may land one grey level apart: we allow 1 level on at
most 1% of pixels there. Discrete inputs (bool, int8, fp8) hit such ties often: a mean of
k/6 scaled by 255 is exactly k*42.5. Their tests check the 1-level bound alone.
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tbprobe.kernels.thumbnail import (  # noqa: E402
    grid_shape,
    thumbnail,
    thumbnail_reference,
    thumbnail_shape,
)
from tests.kernels.catalogue import DTYPES  # noqa: E402

try:
    from tbprobe.kernels import triton_thumbnail
except ImportError:  # no Triton on this platform: the interpreter tests skip
    triton_thumbnail = None

needs_triton = pytest.mark.skipif(triton_thumbnail is None, reason="triton is not installed")


# (shape, kwargs): the one shape catalogue. Kept small: the interpreter runs all of them.
CASES = [
    ((2, 5, 13, 11), {}),  # 2x3 grid, 1:1 tiles
    ((1, 1, 7, 7), {}),  # a single tile
    ((3, 17, 9, 8), {"sample": -1}),  # 4 rows x 5 cols (3 cells empty), last batch item
    ((2, 6, 37, 29), {"tile": 8}),  # area downsampling, uneven windows
    ((1, 3, 64, 64), {"max_size": 40}),  # downsampling forced by max_size
    ((2, 100, 4, 4), {}),  # capped at 64 tiles
    ((2, 40, 23), {}),  # sequence, 1:1
    ((1, 300, 50), {"max_size": 64}),  # sequence, downsampled per side
    ((2, 4, 12, 12), {"kind": "attention", "tile": 5}),  # heads
    ((1, 2, 200, 150), {"tile": 6}),  # windows of up to 35 x 39: several steps per window
    ((31, 17), {}),  # heatmap
]
IDS = [f"{s}-{k}" for s, k in CASES]


def _sample(shape, dtype, seed=0, nonfinite=True):
    """Random values of ``dtype``; floats get a NaN, +Inf and -Inf (e4m3fn: NaN only)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return (x * 10).clamp(info.min, info.max).to(dtype)
    x = x.to(dtype)
    if nonfinite and x.numel() >= 40:
        flat = x.view(-1)
        flat[3] = math.nan
        if dtype != torch.float8_e4m3fn:  # e4m3fn has no infinities
            flat[10], flat[37] = math.inf, -math.inf
    return x


def _np_thumbnail(x, kind="auto", max_tiles=64, tile=None, max_size=512, sample=0, background=255):
    """Slow, obvious float64 thumbnail: loops over every output pixel."""
    a = x.double().numpy()
    if a.ndim == 2:
        maps = a[None]
    elif a.ndim == 3:
        maps = a[sample][None]
    else:
        maps = a[sample, :max_tiles]
    n, h, w = maps.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cap_h = min((max_size - (rows - 1)) // rows, tile or h)
    cap_w = min((max_size - (cols - 1)) // cols, tile or w)
    if a.ndim == 4 and (h > cap_h or w > cap_w):  # grids keep the aspect ratio
        s = min(cap_h / h, cap_w / w)  # exact enough for these small sizes
        th, tw = max(1, math.floor(h * s + 1e-9)), max(1, math.floor(w * s + 1e-9))
    else:
        th, tw = min(h, cap_h), min(w, cap_w)
    img = np.full((rows * th + rows - 1, cols * tw + cols - 1), background, dtype=np.uint8)
    for c in range(n):
        m = maps[c]
        fin = m[np.isfinite(m)]
        lo, hi = (fin.min(), fin.max()) if fin.size else (math.inf, -math.inf)
        for i in range(th):
            y0, y1 = i * h // th, -(-(i + 1) * h // th)
            for j in range(tw):
                win = m[y0:y1, j * w // tw : -(-(j + 1) * w // tw)]
                win = win[np.isfinite(win)]
                if win.size == 0:
                    v = 0
                elif hi == lo:
                    v = 128
                else:
                    v = math.floor((win.mean() - lo) * (255.0 / (hi - lo)) + 0.5)
                img[(c // cols) * (th + 1) + i, (c % cols) * (tw + 1) + j] = min(255, max(0, v))
    return img, (th, tw) == (h, w)


def _assert_close(got, want, exact, frac=0.01):
    """Equal, or (when windows were averaged) at most 1 level apart on at most ``frac`` of the
    pixels."""
    got = got.cpu().numpy().astype(int) if isinstance(got, torch.Tensor) else got.astype(int)
    want = want.cpu().numpy().astype(int) if isinstance(want, torch.Tensor) else want.astype(int)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        assert diff.max() <= 1 and (diff > 0).mean() <= frac, (diff.max(), (diff > 0).mean())


def _shape(shape, kwargs):
    """``thumbnail_shape`` for a test case (``sample`` does not change the shape)."""
    return thumbnail_shape(shape, **{k: v for k, v in kwargs.items() if k != "sample"})


class _PoisonedTorch:
    """``torch`` for the Triton module, whose ``empty`` fills uint8 with ``fill``, floats with
    NaN: the buffers the kernels must write in full."""

    def __init__(self, fill):
        self.fill = fill

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(self.fill) if t.dtype == torch.uint8 else t.fill_(math.nan)


def _triton(x, **kwargs):
    """The Triton path via ``thumbnail``'s dispatch, its buffers poisoned (output with 0, then
    with 255): both runs must agree, so no pixel is left unwritten."""
    out = []
    for poison in (0, 255):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TBPROBE_KERNELS", "triton")
            mp.setattr(triton_thumbnail, "torch", _PoisonedTorch(poison))
            out.append(thumbnail(x, **kwargs))
    np.testing.assert_array_equal(out[0].numpy(), out[1].numpy())
    return out[0]


@pytest.mark.parametrize("shape, kwargs", CASES, ids=IDS)
def test_reference_matches_numpy(shape, kwargs):
    """The torch reference equals the float64 oracle (exactly when no window is averaged)."""
    x = _sample(shape, torch.float32)
    want, exact = _np_thumbnail(x, **kwargs)
    got = thumbnail_reference(x, **kwargs)
    assert got.dtype == torch.uint8 and tuple(got.shape) == _shape(shape, kwargs)
    _assert_close(got, want, exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_every_dtype(dtype):
    """Every real dtype matches the oracle, 1:1 exactly and downsampled within 1 level."""
    for shape, kwargs in [((2, 3, 9, 7), {}), ((1, 2, 30, 26), {"tile": 7})]:
        x = _sample(shape, dtype, seed=1)
        want, exact = _np_thumbnail(x, **kwargs)
        _assert_close(thumbnail_reference(x, **kwargs), want, exact, frac=1.0)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("shape, kwargs", CASES, ids=IDS)
def test_triton_matches_reference(shape, kwargs):
    """The Triton kernels write the reference's image (exactly when no window is averaged)."""
    x = _sample(shape, torch.float32, seed=2)
    _, exact = _np_thumbnail(x, **kwargs)
    _assert_close(_triton(x, **kwargs), thumbnail_reference(x, **kwargs), exact)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_every_dtype(dtype):
    """Every real dtype gives the reference's image through the Triton kernels."""
    x = _sample((2, 3, 10, 9), dtype, seed=3)
    _assert_close(_triton(x, tile=4), thumbnail_reference(x, tile=4), exact=False, frac=1.0)
    _assert_close(_triton(x), thumbnail_reference(x), exact=True)


@pytest.mark.interpreter
@needs_triton
def test_triton_noncontiguous():
    """Strided, transposed and expanded inputs are read in place and match the reference."""
    base = _sample((3, 8, 20, 18), torch.float32, seed=4)
    for x in (
        base.transpose(2, 3),
        base[:, ::2, 1::2, ::3],
        base.permute(0, 2, 3, 1)[..., :6].permute(0, 3, 1, 2),
        base[:1, :1].expand(2, 5, 20, 18),
        base[0, :, :, 3].unsqueeze(0),  # (1, 8, 20) sequence with a strided feature axis
    ):
        want = thumbnail_reference(x.contiguous())
        _assert_close(_triton(x), want, exact=True)
        _assert_close(thumbnail_reference(x), want, exact=True)


@pytest.mark.interpreter
@needs_triton
def test_triton_small_blocks_loop(monkeypatch):
    """With tiny blocks forced, min/max chunks of several steps and windows of several steps
    still give the reference's image (the loops run many times, masks at every edge)."""
    for name, value in [("_MM_BLOCK", 128), ("_MM_MAX_CHUNKS", 3), ("_LANES", 64)]:
        monkeypatch.setattr(triton_thumbnail, name, value)
    monkeypatch.setattr(triton_thumbnail, "_MAX_BLOCK_K", 4)
    monkeypatch.setattr(triton_thumbnail, "_launches", {})
    for shape, kwargs in [((1, 2, 37, 29), {"tile": 8}), ((2, 33, 40), {"max_size": 16})]:
        x = _sample(shape, torch.float32, seed=7)
        _assert_close(_triton(x, **kwargs), thumbnail_reference(x, **kwargs), exact=False)
    x = _sample((1, 2, 30, 21), torch.float64, seed=8).transpose(2, 3)  # non-flat maps
    _assert_close(_triton(x), thumbnail_reference(x), exact=True)


class _CountOps(TorchDispatchMode):
    """Records every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_triton
def test_triton_call_is_two_launches_and_two_allocations(monkeypatch):
    """A Triton thumbnail is two launches, and its only torch ops are the image and partials
    allocations (no view, slice, detach, copy or cast of the input); bool adds one
    same-size view. Launches are recorded, not run."""
    launches = []

    class _Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    monkeypatch.setenv("TBPROBE_KERNELS", "triton")
    for name in ("_minmax_kernel", "_grid_kernel"):
        monkeypatch.setattr(triton_thumbnail, name, _Recorder(name))
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    for arg, kwargs in [(x, {}), (x[:, :, ::2].transpose(2, 3), {"sample": -1, "tile": 3})]:
        for _ in range(2):  # the first call fills the signature cache, the second reuses it
            launches.clear()
            with _CountOps() as counted:
                thumbnail(arg, **kwargs)
            assert counted.ops == ["aten.empty.memory_format"] * 2
            assert launches == ["_minmax_kernel", "_grid_kernel"]
    mask = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    with _CountOps() as counted:
        thumbnail(mask)
    view = ["aten.view.dtype", "aten.detach.default"]  # what one x.view(torch.uint8) runs
    assert sorted(counted.ops) == sorted(["aten.empty.memory_format"] * 2 + view)


@pytest.mark.parametrize(
    "channels, grid", [(1, (1, 1)), (3, (2, 2)), (16, (4, 4)), (64, (8, 8)), (100, (8, 8))]
)
def test_grid_size(channels, grid):
    """1, 3, 16, 64 and 100 channels (capped at 64) give the documented grid and image size."""
    assert grid_shape(min(channels, 64)) == grid
    rows, cols = grid
    img = thumbnail(torch.randn(2, channels, 20, 20))
    assert tuple(img.shape) == (rows * 20 + rows - 1, cols * 20 + cols - 1)


@pytest.mark.parametrize(
    "shape, kwargs, size",
    [
        ((32, 256, 56, 56), {}, (455, 455)),  # 8x8 tiles of 56x56, not resized
        ((8, 12, 224, 224), {}, (383, 511)),  # 3x4 tiles of 127x127: square stays square
        ((1, 1, 100, 30), {"tile": 10}, (10, 3)),  # grid tiles keep the aspect ratio
        ((1, 1, 5000, 3), {"max_size": 100}, (100, 1)),  # ... and keep at least 1 pixel
        ((4, 4096, 768), {}, (512, 512)),  # a single map shrinks each side on its own
        ((2, 20, 1000), {"max_size": 64}, (20, 64)),  # and is never enlarged
        ((2, 3, 8, 8), {"max_tiles": 2}, (8, 17)),  # 1x2 grid
    ],
)
def test_tile_sizes(shape, kwargs, size):
    """Tile sides follow the documented caps: aspect kept for grids, per side for one map."""
    assert thumbnail_shape(shape, **kwargs) == size


def test_grid_shape_formula():
    """cols = ceil(sqrt(n)), rows = ceil(n / cols): every tile fits, no row is empty."""
    for n in range(1, 2000):
        rows, cols = grid_shape(n)
        assert cols == math.ceil(math.sqrt(n)) and rows * cols >= n > (rows - 1) * cols
        assert 0 <= cols - rows <= 1


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((2, 512, 224, 224), {}),
        ((2, 512, 224, 224), {"max_tiles": 1}),
        ((4, 4096, 2048), {}),
        ((1, 32, 768, 768), {"kind": "attention"}),
        ((3000, 2000), {"max_size": 100}),
    ],
)
def test_big_inputs_stay_small(shape, kwargs):
    """Big inputs give an image of at most max_size (512) a side, with the full grey range."""
    x = torch.linspace(-1, 1, shape[-1]).expand(shape)  # a ramp along each row, no memory
    img = thumbnail_reference(x, **kwargs)
    assert img.dtype == torch.uint8 and max(img.shape) <= kwargs.get("max_size", 512)
    assert tuple(img.shape) == thumbnail_shape(shape, **kwargs)
    n = min(shape[1], kwargs.get("max_tiles", 64)) if len(shape) == 4 else 1
    cols = grid_shape(n)[1]
    first = img[0, : (img.shape[1] + 1) // cols - 1].int()  # top row of the first tile
    assert first[0] <= 3 and first[-1] >= 252 and (first.diff() >= 0).all()


def test_nonfinite_values():
    """NaN and ±Inf never stretch the range; all-NaN is black, constant maps are mid-grey."""
    x = torch.zeros(1, 4, 2, 3)
    x[0, 0] = torch.tensor([[0.0, 1.0, math.inf], [-math.inf, math.nan, 0.5]])
    x[0, 1] = math.nan  # no finite value at all
    x[0, 2] = 7.0
    x[0, 2, 0, 0] = math.nan  # constant, with one hole
    x[0, 3] = torch.arange(6.0).view(2, 3)
    for img in (thumbnail(x), _np_thumbnail(x)[0]):
        img = torch.as_tensor(img)
        assert img.shape == (5, 7)
        assert img[:2, :3].tolist() == [[0, 255, 0], [0, 0, 128]]
        assert img[:2, 4:].tolist() == [[0, 0, 0], [0, 0, 0]]
        assert img[3:, :3].tolist() == [[0, 128, 128], [128, 128, 128]]
        assert img[3:, 4:].tolist() == [[0, 51, 102], [153, 204, 255]]
        assert (img[2] == 255).all() and (img[:, 3] == 255).all()  # separators
    # A NaN in a downsampled window is left out of that window's mean.
    y = torch.arange(16.0).view(1, 1, 4, 4)
    y[0, 0, 0, 1] = math.nan  # windows: mean(0, 4, 5), mean(2, 3, 6, 7), ...; lo 0, hi 15
    for img in (thumbnail(y, tile=2), _np_thumbnail(y, tile=2)[0]):
        assert img.tolist() == [[51, 77], [179, 213]]


def test_background_and_dispatch(monkeypatch):
    """``background`` colours separators and empty cells; TBPROBE_KERNELS is read per call."""
    img = thumbnail(torch.randn(1, 3, 4, 4), background=9)
    assert (img[4] == 9).all() and (img[5:, 5:] == 9).all()
    calls = []
    if triton_thumbnail is not None:
        monkeypatch.setattr(triton_thumbnail, "thumbnail_triton", lambda *a, **k: calls.append(1))
    monkeypatch.setenv("TBPROBE_KERNELS", "torch")
    thumbnail(torch.randn(2, 2, 3, 3))
    assert calls == []
    if triton_thumbnail is not None:
        monkeypatch.setenv("TBPROBE_KERNELS", "triton")
        thumbnail(torch.randn(2, 2, 3, 3))
        assert calls == [1]
    monkeypatch.setenv("TBPROBE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="TBPROBE_KERNELS"):
        thumbnail(torch.randn(2, 2, 3, 3))


def test_reference_has_no_data_dependence():
    """On the meta device (shapes, no data) the reference runs: nothing reads values on host."""
    for shape, kwargs in CASES:
        img = thumbnail(torch.empty(shape, device="meta"), **kwargs)
        assert img.device.type == "meta" and img.dtype == torch.uint8
        assert tuple(img.shape) == _shape(shape, kwargs)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.ones(3, dtype=torch.complex64).view(1, 1, 1, 3), {}, TypeError, "x: complex"),
        (np.ones((3, 3)), {}, TypeError, "x"),
        (torch.ones(0, 3, 4, 4), {}, ValueError, "x: expected a non-empty"),
        (torch.ones(2, 3, 0, 4), {}, ValueError, "x: expected a non-empty"),
        (torch.ones(5), {}, ValueError, "x: expected a 2-D"),
        (torch.ones(1, 2, 3, 4, 5), {}, ValueError, "x: expected a 2-D"),
        (torch.ones(2, 3, 4), {"kind": "conv"}, ValueError, "x: kind='conv'"),
        (torch.ones(2, 3, 4, 4), {"kind": "image"}, ValueError, "kind"),
        (torch.ones(2, 3, 4, 4), {"sample": 2}, ValueError, "sample"),
        (torch.ones(2, 3, 4, 4), {"sample": -3}, ValueError, "sample"),
        (torch.ones(2, 3, 4, 4), {"max_tiles": 0}, ValueError, "max_tiles"),
        (torch.ones(2, 3, 4, 4), {"tile": 2.5}, TypeError, "tile"),
        (torch.ones(2, 3, 4, 4), {"tile": [2]}, TypeError, "tile"),  # unhashable: not cached
        (torch.ones(2, 64, 4, 4), {"max_size": 10}, ValueError, "max_size"),
        (torch.ones(2, 3, 4, 4), {"background": 256}, ValueError, "background"),
    ],
)
def test_bad_inputs(x, kwargs, error, match, monkeypatch):
    """Bad inputs raise TypeError/ValueError naming the argument, on both backends."""
    with pytest.raises(error, match=match):
        thumbnail_reference(x, **kwargs)
    monkeypatch.setenv("TBPROBE_KERNELS", "triton")
    with pytest.raises(error, match=match):
        thumbnail(x, **kwargs)


def test_layout_cache_keeps_types():
    """The cached layout never lets a bool or a float stand in for the equal int it caches."""
    assert thumbnail_shape((2, 3, 4, 4), max_tiles=1, tile=2) == (2, 2)
    with pytest.raises(TypeError, match="max_tiles"):
        thumbnail_shape((2, 3, 4, 4), max_tiles=True, tile=2)
    with pytest.raises(TypeError, match="tile"):
        thumbnail_shape((2, 3, 4, 4), max_tiles=1, tile=2.0)


@needs_triton
def test_triton_negated_view_and_rarer_fp8():
    """A lazily negated view (``.conj().imag``) is read as its values, not its memory; fp8
    variants the kernel cannot decode are widened: both equal the reference."""
    gen = torch.Generator().manual_seed(3)
    z = torch.complex(
        torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 3, 5, 5, generator=gen)
    )
    neg = z.conj().imag
    assert neg.is_neg()
    torch.testing.assert_close(_triton(neg), thumbnail_reference(neg.resolve_neg()), rtol=0, atol=1)
    base = torch.tensor([[0.5, 1.0], [2.0, 4.0]])
    for dtype in (torch.float8_e4m3fnuz, torch.float8_e8m0fnu):
        x = base.to(dtype)
        assert torch.equal(_triton(x), thumbnail_reference(x)), dtype
