"""Images, boxes, figures and videos, checked against tensorboardX 2.6.5 as the oracle."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

tbx_summary = pytest.importorskip("tensorboardX.summary")
tbx_utils = pytest.importorskip("tensorboardX.utils")

from tbprobe.writer import boxes as bx  # noqa: E402  (after the oracle import check)
from tbprobe.writer import image as img  # noqa: E402
from tbprobe.writer import video as vid  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]
INT_DTYPES += [torch.uint16, torch.uint32, torch.uint64]
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
# (dataformats, shape): odd sizes, every letter order, grids with and without empty cells
LAYOUTS = [
    ("HW", (7, 11)),
    ("WH", (11, 7)),
    ("CHW", (1, 7, 11)),
    ("CHW", (3, 7, 11)),
    ("CHW", (4, 7, 11)),
    ("HWC", (7, 11, 3)),
    ("HWC", (7, 11, 1)),
    ("WCH", (11, 4, 7)),
    ("chw", (3, 5, 2)),
    ("NCHW", (10, 3, 5, 4)),
    ("NCHW", (8, 1, 5, 4)),
    ("NHWC", (3, 5, 4, 4)),
    ("HNWC", (5, 17, 4, 3)),
]


def decode(png: bytes) -> np.ndarray:
    """Pixels of an encoded image as (H, W, C) uint8; grayscale is expanded to RGB."""
    im = Image.open(io.BytesIO(png))
    if im.mode in ("L", "P"):
        im = im.convert("RGB")
    return np.asarray(im)


def tbx_pixels(array, dataformats: str) -> np.ndarray:
    return decode(
        tbx_summary.image("t", array, dataformats=dataformats).value[0].image.encoded_image_string
    )


def our_pixels(array, dataformats: str) -> np.ndarray:
    return decode(
        img.image_value("t", img.to_uint8_hwc(array, dataformats)).image.encoded_image_string
    )


def sanitised(x: np.ndarray) -> np.ndarray:
    """What tensorboardX must be fed to see our clipping: NaN->0, then clip to [0, 1]."""
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0, 1).astype(x.dtype)


def wild_tensor(shape, dtype, seed: int = 0) -> torch.Tensor:
    """Values in and far outside [0, 1] plus NaN/Inf for floats; any in-range ints for ints."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        lo, hi = max(info.min, -300), min(info.max, 300)
        return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64).to(dtype)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 1.4 - 0.2
    flat = x.view(-1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6, -1e6, 0.5, 1.0])
    flat[: min(flat.numel(), specials.numel())] = specials[: flat.numel()]
    return x.to(dtype)


# ----------------------------------------------------------------------------- add_image


@pytest.mark.parametrize(("dataformats", "shape"), LAYOUTS)
def test_layouts_match_tensorboardx(dataformats, shape):
    """Every dataformats (incl. grayscale, RGBA, grids) decodes to tensorboardX's pixels."""
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    assert np.array_equal(our_pixels(x, dataformats), tbx_pixels(x, dataformats))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_float_dtypes_match_tensorboardx(dtype):
    """float16/32/64 in [0, 1] give tensorboardX's pixels (scaled in their own precision)."""
    x = np.random.default_rng(2).random((3, 33, 17)).astype(dtype)
    assert np.array_equal(our_pixels(x, "CHW"), tbx_pixels(x, "CHW"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
def test_torch_float_tensors_match_tensorboardx(dtype):
    """Host tensors of each float dtype match tensorboardX (bf16 against its exact fp32 value)."""
    t = torch.rand(3, 21, 19, generator=torch.Generator().manual_seed(3)).to(dtype)
    oracle = t.float() if dtype == torch.bfloat16 else t  # tensorboardX rejects bf16
    assert np.array_equal(our_pixels(t, "CHW"), tbx_pixels(oracle, "CHW"))


def test_uint8_bool_int_match_tensorboardx():
    """uint8 passes through; bool and 0/1 ints scale by 255, as in tensorboardX."""
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    assert np.array_equal(our_pixels(u8, "CHW"), tbx_pixels(u8, "CHW"))
    for x in (rng.random((3, 8, 8)) > 0.5, rng.integers(0, 2, (8, 8, 3)).astype(np.int32)):
        fmt = "CHW" if x.shape[0] == 3 else "HWC"
        assert np.array_equal(our_pixels(x, fmt), tbx_pixels(x, fmt))
    t = torch.from_numpy(u8)
    assert np.array_equal(our_pixels(t, "CHW"), tbx_pixels(t, "CHW"))


def test_out_of_range_nan_inf_are_clipped():
    """Floats outside [0, 1], NaN and Inf, and ints above 1 saturate instead of wrapping."""
    x = np.random.default_rng(5).normal(0.5, 2.0, (3, 16, 16)).astype(np.float32)
    x[0, 0, :3] = [np.nan, np.inf, -np.inf]
    assert np.array_equal(our_pixels(x, "CHW"), tbx_pixels(sanitised(x), "CHW"))
    ints = np.random.default_rng(6).integers(-5, 6, (3, 4, 4))
    assert np.array_equal(our_pixels(ints, "CHW"), tbx_pixels(np.clip(ints, 0, 1), "CHW"))


def test_python_lists_and_scalars_of_images():
    """A nested Python list is an image like the equivalent numpy array."""
    x = [[0.0, 0.25], [0.5, 1.0]]
    assert np.array_equal(our_pixels(x, "HW"), tbx_pixels(x, "HW"))


def test_every_fp16_value_numpy_torch_and_tensorboardx_agree():
    """All 65536 fp16 bit patterns: numpy == torch twin, and == tensorboardX where defined."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    ours = img.to_uint8_hwc(x, "HW")
    twin = img.to_uint8_hwc_torch(torch.from_numpy(x.copy()), "HW").numpy()
    assert np.array_equal(ours, twin)
    assert np.array_equal(our_pixels(x, "HW"), tbx_pixels(sanitised(x), "HW"))


def test_every_bf16_value_numpy_and_torch_agree():
    """All 65536 bf16 bit patterns: numpy (via exact fp32) == torch twin == fp32 oracle."""
    t = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    t = t.reshape(256, 256)
    ours = img.to_uint8_hwc(t, "HW")
    assert np.array_equal(ours, img.to_uint8_hwc_torch(t, "HW").numpy())
    f32 = t.float().numpy()
    assert np.array_equal(ours[:, :, 0], img.to_uint8_hwc(sanitised(f32), "HW")[:, :, 0])
    assert np.array_equal(our_pixels(t, "HW"), tbx_pixels(sanitised(f32), "HW"))


def test_float32_rounding_boundaries():
    """Values next to k/255 truncate exactly as tensorboardX does, in numpy and torch."""
    k = np.arange(256, dtype=np.float32) / np.float32(255)
    x = np.stack([np.nextafter(k, -1), k, np.nextafter(k, 2)]).astype(np.float32)  # (3, 256)
    ours = img.to_uint8_hwc(x, "HW")
    assert np.array_equal(ours, img.to_uint8_hwc_torch(torch.from_numpy(x), "HW").numpy())
    assert np.array_equal(our_pixels(x, "HW"), tbx_pixels(sanitised(x), "HW"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES + FP8_DTYPES, ids=str)
@pytest.mark.parametrize(("dataformats", "shape"), LAYOUTS[::2])
def test_torch_twin_is_bit_identical_to_numpy(dtype, dataformats, shape):
    """The torch twin gives the numpy path's exact uint8 for every dtype and layout."""
    t = wild_tensor(shape, dtype)
    expected = img.to_uint8_hwc(t, dataformats)
    got = img.to_uint8_hwc_torch(t, dataformats)
    assert got.dtype == torch.uint8 and got.is_contiguous() and got.device == t.device
    assert np.array_equal(got.numpy(), expected)
    assert expected.flags.c_contiguous and expected.dtype == np.uint8


def test_results_never_alias_the_input():
    """uint8 HWC/HW inputs are copied: a caller reusing its buffer cannot alter a pending image."""
    for fmt, shape in (("HWC", (4, 5, 3)), ("HW", (4, 5))):
        u8 = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
        t = torch.from_numpy(u8.copy())
        assert not np.shares_memory(img.to_uint8_hwc(u8, fmt), u8)
        assert not np.shares_memory(img.to_uint8_hwc(t, fmt), t.numpy())
        assert not np.shares_memory(img.to_uint8_hwc_torch(t, fmt).numpy(), t.numpy())


def test_non_contiguous_inputs():
    """Transposed, sliced and negatively strided inputs give the same pixels as copies."""
    base = torch.rand(6, 9, 3, generator=torch.Generator().manual_seed(7))
    t = base.permute(2, 0, 1)[:, ::2, 1:]  # (3, 3, 8), non-contiguous
    expected = img.to_uint8_hwc(t.contiguous(), "CHW")
    assert np.array_equal(img.to_uint8_hwc(t, "CHW"), expected)
    assert np.array_equal(img.to_uint8_hwc_torch(t, "CHW").numpy(), expected)
    flipped = t.numpy()[:, ::-1]
    assert np.array_equal(img.to_uint8_hwc(flipped, "CHW"), expected[::-1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.uint8, torch.int32, torch.bool], ids=str)
def test_torch_twin_runs_on_meta_tensors(dtype):
    """The twin never reads values on the host: it runs on data-less meta tensors."""
    out = img.images_to_uint8_hwc_torch(torch.empty(10, 3, 5, 4, dtype=dtype, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (10, 32, 3)
    out = img.to_uint8_hwc_torch(torch.empty(7, 11, dtype=dtype, device="meta"), "HW")
    assert out.dtype == torch.uint8 and tuple(out.shape) == (7, 11, 1)


# ----------------------------------------------------------------------------- add_images


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 17])
def test_images_grid_matches_make_grid(n):
    """add_images' grid (8 columns, no padding, black unused cells) equals tensorboardX's."""
    x = np.random.default_rng(n).random((n, 3, 6, 5), dtype=np.float32)
    ours = img.images_to_uint8_hwc(x)
    assert ours.shape == (6 * -(-n // min(n, 8)), 5 * min(n, 8), 3)
    grid = tbx_utils.make_grid(x).transpose(1, 2, 0)
    assert np.array_equal(ours, (grid * 255.0).astype(np.uint8))
    assert np.array_equal(decode(img.encode_png(ours)), tbx_pixels(x, "NCHW"))
    assert np.array_equal(img.images_to_uint8_hwc_torch(torch.from_numpy(x)).numpy(), ours)


def test_images_from_a_list():
    """A list of CHW/HWC images is stacked like tensorboardX's add_images does."""
    chw = [torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = img.images_to_uint8_hwc(torch.stack(chw))
    assert np.array_equal(img.images_to_uint8_hwc(chw, "CHW"), expected)
    assert np.array_equal(img.images_to_uint8_hwc_torch(chw, "CHW").numpy(), expected)
    hwc = [t.permute(1, 2, 0).numpy() for t in chw]
    assert np.array_equal(img.images_to_uint8_hwc(hwc, "HWC"), expected)


# ----------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 9, 3), (9, 1, 4), (31, 17, 3), (64, 48, 1)])
def test_png_round_trip(shape):
    """encode_png decodes (Pillow) to the exact pixels; image_value carries the right sizes."""
    x = np.random.default_rng(8).integers(0, 256, shape, dtype=np.uint8)
    im = Image.open(io.BytesIO(img.encode_png(x)))
    im.load()
    assert im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
    assert np.array_equal(np.asarray(im).reshape(shape), x)
    value = img.image_value("a/b", x)
    assert value.tag == "a/b"
    assert (value.image.height, value.image.width, value.image.colorspace) == shape


def test_png_compresses_smooth_images():
    """A smooth image compresses well (the Up filter and zlib level 1 do their job)."""
    yy, xx = np.mgrid[0:256, 0:256]
    x = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    assert len(img.encode_png(x)) < x.nbytes // 20


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("labels", [None, ["cat", "a dog"]])
def test_boxes_match_tensorboardx(channels, labels):
    """Boxes and labels are drawn with tensorboardX's pixels (grayscale becomes RGB)."""
    x = np.random.default_rng(10).random((channels, 60, 80), dtype=np.float32)
    boxes = np.array([[5, 6, 40, 30], [20.5, 25.25, 75, 58]], dtype=np.float32)
    drawn = bx.draw_boxes(img.to_uint8_hwc(x), boxes, labels)
    oracle = tbx_summary.image_boxes("t", x, boxes, labels=labels).value[0].image
    assert np.array_equal(decode(img.encode_png(drawn)), decode(oracle.encoded_image_string))


def test_int_boxes_and_single_string_label():
    """Integer boxes from torch and a single string label for one box match tensorboardX."""
    x = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(11))
    boxes = torch.tensor([[2, 3, 30, 35]])
    drawn = bx.draw_boxes(img.to_uint8_hwc(x), boxes, "only")
    oracle = tbx_summary.image_boxes("t", x, boxes, labels=["only"]).value[0].image
    assert np.array_equal(decode(img.encode_png(drawn)), decode(oracle.encoded_image_string))
    no_boxes = bx.draw_boxes(img.to_uint8_hwc(x), np.zeros((0, 4)))
    assert np.array_equal(no_boxes, img.to_uint8_hwc(x))


def test_bad_boxes_and_labels():
    """Wrong box shapes and non-string labels raise, naming the argument."""
    hwc = np.zeros((8, 8, 3), np.uint8)
    for boxes in (np.zeros(4), np.zeros((2, 3)), np.zeros((1, 4, 1))):
        with pytest.raises(ValueError, match="box_tensor"):
            bx.draw_boxes(hwc, boxes)
    with pytest.raises(TypeError, match="labels"):
        bx.draw_boxes(hwc, np.zeros((1, 4)), [3])
    with pytest.raises(TypeError, match="box_tensor"):
        bx.draw_boxes(hwc, "boxes")
    for rescale, error in ((0, ValueError), (-1.0, ValueError), (np.nan, ValueError)):
        with pytest.raises(error, match="rescale"):
            bx.draw_boxes(hwc, np.zeros((1, 4)), rescale=rescale)
    with pytest.raises(ValueError, match="rescale"):
        bx.draw_boxes(hwc, np.zeros((1, 4)), rescale=0.1)  # 8 x 0.1 rounds down to 0 pixels
    with pytest.raises(TypeError, match="rescale"):
        bx.draw_boxes(hwc, np.zeros((1, 4)), rescale="2")


def test_label_count_mismatch_warns_and_draws_unlabelled():
    """Labels whose count differs from the boxes' are dropped with a warning, as in
    tensorboardX: the pixels equal tensorboardX's boxes without labels."""
    x = np.random.default_rng(12).random((3, 40, 50), dtype=np.float32)
    boxes = np.array([[2, 3, 30, 35], [10, 5, 45, 20]])
    with pytest.warns(RuntimeWarning, match="labels"):
        drawn = bx.draw_boxes(img.to_uint8_hwc(x), boxes, ["only one"])
    oracle = tbx_summary.image_boxes("t", x, boxes, labels=None).value[0].image
    assert np.array_equal(decode(img.encode_png(drawn)), decode(oracle.encoded_image_string))


def test_none_label_draws_that_box_unlabelled():
    """A None label draws its box without a label; the other labels are drawn."""
    x = np.random.default_rng(13).random((3, 40, 50), dtype=np.float32)
    boxes = np.array([[2, 3, 30, 35], [10, 5, 45, 20]])
    drawn = bx.draw_boxes(img.to_uint8_hwc(x), boxes, [None, "dog"])
    oracle = tbx_summary.image_boxes("t", x, boxes, labels=["", "dog"]).value[0].image
    assert np.array_equal(decode(img.encode_png(drawn)), decode(oracle.encoded_image_string))


def test_non_finite_boxes_are_skipped():
    """A box with NaN or infinite coordinates is skipped with a warning; the others are
    drawn as tensorboardX draws them alone, and huge finite boxes do not crash Pillow."""
    x = np.random.default_rng(14).random((3, 40, 50), dtype=np.float32)
    good = np.array([[2.0, 3.0, 30.0, 35.0]])
    bad = np.array([[np.nan, 1, 5, 5], [0, 0, np.inf, 9]])
    with pytest.warns(RuntimeWarning, match="skipped 2 box"):
        drawn = bx.draw_boxes(img.to_uint8_hwc(x), np.concatenate([bad, good]), ["a", "b", "c"])
    oracle = tbx_summary.image_boxes("t", x, good, labels=["c"]).value[0].image
    assert np.array_equal(decode(img.encode_png(drawn)), decode(oracle.encoded_image_string))
    huge = bx.draw_boxes(img.to_uint8_hwc(x), [[-1e30, 2, 1e30, 30]], ["far"])
    assert huge.shape == (40, 50, 3) and (huge[30, 10:40] == (255, 0, 0)).all()


@pytest.mark.parametrize("rescale", [2, 0.5, 1.5, np.float32(3.0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_boxes_rescale_matches_tensorboardx(rescale, channels):
    """rescale resizes the drawn image (boxes and labels with it) to tensorboardX's pixels."""
    x = np.random.default_rng(15).random((channels, 30, 44), dtype=np.float32)
    boxes = np.array([[2, 3, 30, 25], [10, 5, 40, 20]])
    drawn = bx.draw_boxes(img.to_uint8_hwc(x), boxes, ["cat", "dog"], rescale=rescale)
    assert drawn.shape[:2] == (int(30 * rescale), int(44 * rescale))
    oracle = tbx_summary.image_boxes("t", x, boxes, rescale=rescale, labels=["cat", "dog"])
    expected = decode(oracle.value[0].image.encoded_image_string)
    assert np.array_equal(decode(img.encode_png(drawn)), expected)


# ----------------------------------------------------------------------------- figures


def _figure(seed: int, size=(2.0, 1.5)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=50)
    fig.add_subplot().plot(np.random.default_rng(seed).normal(size=20).cumsum())
    return fig


def test_figure_matches_tensorboardx():
    """A figure and a list of figures render to tensorboardX's pixels (and grid)."""
    pytest.importorskip("matplotlib")
    ours = img.figure_to_hwc(_figure(0), close=False)
    assert ours.shape == (75, 100, 3)
    assert np.array_equal(ours, tbx_utils.figure_to_image(_figure(0)).transpose(1, 2, 0))
    figs = [_figure(i) for i in range(3)]
    grid = img.figure_to_hwc(figs)
    oracle = tbx_utils.figure_to_image([_figure(i) for i in range(3)])
    assert np.array_equal(decode(img.encode_png(grid)), tbx_pixels(oracle, "NCHW"))


def test_figure_close_and_keep_canvas():
    """close=True closes a pyplot figure; close=False leaves the figure's own canvas in place."""
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = plt.figure(figsize=(1, 1), dpi=20)
    canvas = fig.canvas
    img.figure_to_hwc(fig, close=False)
    assert fig.canvas is canvas and plt.fignum_exists(fig.number)
    img.figure_to_hwc(fig)
    assert not plt.fignum_exists(fig.number)


def test_figure_errors(monkeypatch):
    """Missing matplotlib names the package; a non-figure or a mixed-size list raises."""
    pytest.importorskip("matplotlib")
    with pytest.raises(TypeError, match="figure"):
        img.figure_to_hwc(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="figure"):
        img.figure_to_hwc([_figure(0), _figure(1, size=(1.0, 1.0))])
    with pytest.raises(ValueError, match="figure"):
        img.figure_to_hwc([])
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        img.figure_to_hwc(_figure(0))


# ----------------------------------------------------------------------------- video


def tbx_frames(x: np.ndarray, dataformats: str = "NTCHW") -> np.ndarray:
    """tensorboardX's frames (all of video() but the moviepy encode)."""
    frames = tbx_utils._prepare_video(tbx_utils.convert_to_NTCHW(x, dataformats))
    return frames if frames.dtype == np.uint8 else (frames * 255.0).astype(np.uint8)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_video_frames_match_tensorboardx(n, channels):
    """Clip grid (power-of-two padding, rows/cols) and scaling equal tensorboardX's frames."""
    rng = np.random.default_rng(n * 10 + channels)
    dyadic = (rng.integers(0, 257, (n, 3, channels, 4, 5)) / 256).astype(np.float32)
    assert np.array_equal(vid.video_frames(dyadic), tbx_frames(dyadic))
    u8 = rng.integers(0, 256, (n, 3, channels, 4, 5), dtype=np.uint8)
    assert np.array_equal(vid.video_frames(u8), tbx_frames(u8))
    nthwc = u8.transpose(0, 1, 3, 4, 2)
    assert np.array_equal(vid.video_frames(nthwc, "NTHWC"), tbx_frames(nthwc, "NTHWC"))


def test_video_float_without_padding_matches_tensorboardx():
    """Random float32 clips (power-of-two N, so tensorboardX stays in fp32) match exactly."""
    x = np.random.default_rng(12).random((4, 2, 3, 6, 7), dtype=np.float32)
    assert np.array_equal(vid.video_frames(x), tbx_frames(x))


@pytest.mark.parametrize("channels", [1, 3])
def test_video_gif_decodes_to_frames(channels):
    """The GIF loops forever, shows each frame 1000/fps ms and decodes to the exact frames."""
    rng = np.random.default_rng(13)
    palette = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    frames = palette[rng.integers(0, 50, (2, 5, 8, 6))]  # (N, T, H, W, 3), 50 colours
    clips = frames[..., :channels].transpose(0, 1, 4, 2, 3)  # NTCHW
    value = vid.video_value("v", clips, fps=5)
    assert (value.tag, value.image.height, value.image.width) == ("v", 8, 12)
    assert value.image.colorspace == channels
    gif = Image.open(io.BytesIO(value.image.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.info["loop"] == 0
    expected = vid.video_frames(clips)
    for t in range(5):
        gif.seek(t)
        assert gif.info["duration"] == 200
        got = np.asarray(gif.convert("RGB"))
        assert np.array_equal(got, np.repeat(expected[t], 3 // channels, axis=-1))


@pytest.mark.parametrize(("fps", "ms"), [(4, 250), (8, 130), (30, 30), (0.5, 2000), (1000, 20)])
def test_gif_frame_duration(fps, ms):
    """Frame delays are 1000/fps ms rounded to GIF's centiseconds, at least 20 ms."""
    gif = Image.open(io.BytesIO(vid.encode_gif(np.zeros((1, 2, 2, 3), np.uint8), fps)))
    assert gif.info["duration"] == ms


def test_video_bad_inputs():
    """Bad fps, dataformats, ranks, channels and empty clips raise, naming the argument."""
    x = np.zeros((1, 2, 3, 4, 4), np.float32)
    for fps, error in ((0, ValueError), (float("nan"), ValueError), ("4", TypeError)):
        with pytest.raises(error, match="fps"):
            vid.video_value("v", x, fps=fps)
    with pytest.raises(ValueError, match="dataformats"):
        vid.video_frames(x, "NTCHH")
    with pytest.raises(ValueError, match="vid_tensor"):
        vid.video_frames(x[0])
    with pytest.raises(ValueError, match="vid_tensor"):
        vid.video_frames(np.zeros((1, 2, 2, 4, 4)))
    with pytest.raises(ValueError, match="vid_tensor"):
        vid.video_frames(np.zeros((0, 2, 3, 4, 4)))


# ----------------------------------------------------------------------------- bad inputs

VALID_FORMATS = ("HW", "WH", "CHW", "CWH", "HCW", "HWC", "WCH", "WHC")
BOTH = [img.to_uint8_hwc, lambda x, f: img.to_uint8_hwc_torch(torch.as_tensor(x), f)]


@SETTINGS
@given(
    fmt=st.sampled_from(VALID_FORMATS + ("NCHW", "NHWC")),
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=6),
)
def test_wrong_rank_names_the_argument(fmt, shape):
    """A rank that does not match dataformats raises ValueError naming img_tensor."""
    if len(shape) == len(fmt):
        shape.append(1)
    for fn in BOTH:
        with pytest.raises(ValueError, match="img_tensor"):
            fn(np.zeros(shape, np.float32), fmt)


@SETTINGS
@given(fmt=st.text(alphabet="NCHWXhw ", max_size=6))
def test_bad_dataformats_strings(fmt):
    """Anything but an ordering of HW, CHW or NCHW raises ValueError naming dataformats."""
    if "".join(sorted(fmt.upper())) in ("HW", "CHW", "CHNW"):
        return
    for fn in BOTH:
        with pytest.raises(ValueError, match="dataformats"):
            fn(np.zeros((3, 3, 3), np.float32), fmt)


@SETTINGS
@given(channels=st.sampled_from([5, 6]), fmt=st.sampled_from(["CHW", "HWC", "NCHW"]))
def test_bad_channel_counts(channels, fmt):
    """Channel counts other than 1, 2, 3 or 4 raise ValueError naming the argument."""
    shape = [2] * len(fmt)
    shape[fmt.index("C")] = channels
    for fn in BOTH:
        with pytest.raises(ValueError, match="img_tensor"):
            fn(np.zeros(shape, np.float32), fmt)


@SETTINGS
@given(shape=st.lists(st.integers(0, 3), min_size=3, max_size=3).filter(lambda s: 0 in s))
def test_empty_images(shape):
    """Zero-size images raise ValueError naming the argument."""
    shape[0] = 3 if shape[0] else 0
    for fn in BOTH:
        with pytest.raises(ValueError, match="img_tensor"):
            fn(np.zeros(shape, np.float32), "CHW")


@SETTINGS
@given(
    value=st.one_of(
        st.none(),
        st.text(max_size=3),
        st.just(np.zeros((3, 2, 2), np.complex64)),
        st.just(np.array([["a"]])),
        st.just(np.zeros((3, 2, 2), object)),
        st.just({"a": 1}),
    )
)
def test_non_numeric_inputs(value):
    """Non-numeric and complex inputs raise TypeError naming img_tensor."""
    with pytest.raises(TypeError, match="img_tensor"):
        img.to_uint8_hwc(value, "CHW")
    with pytest.raises(TypeError, match="img_tensor"):
        img.to_uint8_hwc_torch(value, "CHW")


def test_complex_tensor_and_bad_format_type():
    """A complex tensor and a non-string dataformats raise TypeError naming the argument."""
    with pytest.raises(TypeError, match="img_tensor"):
        img.to_uint8_hwc_torch(torch.zeros(3, 2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="img_tensor"):
        img.to_uint8_hwc(torch.zeros(3, 2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="dataformats"):
        img.to_uint8_hwc(np.zeros((3, 2, 2)), 3)


def test_bad_hwc_for_encoding():
    """encode_png and image_value accept only (H, W, C) uint8 with C in {1, 2, 3, 4}."""
    for bad in (np.zeros((2, 2, 3), np.float32), np.zeros((2, 2)), np.zeros((2, 2, 5), np.uint8)):
        with pytest.raises(ValueError, match="hwc_uint8"):
            img.encode_png(bad)
    with pytest.raises(ValueError, match="img_tensor"):
        img.images_to_uint8_hwc([], "CHW")


@SETTINGS
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(FLOAT_DTYPES + INT_DTYPES))
def test_random_tensors_twin_equals_numpy(seed, dtype):
    """Random wild tensors: the torch twin equals the numpy path on grids."""
    t = wild_tensor((5, 3, 4, 3), dtype, seed)
    assert np.array_equal(img.images_to_uint8_hwc_torch(t).numpy(), img.images_to_uint8_hwc(t))
