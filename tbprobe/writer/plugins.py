"""Summary values for TensorBoard's plugin dashboards: text, PR curves, custom scalars, meshes,
hparams, and raw tensors.

Every builder returns ``Summary.Value`` protos with their plugin metadata, laid out as
tensorboardX 2.6.5 writes them (tags, plugin names, versions, numbers), leaving ``data_class``
unset as it does: both TensorBoard readers fill it in from the plugin name. Differences:
numeric tensors are little-endian ``tensor_content`` (both readers decode it, and it is far
faster to build than ``float_val``), and bad input raises ValueError/TypeError naming the
argument where tensorboardX asserts, fails later or writes what the dashboard cannot show.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from tbprobe.writer.proto import plugins_pb2, summary_pb2, tensor_pb2, types_pb2
from tbprobe.writer.values import check_int as _check_int
from tbprobe.writer.values import to_numpy

_VERSION = 0  # the plugin-data version tensorboardX writes for every plugin here
_MAX_PR_THRESHOLDS = 127  # tensorboardX clamps num_thresholds to this
_MAX_TENSOR_BYTES = 1 << 31  # a TensorProto must stay under protobuf's 2 GiB limit
_FLOAT32_EXACT_INT = 1 << 24  # mesh faces are stored as float32, exact up to here
CUSTOM_SCALARS_TAG = "custom_scalars__config__"
HPARAMS_TAGS = (
    "_hparams_/experiment",
    "_hparams_/session_start_info",
    "_hparams_/session_end_info",
)
# numpy dtype name -> DataType name, where they are not just "DT_" + name.upper()
_FLOAT_DTYPES = {"float16": "DT_HALF", "float32": "DT_FLOAT", "float64": "DT_DOUBLE"}
_INT_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


# ----------------------------------------------------------------------------- helpers


def _check_tag(tag) -> str:
    if not isinstance(tag, str):
        raise TypeError(f"tag: expected a str, got {type(tag).__name__}")
    if not tag:
        raise ValueError("tag: must not be empty")
    return tag


def _metadata(plugin_name: str, content: bytes = b"") -> summary_pb2.SummaryMetadata:
    md = summary_pb2.SummaryMetadata()
    md.plugin_data.plugin_name = plugin_name
    md.plugin_data.content = content
    return md


def _dtype_enum(dtype: np.dtype) -> int:
    if dtype.name in _FLOAT_DTYPES:
        return types_pb2.DataType.Value(_FLOAT_DTYPES[dtype.name])
    if dtype.name in _INT_DTYPES:
        return types_pb2.DataType.Value("DT_" + dtype.name.upper())
    raise TypeError(f"tensor: unsupported dtype {dtype}")


def _tensor(dtype: int, shape, **fields) -> tensor_pb2.TensorProto:
    t = tensor_pb2.TensorProto(dtype=dtype, **fields)
    t.tensor_shape.SetInParent()  # rank 0 is an empty but present shape, as tensorboardX has
    t.tensor_shape.dim.extend(tensor_pb2.TensorShapeProto.Dim(size=n) for n in shape)
    return t


def _numeric_tensor(arr: np.ndarray) -> tensor_pb2.TensorProto:
    """A TensorProto of ``arr`` (any shape, its dtype) with little-endian ``tensor_content``."""
    content = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
    return _tensor(_dtype_enum(arr.dtype), arr.shape, tensor_content=content)


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinity")


# ----------------------------------------------------------------------------- text


def text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
    """Markdown ``text`` for the Text dashboard, under the tag ``<tag>/text_summary``.

    The value is a ``DT_STRING`` tensor of shape ``[1]`` holding the UTF-8 bytes.

    Example: ``text_value("notes", "**lr** 1e-3").tag`` -> ``"notes/text_summary"``.
    """
    _check_tag(tag)
    if not isinstance(text, str):
        raise TypeError(f"text_string: expected a str, got {type(text).__name__}")
    content = plugins_pb2.TextPluginData(version=_VERSION).SerializeToString()
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text_string: not encodable as UTF-8 ({e})") from None
    tensor = _tensor(types_pb2.DT_STRING, (1,), string_val=[data])
    return summary_pb2.Summary.Value(
        tag=tag + "/text_summary", metadata=_metadata("text", content), tensor=tensor
    )


# ----------------------------------------------------------------------------- PR curves


def _pr_curve_value(tag: str, num_thresholds: int, data: np.ndarray) -> summary_pb2.Summary.Value:
    content = plugins_pb2.PrCurvePluginData(
        version=_VERSION, num_thresholds=min(num_thresholds, _MAX_PR_THRESHOLDS)
    ).SerializeToString()
    return summary_pb2.Summary.Value(
        tag=tag,
        metadata=_metadata("pr_curves", content),
        tensor=_numeric_tensor(data.astype(np.float32)),
    )


def pr_curve_value(
    tag: str, labels, predictions, num_thresholds: int = 127, weights=None
) -> summary_pb2.Summary.Value:
    """Precision-recall curve of binary ``labels`` against ``predictions`` in ``[0, 1]``.

    ``labels`` and ``predictions`` share one shape (any; flattened); ``weights`` (finite, >= 0)
    is a scalar or broadcasts to it. ``num_thresholds`` (>= 2) is clamped to 127 as in
    tensorboardX. The value is a float32 tensor ``(6, num_thresholds)``: rows TP, FP, TN, FN,
    precision, recall at thresholds ``i / (num_thresholds - 1)``.

    Example: ``pr_curve_value("pr", np.array([0, 1]), np.array([0.2, 0.9]), 5)``.
    """
    _check_tag(tag)
    num_thresholds = _check_int(num_thresholds, "num_thresholds", 2)
    labels = to_numpy(labels, "labels")
    predictions = to_numpy(predictions, "predictions")
    shape = predictions.shape
    if labels.shape != shape:
        raise ValueError(f"labels: shape {labels.shape} differs from predictions' {shape}")
    if predictions.size == 0:
        raise ValueError("predictions: must not be empty")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels: expected binary labels (0/1 or bool)")
    if np.isnan(predictions).any() or (predictions < 0).any() or (predictions > 1).any():
        raise ValueError("predictions: expected values in [0, 1] (no NaN)")
    if weights is None:
        weights = 1.0
    else:
        weights = to_numpy(weights, "weights")
        try:
            ok = np.broadcast_shapes(weights.shape, shape) == shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"weights: shape {weights.shape} does not broadcast to {shape}")
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights: expected finite, non-negative values")
    n = min(num_thresholds, _MAX_PR_THRESHOLDS)
    # tensorboardX's operations in its dtypes and order, so the numbers agree bit for bit.
    bucket = np.floor(predictions * (n - 1)).astype(np.int32)
    float_labels = labels.astype(float)
    tp_weights = np.broadcast_to(float_labels * weights, shape)
    fp_weights = np.broadcast_to((1.0 - float_labels) * weights, shape)
    tp_buckets, _ = np.histogram(bucket, bins=n, range=(0, n - 1), weights=tp_weights)
    fp_buckets, _ = np.histogram(bucket, bins=n, range=(0, n - 1), weights=fp_weights)
    tp = np.cumsum(tp_buckets[::-1])[::-1]
    fp = np.cumsum(fp_buckets[::-1])[::-1]
    tn = fp[0] - fp
    fn = tp[0] - tp
    precision = tp / np.maximum(1e-7, tp + fp)
    recall = tp / np.maximum(1e-7, tp + fn)
    return _pr_curve_value(tag, num_thresholds, np.stack((tp, fp, tn, fn, precision, recall)))


_PR_RAW_NAMES = ("true_positive_counts", "false_positive_counts", "true_negative_counts")
_PR_RAW_NAMES += ("false_negative_counts", "precision", "recall")


def pr_curve_raw_value(
    tag: str, tp, fp, tn, fn, precision, recall, num_thresholds: int = 127, weights=None
) -> summary_pb2.Summary.Value:
    """Precision-recall curve from precomputed rows, each a finite ``(T,)`` array.

    The value is the float32 tensor ``(6, T)`` of the rows as given. ``num_thresholds`` only
    goes into the metadata (clamped to 127); ``weights`` is ignored, as in tensorboardX.

    Example: ``pr_curve_raw_value("pr", tp, fp, tn, fn, p, r, num_thresholds=len(tp))``.
    """
    _check_tag(tag)
    num_thresholds = _check_int(num_thresholds, "num_thresholds", 2)
    rows = []
    for value, name in zip((tp, fp, tn, fn, precision, recall), _PR_RAW_NAMES, strict=True):
        arr = to_numpy(value, name)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {arr.shape}")
        if rows and arr.shape != rows[0].shape:
            raise ValueError(f"{name}: length {arr.size} differs from {_PR_RAW_NAMES[0]}'s")
        _check_finite(arr, name)
        rows.append(arr.astype(np.float64))
    return _pr_curve_value(tag, num_thresholds, np.stack(rows))


# ----------------------------------------------------------------------------- custom scalars


def _tag_list(tags, name: str) -> list[str]:
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tag strings, got {type(tags).__name__}")
    if not all(isinstance(t, str) for t in tags):
        raise TypeError(f"{name}: every tag must be a str")
    return list(tags)


def _check_name(value, where: str, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{where}: {what} must be str, got {type(value).__name__}")


def custom_scalars_value(layout) -> summary_pb2.Summary.Value:
    """The Custom Scalars dashboard layout, under the tag ``custom_scalars__config__``.

    ``layout`` is ``{category: {title: ["Multiline", [tag, ...]] | ["Margin", [value, lower,
    upper]]}}``; multiline tags are regular expressions over scalar tags.

    Example: ``custom_scalars_value({"loss": {"both": ["Multiline", ["loss/.*"]]}})``.
    """
    if not isinstance(layout, Mapping) or not layout:
        raise ValueError("layout: expected a non-empty dict {category: {title: [kind, tags]}}")
    proto = plugins_pb2.Layout(version=_VERSION)
    for category, charts in layout.items():
        _check_name(category, "layout", "category names")
        where = f"layout[{category!r}]"
        if not isinstance(charts, Mapping) or not charts:
            raise ValueError(f"{where}: expected a non-empty dict {{title: [kind, tags]}}")
        cat = proto.category.add(title=category)
        for title, spec in charts.items():
            _check_name(title, where, "chart titles")
            here = f"{where}[{title!r}]"
            if not isinstance(spec, (list, tuple)) or len(spec) != 2:
                raise ValueError(f"{here}: expected [kind, tags], got {spec!r}")
            kind, tags = spec[0], _tag_list(spec[1], here)
            chart = cat.chart.add(title=title)
            if kind == "Margin" and len(tags) == 3:
                chart.margin.series.add(value=tags[0], lower=tags[1], upper=tags[2])
            elif kind == "Multiline" and tags:
                chart.multiline.tag.extend(tags)
            else:
                raise ValueError(
                    f"{here}: expected ['Multiline', [tag, ...]] or ['Margin', [value, lower, "
                    f"upper]], got {spec!r}"
                )
    tensor = _tensor(types_pb2.DT_STRING, (), string_val=[proto.SerializeToString()])
    return summary_pb2.Summary.Value(
        tag=CUSTOM_SCALARS_TAG, metadata=_metadata("custom_scalars"), tensor=tensor
    )


def multiline_layout(tags, category: str = "default", title: str = "untitled") -> dict:
    """The layout ``add_custom_scalars_multilinechart`` writes: one line per tag in ``tags``.

    Example: ``multiline_layout(["a", "b"])`` -> ``{"default": {"untitled": ["Multiline",
    ["a", "b"]]}}``.
    """
    return {category: {title: ["Multiline", _tag_list(tags, "tags")]}}


def margin_layout(tags, category: str = "default", title: str = "untitled") -> dict:
    """The layout ``add_custom_scalars_marginchart`` writes; ``tags`` is ``[value, lower, upper]``.

    Example: ``margin_layout(["m", "lo", "hi"])`` -> ``{"default": {"untitled": ["Margin",
    ["m", "lo", "hi"]]}}``.
    """
    tags = _tag_list(tags, "tags")
    if len(tags) != 3:
        raise ValueError(f"tags: a margin chart takes [value, lower, upper], got {len(tags)} tags")
    return {category: {title: ["Margin", tags]}}


# ----------------------------------------------------------------------------- meshes

_MESH_PARTS = ((1, "vertices"), (2, "faces"), (3, "colors"))  # MeshPluginData.ContentType


def _mesh_array(value, name: str) -> np.ndarray:
    arr = to_numpy(value, name)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty (B, N, 3) array, got shape {arr.shape}")
    _check_finite(arr, name)
    return arr


def _mesh_content(tag: str, content_type: int, shape, json_config: str, mask: int) -> bytes:
    # ``components``: bitmask of the parts present; tensorboardX leaves it 0 ("all three").
    return plugins_pb2.MeshPluginData(
        version=_VERSION,
        name=tag,
        content_type=content_type,
        json_config=json_config,
        shape=shape,
        components=mask,
    ).SerializeToString()


def mesh_values(
    tag: str, vertices, colors=None, faces=None, config_dict=None
) -> list[summary_pb2.Summary.Value]:
    """A 3-D mesh or point cloud as one value per part, tagged ``<tag>_1`` (vertices),
    ``<tag>_2`` (faces) and ``<tag>_3`` (colors), as tensorboardX names them.

    ``vertices`` is float ``(B, N, 3)``; ``colors`` ``(B, N, 3)`` in ``[0, 255]``; ``faces``
    ``(B, F, 3)`` integer vertex indices in ``[0, N)``; ``config_dict`` a JSON-serialisable dict
    of three.js settings. Each part is stored as a float32 tensor of its shape.

    Example: ``mesh_values("cloud", np.random.rand(1, 100, 3))`` -> one value, ``cloud_1``.
    """
    _check_tag(tag)
    parts = {"vertices": _mesh_array(vertices, "vertices")}
    b, n = parts["vertices"].shape[:2]
    if colors is not None:
        cols = parts["colors"] = _mesh_array(colors, "colors")
        if cols.shape != (b, n, 3):
            raise ValueError(f"colors: shape {cols.shape} differs from vertices' {(b, n, 3)}")
        if (cols < 0).any() or (cols > 255).any():
            raise ValueError("colors: expected values in [0, 255]")
    if faces is not None:
        fcs = parts["faces"] = _mesh_array(faces, "faces")
        if fcs.shape[0] != b:
            raise ValueError(f"faces: batch size {fcs.shape[0]} differs from vertices' {b}")
        if fcs.dtype.kind == "f" and (fcs != np.floor(fcs)).any():
            raise ValueError("faces: expected integer vertex indices")
        if (fcs < 0).any() or (fcs >= n).any():
            raise ValueError(f"faces: vertex indices must lie in [0, {n})")
        if n > _FLOAT32_EXACT_INT:
            raise ValueError(f"faces: {n} vertices are too many to index exactly in float32")
    try:
        json_config = json.dumps(config_dict, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise type(e)(f"config_dict: not JSON-serialisable ({e})") from None
    mask = sum(1 << ct for ct, name in _MESH_PARTS if name in parts)
    return [
        summary_pb2.Summary.Value(
            tag=f"{tag}_{ct}",
            metadata=_metadata("mesh", _mesh_content(tag, ct, arr.shape, json_config, mask)),
            tensor=_numeric_tensor(arr.astype(np.float32)),
        )
        for ct, name in _MESH_PARTS
        if (arr := parts.get(name)) is not None
    ]


# ----------------------------------------------------------------------------- raw tensors


def tensor_value(tag: str, tensor) -> summary_pb2.Summary.Value:
    """A raw tensor of any shape (torch's ``add_tensor``) as a ``TensorProto``, plugin ``tensor``.

    The dtype is kept (``DT_HALF``, ``DT_FLOAT``, ``DT_INT64``, ``DT_BOOL``, ...), except that
    bf16 and fp8 widen exactly to ``DT_FLOAT`` (TensorBoard cannot decode ``DT_BFLOAT16``;
    torch writes float32 bits into ``half_val`` there, which reads back as garbage) and torch's
    uint16/uint32 to ``DT_INT64``. Unlike torch, ``data_class`` is TENSOR, so TensorBoard's Rust
    data server keeps the series.

    Example: ``tensor_value("w", torch.ones(2, 3)).tensor.dtype`` -> ``DT_FLOAT``.
    """
    _check_tag(tag)
    arr = to_numpy(tensor, "tensor")
    if arr.nbytes >= _MAX_TENSOR_BYTES:
        raise ValueError(f"tensor: {arr.nbytes} bytes exceed protobuf's 2 GiB limit")
    md = _metadata("tensor")
    md.data_class = summary_pb2.DATA_CLASS_TENSOR
    return summary_pb2.Summary.Value(tag=tag, metadata=md, tensor=_numeric_tensor(arr))
