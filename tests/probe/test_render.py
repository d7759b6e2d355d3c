"""Host-side rendering of device thumbnails: sizes, layout, labels, colours, PNG bytes."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from tbprobe.kernels import thumbnail
from tbprobe.kernels.thumbnail import grid_shape, thumbnail_shape
from tbprobe.probe.render import (
    colormap,
    encode_indexed_png,
    palette,
    render_indexed,
    render_snapshot,
    render_snapshot_png,
)

INK = (20, 20, 20)


def _font():
    load = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    return load()


def _text(s):
    """The bitmap-font mask of ``s``, drawn independently of the module under test."""
    font = _font()
    _, _, w, h = font.getbbox(s)
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).text((0, 0), s, fill=255, font=font)
    return np.asarray(img) > 127


def _find_text(rgb, mask):
    """Top-left positions where ``mask`` appears exactly in ink (ink inside, none around it)."""
    ink = (rgb == INK).all(-1)
    dy, dx = np.argwhere(mask)[0]
    h, w = mask.shape
    found = []
    for y, x in np.argwhere(ink):
        y0, x0 = y - dy, x - dx
        if y0 < 0 or x0 < 0 or y0 + h > ink.shape[0] or x0 + w > ink.shape[1]:
            continue
        if np.array_equal(ink[y0 : y0 + h, x0 : x0 + w], mask):
            found.append((int(y0), int(x0)))
    return found


def _thumb(shape, kind, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return thumbnail(x, kind=kind, **kw).numpy()


def _synthetic(shape, kind, **kw):
    """A device-like thumbnail whose tile i is filled with grey level 4*i (i < 64)."""
    H, W = thumbnail_shape(shape, kind=kind, **kw)
    n = min(shape[1], kw.get("max_tiles", 64))
    rows, cols = grid_shape(n)
    th, tw = (H - (rows - 1)) // rows, (W - (cols - 1)) // cols
    img = np.full((H, W), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        img[r * (th + 1) : r * (th + 1) + th, c * (tw + 1) : c * (tw + 1) + tw] = 4 * i
    return img, n, rows, cols


CATALOGUE = [
    ((1, 1, 1, 1), "conv", {}),
    ((2, 3, 5, 9), "conv", {}),
    ((8, 32, 28, 28), "conv", {}),
    ((2, 256, 56, 56), "conv", {}),
    ((1, 64, 7, 7), "conv", {}),
    ((1, 3, 224, 224), "conv", {}),
    ((1, 17, 311, 384), "conv", {}),
    ((1, 1024, 4, 4), "conv", {"max_tiles": 1024}),
    ((1, 5, 64, 64), "conv", {"tile": 16}),
    ((1, 12, 32, 32), "attention", {}),
    ((1, 16, 512, 512), "attention", {}),
    ((1, 1, 1), "sequence", {}),
    ((2, 16, 768), "sequence", {}),
    ((1, 4096, 3), "sequence", {}),
    ((1, 2048, 4096), "sequence", {}),
    ((1, 1), "heatmap", {}),
    ((40, 30), "heatmap", {}),
    ((5, 9999), "heatmap", {}),
    ((2, 8, 6, 6), "auto", {}),
]


@pytest.mark.parametrize(("shape", "kind", "kw"), CATALOGUE)
@pytest.mark.parametrize("max_side", [600, 256])
def test_output_is_bounded_rgb(shape, kind, kw, max_side):
    """Every kind and shape gives a (H', W', 3) uint8 image at most max_side a side."""
    img = _thumb(shape, kind, **kw)
    rgb = render_snapshot(img, shape=shape, kind=kind, title="m" * 200, max_side=max_side, **kw)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert max(rgb.shape[:2]) <= max_side and min(rgb.shape[:2]) >= 32
    assert np.array_equal(palette()[render_indexed(img, shape=shape, kind=kind, **kw)][..., 0],
                          render_snapshot(img, shape=shape, kind=kind, **kw)[..., 0])  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "kind"), [((2, 30, 12, 12), "conv"), ((1, 9, 40, 60), "attention")]
)
def test_grid_tiles_colours_and_order(shape, kind):
    """Tile i shows colormap()[grey of tile i], at least as large as on the device, row-major."""
    img, n, rows, cols = _synthetic(shape, kind)
    rgb = render_snapshot(img, shape=shape, kind=kind)
    th, tw = shape[2], shape[3]
    centres = []
    for i in range(n):
        ys, xs = np.nonzero((rgb == colormap()[4 * i]).all(-1))
        assert ys.size >= th * tw * 0.9, f"tile {i}: {ys.size} pixels"  # minus its label box
        centres.append((ys.mean(), xs.mean()))
    for i in range(n):
        r, c = divmod(i, cols)
        if c + 1 < cols and i + 1 < n:
            assert centres[i + 1][1] > centres[i][1] and abs(centres[i + 1][0] - centres[i][0]) < 2
        if r + 1 < rows and i + cols < n:
            assert centres[i + cols][0] > centres[i][0]


@pytest.mark.parametrize(
    ("shape", "kind", "prefix"),
    [
        ((2, 30, 12, 12), "conv", ""),
        ((2, 64, 56, 56), "conv", ""),
        ((1, 12, 32, 32), "attention", "h"),
    ],
)
def test_grid_labels(shape, kind, prefix):
    """Each tile carries its channel index ("0", "1", ...) or head ("h0", ...) exactly once."""
    img = _thumb(shape, kind)
    rgb = render_snapshot(img, shape=shape, kind=kind, title="blocks.3.conv")
    n = min(shape[1], 64)
    positions = []
    for i in range(n):
        found = _find_text(rgb, _text(f"{prefix}{i}"))
        found = [p for p in found if p[0] > 15]  # below the title strip
        assert found, f"label {prefix}{i} missing"
        positions.append(found[0])
    assert _find_text(rgb, _text("blocks.3.conv")) == [(3, 3)]
    rows, cols = grid_shape(n)
    assert len({y for y, _ in positions}) == rows and len({x for _, x in positions}) == cols


def test_sequence_heatmap_axes_and_rows():
    """A sequence renders token rows top to bottom in colormap colours, with axis labels."""
    shape = (2, 16, 768)
    H, W = thumbnail_shape(shape, kind="sequence")
    assert (H, W) == (16, 512)
    img = np.repeat((np.arange(16, dtype=np.uint8) * 17)[:, None], W, 1)  # row i: grey 17*i
    rgb = render_snapshot(img, shape=shape, kind="sequence", title="h.0.mlp")
    tops = []
    for i in range(16):
        ys, xs = np.nonzero((rgb == colormap()[17 * i]).all(-1))
        assert xs.max() - xs.min() + 1 >= W and ys.size >= W * 8  # enlarged rows, full width
        tops.append(ys.min())
    assert tops == sorted(tops) and len(set(tops)) == 16
    assert _find_text(rgb, _text("feature"))
    assert _find_text(rgb, np.rot90(_text("token")))
    for tick in ("0", "15", "767"):
        assert _find_text(rgb, _text(tick)), tick


def test_heatmap_axes():
    """A 2-D heatmap gets row/column axis names and end ticks."""
    rgb = render_snapshot(_thumb((40, 30), "heatmap"), shape=(40, 30), kind="heatmap")
    assert _find_text(rgb, _text("column")) and _find_text(rgb, np.rot90(_text("row")))
    assert _find_text(rgb, _text("39")) and _find_text(rgb, _text("29"))


def test_colormap_is_viridis_like():
    """The colormap runs dark purple -> teal -> yellow with monotone rising luminance."""
    lut = colormap().astype(int)
    assert lut.shape == (256, 3)
    assert tuple(lut[0]) == (68, 1, 84) and tuple(lut[255]) == (253, 231, 37)
    luma = lut @ np.array([299, 587, 114])
    assert (np.diff(luma[::8]) > 0).all() and (np.diff(luma) > -300).all()  # 1-unit rounding
    assert len({tuple(c) for c in lut}) >= 250


def test_indexed_png_decodes_to_the_rgb_render():
    """render_snapshot_png decodes (Pillow) to exactly render_snapshot's pixels."""
    img = _thumb((2, 32, 28, 28), "conv")
    kw = {"shape": (2, 32, 28, 28), "kind": "conv", "title": "layer1"}
    png = render_snapshot_png(img, **kw)
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(decoded, render_snapshot(img, **kw))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"image": np.zeros((10, 10), np.uint8)}, ValueError, "image"),  # wrong size
        ({"image": np.zeros((131, 131), np.float32)}, ValueError, "image"),
        ({"image": [[0]]}, TypeError, "image"),
        ({"kind": "video"}, ValueError, "kind"),
        ({"kind": "sequence"}, ValueError, "shape"),  # 4-D shape for a 3-D kind
        ({"shape": (8, 16, 0, 32)}, TypeError, "shape"),
        ({"max_side": 10}, ValueError, "max_side"),
        ({"sample": -1}, ValueError, "sample"),
        ({"max_tiles": 0}, ValueError, "max_tiles"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    """Bad input raises ValueError/TypeError naming the argument."""
    args = {"image": np.zeros((131, 131), np.uint8), "shape": (8, 16, 32, 32), "kind": "conv"}
    args.update(kwargs)
    image = args.pop("image")
    with pytest.raises(error, match=name):
        render_snapshot(image, **args)


def test_encode_indexed_png_rejects_uncovered_indices():
    """A palette shorter than the largest index is refused."""
    with pytest.raises(ValueError, match="colors"):
        encode_indexed_png(np.full((2, 2), 5, np.uint8), np.zeros((3, 3), np.uint8))


def _resnet50_like():
    """Feature-map shapes of ResNet-50's conv outputs at 224x224, batch 1 (53 modules)."""
    for shape, count in (((64, 112, 112), 1), ((256, 56, 56), 10), ((512, 28, 28), 13)):
        yield from [shape] * count
    yield from [(1024, 14, 14)] * 19 + [(2048, 7, 7)] * 10


def test_large_model_snapshot_stays_small():
    """A ResNet-50-sized snapshot (53 conv maps, smooth ReLU activations) is under 3 MB of PNG;
    a white-noise map, the worst case, is under 300 KB."""
    g = torch.Generator().manual_seed(0)
    total = 0
    for i, (c, h, w) in enumerate(_resnet50_like()):
        n = min(c, 64)  # only the drawn channels matter to the thumbnail
        low = torch.randn(1, n, max(1, h // 4), max(1, w // 4), generator=g)
        x = F.relu(F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False))
        shape = (1, c, h, w)
        img = thumbnail(x, kind="conv").numpy()
        total += len(render_snapshot_png(img, shape=shape, kind="conv", title=f"layer.{i}"))
    assert total < 3_000_000, total
    for shape, kind in (((1, 256, 56, 56), "conv"), ((1, 1024, 768), "sequence")):
        png = render_snapshot_png(_thumb(shape, kind), shape=shape, kind=kind, title="noise")
        assert len(png) < 300_000, (shape, len(png))
