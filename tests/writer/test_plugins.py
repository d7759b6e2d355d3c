"""Plugin summaries (text, PR curves, custom scalars, mesh, hparams, raw tensors), checked against
tensorboardX 2.6.5 (and torch.utils.tensorboard for ``add_tensor``) as the oracle, and decoded
with TensorBoard's own reader code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

tbx_summary = pytest.importorskip("tensorboardX.summary")

from tensorboard.compat.proto import summary_pb2 as tb_summary_pb2  # noqa: E402
from tensorboard.plugins.mesh import metadata as tb_mesh_metadata  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402
from tensorboardX.proto import layout_pb2 as tbx_layout_pb2  # noqa: E402
from tensorboardX.proto import plugin_hparams_pb2 as tbx_hparams_pb2  # noqa: E402
from tensorboardX.proto import plugin_mesh_pb2 as tbx_mesh_pb2  # noqa: E402
from tensorboardX.proto import plugin_pr_curve_pb2 as tbx_pr_pb2  # noqa: E402
from tensorboardX.proto import summary_pb2 as tbx_summary_pb2  # noqa: E402
from torch.utils.tensorboard import summary as torch_summary  # noqa: E402

from tbprobe.writer import hparams, plugins  # noqa: E402
from tbprobe.writer.proto import summary_pb2, types_pb2  # noqa: E402

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None)
BAD = (ValueError, TypeError)


def as_tbx(value):
    """Our Value re-parsed into tensorboardX's proto classes (wire compatibility)."""
    return tbx_summary_pb2.Summary.Value.FromString(value.SerializeToString())


def tb_array(value) -> np.ndarray:
    """The tensor of a Value as TensorBoard's reader decodes it."""
    tb_value = tb_summary_pb2.Summary.Value.FromString(value.SerializeToString())
    return tensor_util.make_ndarray(tb_value.tensor)


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("text", ["hello", "", "**bold** _it_\n\n| a | b |", "héllo ✓ 日本"])
def test_text_matches_tensorboardx(text):
    """Text values are identical to tensorboardX's: tag, metadata and string tensor."""
    ours = plugins.text_value("notes", text)
    assert as_tbx(ours) == tbx_summary.text("notes", text).value[0]
    assert ours.tag == "notes/text_summary"
    assert tb_array(ours).tolist() == [text.encode("utf-8")]


@SETTINGS
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text(), max_size=2)))
def test_text_rejects_non_strings(bad):
    """Anything but a str as the text raises TypeError naming text_string."""
    with pytest.raises(TypeError, match="text_string"):
        plugins.text_value("notes", bad)


def test_text_rejects_unpaired_surrogates():
    """Text that cannot be UTF-8 encoded raises ValueError naming text_string."""
    with pytest.raises(ValueError, match="text_string"):
        plugins.text_value("notes", "bad \ud800")


# ----------------------------------------------------------------------------- PR curves


def _pr_case(n, seed=0, pred_dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    preds = rng.random(n).astype(pred_dtype)
    preds[:2] = (0.0, 1.0)  # both ends of the range
    return labels, preds, rng.random(n)


@pytest.mark.parametrize("num_thresholds", [2, 3, 10, 127, 128, 500])
@pytest.mark.parametrize("weighted", [False, True])
def test_pr_curve_matches_tensorboardx(num_thresholds, weighted):
    """Every number of the (6, T) tensor and the metadata equal tensorboardX's."""
    labels, preds, weights = _pr_case(1000)
    weights = weights if weighted else None
    ours = plugins.pr_curve_value("pr", labels, preds, num_thresholds, weights)
    theirs = tbx_summary.pr_curve("pr", labels, preds, num_thresholds, weights).value[0]
    np.testing.assert_array_equal(tb_array(ours), tb_array(theirs))
    assert tb_array(ours).shape == (6, min(num_thresholds, 127))
    assert as_tbx(ours).metadata == theirs.metadata
    content = tbx_pr_pb2.PrCurvePluginData.FromString(ours.metadata.plugin_data.content)
    assert content.num_thresholds == min(num_thresholds, 127)


@pytest.mark.parametrize("pred_dtype", [np.float16, np.float32, np.float64])
def test_pr_curve_dtypes_and_blocked_weighted_sums(pred_dtype):
    """Prediction dtypes and >65536 fractional weights (numpy sums in blocks) still match."""
    labels, preds, weights = _pr_case(70_001, seed=1, pred_dtype=pred_dtype)
    labels = labels.astype(bool)
    ours = plugins.pr_curve_value("pr", labels, preds, 127, weights)
    theirs = tbx_summary.pr_curve("pr", labels, preds, 127, weights).value[0]
    np.testing.assert_array_equal(tb_array(ours), tb_array(theirs))


def test_pr_curve_torch_inputs_scalar_weight_and_2d_shape():
    """Torch tensors, a scalar weight and 2-D inputs give tensorboardX's numbers."""
    labels, preds, _ = _pr_case(60)
    lt, pt = torch.from_numpy(labels.reshape(6, 10)), torch.from_numpy(preds.reshape(6, 10))
    ours = plugins.pr_curve_value("pr", lt, pt, 17, weights=0.5)
    theirs = tbx_summary.pr_curve("pr", labels.reshape(6, 10), preds.reshape(6, 10), 17, 0.5)
    np.testing.assert_array_equal(tb_array(ours), tb_array(theirs.value[0]))


def test_pr_curve_raw_matches_tensorboardx():
    """Raw curves keep the given rows; num_thresholds only sets (clamped) metadata."""
    rng = np.random.default_rng(2)
    counts = [rng.integers(0, 100, 9) for _ in range(4)]
    prec, rec = rng.random(9), rng.random(9)
    for nt in (9, 300):
        ours = plugins.pr_curve_raw_value("raw", *counts, prec, rec, num_thresholds=nt)
        theirs = tbx_summary.pr_curve_raw("raw", *counts, prec, rec, nt).value[0]
        np.testing.assert_array_equal(tb_array(ours), tb_array(theirs))
        assert as_tbx(ours).metadata == theirs.metadata


def _bad_pr_inputs():
    ok_l, ok_p = np.array([0, 1, 1]), np.array([0.1, 0.5, 0.9])
    return [
        dict(labels=np.array([0, 2, 1]), predictions=ok_p),  # not binary
        dict(labels=ok_l, predictions=np.array([0.1, 1.5, 0.2])),  # out of [0, 1]
        dict(labels=ok_l, predictions=np.array([0.1, np.nan, 0.2])),
        dict(labels=ok_l, predictions=np.array([0.1, 0.2])),  # shape mismatch
        dict(labels=np.array([]), predictions=np.array([])),
        dict(labels=ok_l, predictions=ok_p, num_thresholds=1),
        dict(labels=ok_l, predictions=ok_p, num_thresholds=True),
        dict(labels=ok_l, predictions=ok_p, num_thresholds=10.0),
        dict(labels=ok_l, predictions=ok_p, weights=np.array([1.0, -1.0, 1.0])),
        dict(labels=ok_l, predictions=ok_p, weights=np.array([1.0, np.nan, 1.0])),
        dict(labels=ok_l, predictions=ok_p, weights=np.ones(4)),
        dict(labels=["a", "b", "c"], predictions=ok_p),
    ]


@SETTINGS
@given(st.sampled_from(_bad_pr_inputs()))
def test_pr_curve_bad_inputs_raise(kwargs):
    """Non-binary labels, predictions outside [0, 1], mismatches and bad weights raise."""
    with pytest.raises(BAD) as err:
        plugins.pr_curve_value("pr", **kwargs)
    assert any(name in str(err.value) for name in kwargs)


@SETTINGS
@given(st.sampled_from(["length", "ndim", "nan", "empty", "str"]))
def test_pr_curve_raw_bad_inputs_raise(kind):
    """Mismatched lengths, 2-D rows, NaN, empty or non-numeric rows raise naming the row."""
    rows = [np.ones(5) for _ in range(6)]
    rows[3] = {
        "length": np.ones(4),
        "ndim": np.ones((5, 1)),
        "nan": np.full(5, np.nan),
        "empty": np.ones(0),
        "str": "abcde",
    }[kind]
    with pytest.raises(BAD, match="false_negative_counts"):
        plugins.pr_curve_raw_value("raw", *rows)


# ----------------------------------------------------------------------------- custom scalars

LAYOUT = {
    "Taiwan": {"twse": ["Multiline", ["twse/0050", "twse/2330"]]},
    "USA": {
        "dow": ["Margin", ["dow/aaa", "dow/bbb", "dow/ccc"]],
        "nasdaq": ["Margin", ["nasdaq/aaa", "nasdaq/bbb", "nasdaq/ccc"]],
    },
}


def test_custom_scalars_matches_tensorboardx():
    """The layout value is identical to tensorboardX's, and its Layout parses back."""
    ours = plugins.custom_scalars_value(LAYOUT)
    assert as_tbx(ours) == tbx_summary.custom_scalars(LAYOUT).value[0]
    assert ours.tag == "custom_scalars__config__"
    layout = tbx_layout_pb2.Layout.FromString(tb_array(ours).item())
    assert [c.title for c in layout.category] == ["Taiwan", "USA"]
    assert layout.category[1].chart[0].margin.series[0].upper == "dow/ccc"


def test_multiline_and_margin_shorthands_match_tensorboardx():
    """The chart shorthands build the layouts tensorboardX's writer methods build."""
    tags = ["a/x", "a/y"]
    ours = plugins.custom_scalars_value(plugins.multiline_layout(tags, "cat", "t"))
    theirs = tbx_summary.custom_scalars({"cat": {"t": ["Multiline", tags]}})
    assert as_tbx(ours) == theirs.value[0]
    ours = plugins.custom_scalars_value(plugins.margin_layout(["v", "lo", "hi"]))
    theirs = tbx_summary.custom_scalars({"default": {"untitled": ["Margin", ["v", "lo", "hi"]]}})
    assert as_tbx(ours) == theirs.value[0]


BAD_LAYOUTS = [
    {},
    [],
    {"c": {}},
    {"c": ["Multiline", ["a"]]},
    {"c": {"t": ["Pie", ["a"]]}},
    {"c": {"t": ["Margin", ["a", "b"]]}},
    {"c": {"t": ["Multiline", []]}},
    {"c": {"t": ["Multiline", "a"]}},
    {"c": {"t": ["Multiline", ["a", 3]]}},
    {"c": {"t": ["Multiline"]}},
    {1: {"t": ["Multiline", ["a"]]}},
    {"c": {2: ["Multiline", ["a"]]}},
]


@SETTINGS
@given(st.sampled_from(BAD_LAYOUTS))
def test_custom_scalars_bad_layouts_raise(layout):
    """Malformed layouts raise ValueError/TypeError naming the layout entry."""
    with pytest.raises(BAD, match="layout"):
        plugins.custom_scalars_value(layout)


def test_margin_shorthand_needs_three_tags():
    """margin_layout rejects anything but [value, lower, upper]; multiline needs a list."""
    with pytest.raises(ValueError, match="tags"):
        plugins.margin_layout(["a", "b"])
    with pytest.raises(TypeError, match="tags"):
        plugins.multiline_layout("a")


# ----------------------------------------------------------------------------- meshes


def _mesh(seed=0, b=2, n=12, f=7):
    rng = np.random.default_rng(seed)
    verts = rng.standard_normal((b, n, 3)).astype(np.float32)
    colors = rng.integers(0, 256, (b, n, 3)).astype(np.uint8)
    faces = rng.integers(0, n, (b, f, 3))
    return verts, colors, faces


@pytest.mark.parametrize("parts", [("v",), ("v", "c"), ("v", "f"), ("v", "c", "f")])
@pytest.mark.parametrize("config", [None, {"camera": {"fov": 75}, "lights": [1, 2]}])
def test_mesh_matches_tensorboardx(parts, config):
    """Tags, float tensors and plugin data equal tensorboardX's; components is the bitmask."""
    verts, colors, faces = _mesh()
    colors = colors if "c" in parts else None
    faces = faces if "f" in parts else None
    ours = plugins.mesh_values("m", verts, colors=colors, faces=faces, config_dict=config)
    theirs = tbx_summary.mesh("m", verts, colors, faces, config).value
    assert [v.tag for v in ours] == [v.tag for v in theirs]
    mask = sum(1 << ct for ct, p in ((1, "v"), (2, "f"), (3, "c")) if p in parts)
    for o, t in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(tb_array(o), tb_array(t))
        assert tb_array(o).dtype == np.float32
        ours_md = tbx_mesh_pb2.MeshPluginData.FromString(o.metadata.plugin_data.content)
        theirs_md = tbx_mesh_pb2.MeshPluginData.FromString(t.metadata.plugin_data.content)
        for field in ("version", "name", "content_type", "json_config", "shape"):
            assert getattr(ours_md, field) == getattr(theirs_md, field), field
        assert o.metadata.plugin_data.plugin_name == "mesh"
        tb_md = tb_mesh_metadata.parse_plugin_metadata(o.metadata.plugin_data.content)
        assert tb_md.components == mask
        assert tb_md.name == "m" and list(tb_md.shape) == list(tb_array(o).shape)


def test_mesh_torch_inputs():
    """Torch tensors (incl. bf16 vertices, int faces) give the same values as numpy."""
    verts, colors, faces = _mesh(seed=3)
    vt = torch.from_numpy(verts).to(torch.bfloat16)
    ours = plugins.mesh_values("m", vt, torch.from_numpy(colors), torch.from_numpy(faces))
    ref = plugins.mesh_values("m", vt.float().numpy(), colors, faces)
    assert [tb_array(v).tolist() for v in ours] == [tb_array(v).tolist() for v in ref]


def _bad_meshes():
    verts, colors, faces = _mesh()
    nan_verts = verts.copy()
    nan_verts[0, 0, 0] = np.nan
    return [
        dict(vertices=verts[0]),  # 2-D
        dict(vertices=verts[..., :2]),
        dict(vertices=verts[:, :0]),
        dict(vertices=nan_verts),
        dict(vertices=verts, colors=colors[:, :5]),
        dict(vertices=verts, colors=colors.astype(np.int64) + 200),
        dict(vertices=verts, colors=-colors.astype(np.int64) - 1),
        dict(vertices=verts, faces=faces + 12),
        dict(vertices=verts, faces=faces[:1]),
        dict(vertices=verts, faces=faces + 0.5),
        dict(vertices=verts, config_dict={"x": float("nan")}),
        dict(vertices=verts, config_dict={"x": object()}),
    ]


@SETTINGS
@given(st.sampled_from(_bad_meshes()))
def test_mesh_bad_inputs_raise(kwargs):
    """Wrong shapes, NaN vertices, bad colors/faces and non-JSON configs raise naming them."""
    with pytest.raises(BAD) as err:
        plugins.mesh_values("m", **kwargs)
    assert any(name in str(err.value) for name in kwargs)


# ----------------------------------------------------------------------------- hparams

HPARAMS = {"lr": 0.1, "bsize": 32, "opt": "adam", "amp": True, "act": math.sqrt, "skip": None}
METRICS = {"hparam/accuracy": 0.9, "hparam/loss": 1}


def test_hparams_match_tensorboardx():
    """The three values equal tensorboardX's: experiment, session start, session end."""
    ours = hparams.hparams_values(HPARAMS, METRICS)
    theirs = tbx_summary.hparams(HPARAMS, METRICS)
    assert [v.tag for v in ours] == list(plugins.HPARAMS_TAGS)
    for o, t in zip(ours, theirs, strict=True):
        assert as_tbx(o) == t.value[0]
        assert not o.HasField("tensor")
    start = tbx_hparams_pb2.HParamsPluginData.FromString(ours[1].metadata.plugin_data.content)
    assert start.session_start_info.hparams["act"].string_value == "sqrt"
    assert "skip" not in start.session_start_info.hparams


def test_hparams_tensor_and_numpy_scalars_are_numbers():
    """Torch and numpy scalars become numbers (bool ones become bools)."""
    hp = {"a": torch.tensor(0.5), "b": np.int64(3), "c": torch.tensor(True), "d": np.array([2])}
    values = hparams.hparams_values(hp, {"m": torch.tensor(1.0)})
    start = tbx_hparams_pb2.HParamsPluginData.FromString(values[1].metadata.plugin_data.content)
    got = {k: v.WhichOneof("kind") for k, v in start.session_start_info.hparams.items()}
    assert got == {"a": "number_value", "b": "number_value", "c": "bool_value", "d": "number_value"}
    assert start.session_start_info.hparams["a"].number_value == 0.5


@SETTINGS
@given(
    st.sampled_from(
        [
            ({1: 0.1}, {}, "hparam_dict"),
            ([("x", 1)], {}, "hparam_dict"),
            ({}, {"m": "high"}, "metric_dict\\['m'\\]"),
            ({}, {"m": None}, "metric_dict\\['m'\\]"),
            ({}, {"m": np.ones(2)}, "metric_dict\\['m'\\]"),
            ({}, {2: 1.0}, "metric_dict"),
            ({}, None, "metric_dict"),
        ]
    )
)
def test_hparams_bad_inputs_raise(case):
    """Non-str keys, non-dicts and non-numeric metrics raise, naming the argument."""
    hparam_dict, metric_dict, pattern = case
    with pytest.raises(BAD, match=pattern):
        hparams.hparams_values(hparam_dict, metric_dict)


# ----------------------------------------------------------------------------- raw tensors

TORCH_READABLE = [torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64]
TORCH_READABLE += [torch.bool]
SHAPES = [(), (0,), (5,), (2, 3, 4), (3, 1, 7)]


@pytest.mark.parametrize("dtype", TORCH_READABLE)
@pytest.mark.parametrize("shape", SHAPES)
def test_tensor_matches_torch_add_tensor(dtype, shape):
    """Where torch's own TensorProto reads back, TensorBoard decodes ours to the same array."""
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    ours = plugins.tensor_value("x", t)
    theirs = torch_summary.tensor_proto("x", t).value[0]
    np.testing.assert_array_equal(tb_array(ours), tb_array(theirs))
    assert tb_array(ours).dtype == t.numpy().dtype
    assert ours.tensor.dtype == theirs.tensor.dtype
    assert ours.metadata.plugin_data.plugin_name == theirs.metadata.plugin_data.plugin_name
    assert ours.metadata.data_class == summary_pb2.DATA_CLASS_TENSOR


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, types_pb2.DT_HALF),
        (torch.uint8, types_pb2.DT_UINT8),
        (torch.bfloat16, types_pb2.DT_FLOAT),
        (torch.float8_e4m3fn, types_pb2.DT_FLOAT),
        (torch.uint16, types_pb2.DT_INT64),
    ],
)
def test_tensor_dtypes_torch_writes_unreadably(dtype, expected):
    """fp16/uint8 keep their dtype, bf16/fp8 widen exactly to fp32 (torch's protos read wrong)."""
    x = torch.tensor([[0.0, 1.5, -2.0], [3.0, 0.25, 100.0]])
    if dtype == torch.bfloat16:
        x[0, 0] = 1e30  # past fp16's range: torch's own bf16 -> fp16 path makes this inf
    t = x.abs().to(dtype) if dtype in (torch.uint8, torch.uint16) else x.to(dtype)
    ours = plugins.tensor_value("x", t)
    assert ours.tensor.dtype == expected
    np.testing.assert_array_equal(tb_array(ours), t.to(torch.float64).numpy())


def test_tensor_non_contiguous_and_big_endian():
    """Transposed tensors and big-endian arrays are stored little-endian in logical order."""
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    np.testing.assert_array_equal(tb_array(plugins.tensor_value("x", t)), t.numpy())
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    np.testing.assert_array_equal(tb_array(plugins.tensor_value("x", big)), big)


@SETTINGS
@given(st.sampled_from([torch.ones(2, dtype=torch.complex64), np.array(["a"]), "abc", None]))
def test_tensor_bad_inputs_raise(bad):
    """Complex, string and non-array inputs raise TypeError naming the tensor."""
    with pytest.raises(TypeError, match="tensor"):
        plugins.tensor_value("x", bad)


@SETTINGS
@given(st.sampled_from([None, 3, b"tag", ""]))
def test_bad_tags_raise(tag):
    """Every builder rejects a missing or non-str tag."""
    with pytest.raises(BAD, match="tag"):
        plugins.text_value(tag, "x")
    with pytest.raises(BAD, match="tag"):
        plugins.tensor_value(tag, np.ones(2))
