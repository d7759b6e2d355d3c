"""Graphs of exported model files for TensorBoard's graph dashboard: ONNX and OpenVINO IR.

Nodes are laid out as tensorboardX 2.6.5 lays them out, with its gaps filled:

- ONNX: a ``Variable`` node per graph input and one node per ONNX node, named after the
  node's first output and typed by its ``op_type``; tensorboardX also emits each graph output
  as a second node *with the same name as the node producing it*, which we fold into that
  node's ``_output_shapes``. Added: ``Const`` nodes for initializers (weights), so ops are not
  left with inputs that lead nowhere; ``name:k`` inputs for a node's k-th output (TensorFlow's
  convention, which TensorBoard draws); TensorFlow dtypes instead of raw ONNX type numbers;
  ``-1`` for symbolic dimensions instead of ``0``; readable ``parameters``.
- OpenVINO: tensorboardX emits one node per *edge* (``op`` = "op"), so a layer with two inputs
  appears twice and a layer without inputs not at all. We emit one node per layer, typed by
  its layer type, with its inputs in port order, its ``<data>`` attributes and output shapes.
  It needs only the standard library, as in tensorboardX.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from itertools import chain

from tbprobe.writer.proto import graph_pb2, types_pb2

__all__ = ["graph_from_onnx", "graph_from_openvino"]

# The GraphDef producer version tensorboardX and torch.utils.tensorboard write.
PRODUCER_VERSION = 22

# ONNX TensorProto.DataType -> TensorFlow DataType (which TensorBoard displays).
_ONNX_TO_TF_DTYPE = {
    1: types_pb2.DT_FLOAT,
    2: types_pb2.DT_UINT8,
    3: types_pb2.DT_INT8,
    4: types_pb2.DT_UINT16,
    5: types_pb2.DT_INT16,
    6: types_pb2.DT_INT32,
    7: types_pb2.DT_INT64,
    8: types_pb2.DT_STRING,
    9: types_pb2.DT_BOOL,
    10: types_pb2.DT_HALF,
    11: types_pb2.DT_DOUBLE,
    12: types_pb2.DT_UINT32,
    13: types_pb2.DT_UINT64,
    14: types_pb2.DT_COMPLEX64,
    15: types_pb2.DT_COMPLEX128,
    16: types_pb2.DT_BFLOAT16,
}


def shape_attr(shapes) -> graph_pb2.AttrValue:
    """An ``_output_shapes`` attribute: one shape per output, ``None`` for an unknown one."""
    attr = graph_pb2.AttrValue()
    for shape in shapes:
        proto = attr.list.shape.add()
        if shape is None:
            proto.unknown_rank = True
        else:
            for size in shape:
                proto.dim.add(size=size)
    return attr


def _existing_file(path, argument: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{argument} must be a path (str or os.PathLike), got {type(path).__name__}"
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{argument} not found: {path!r}")
    return path


def _new_graph() -> graph_pb2.GraphDef:
    return graph_pb2.GraphDef(versions=graph_pb2.VersionDef(producer=PRODUCER_VERSION))


# --------------------------------------------------------------------------------------- ONNX
def graph_from_onnx(onnx_model_file) -> graph_pb2.GraphDef:
    """The graph of an ONNX model, as tensorboardX's ``add_onnx_graph`` shows it.

    Args:
        onnx_model_file: path of a ``.onnx`` file, or an ``onnx.ModelProto``. Weights stored as
            external data are not read (only their shapes are needed).

    Returns:
        A ``GraphDef`` for ``Event.graph_def``: ``Variable`` nodes for graph inputs, ``Const``
        nodes for initializers, one node per ONNX node named after its first output, with its
        ``op_type`` as op, ``parameters`` text and, where known, ``_output_shapes``.

    Raises:
        ImportError: the ``onnx`` package is not installed.
        FileNotFoundError, TypeError, ValueError: no such file, not a path, not an ONNX model.

    Examples::

        graph = graph_from_onnx("model.onnx")
        [(n.name, n.op) for n in graph.node][:2]   # [('X', 'Variable'), ('Y', 'Relu')]
    """
    path = None
    if isinstance(onnx_model_file, (str, os.PathLike)):
        path = _existing_file(onnx_model_file, "onnx_model_file")
    try:
        import onnx
    except ImportError as err:
        raise ImportError("add_onnx_graph needs onnx: pip install onnx") from err
    if path is not None:
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as err:  # protobuf's DecodeError and friends
            raise ValueError(f"onnx_model_file {path!r} is not an ONNX model: {err}") from err
    elif isinstance(onnx_model_file, onnx.ModelProto):
        model = onnx_model_file
    else:
        raise TypeError(
            "onnx_model_file must be a path or an onnx.ModelProto, "
            f"got {type(onnx_model_file).__name__}"
        )
    # Shapes for inner edges too; custom ops or a model past protobuf's 2 GB make inference
    # fail, and then the graph is drawn with the shapes the file has.
    with contextlib.suppress(Exception):
        model = onnx.shape_inference.infer_shapes(model)
    return _onnx_graph_def(model.graph, onnx)


def _onnx_graph_def(graph, onnx) -> graph_pb2.GraphDef:
    out = _new_graph()
    infos = {vi.name: vi for vi in chain(graph.input, graph.value_info, graph.output)}
    declared = set()  # tensor names that already have a node

    for vi in graph.input:
        dtype, shape = _onnx_value_type(vi)
        _variable(out, vi.name, "Variable", dtype, shape)
        declared.add(vi.name)
    for tensor in graph.initializer:
        if tensor.name not in declared:
            dtype = _ONNX_TO_TF_DTYPE.get(tensor.data_type, types_pb2.DT_INVALID)
            _variable(out, tensor.name, "Const", dtype, list(tensor.dims))
            declared.add(tensor.name)

    # A node is named after its first output; its other outputs are "name:k".
    node_names, produced = [], {}
    for i, node in enumerate(graph.node):
        name = node.output[0] if node.output and node.output[0] else node.name
        name = name or f"{node.op_type}_{i}"
        node_names.append(name)
        for k, tensor_name in enumerate(node.output):
            if tensor_name:
                produced[tensor_name] = name if k == 0 else f"{name}:{k}"

    for name, node in zip(node_names, graph.node, strict=True):
        node_def = out.node.add(name=name, op=node.op_type)
        node_def.input.extend(produced.get(t, t) for t in node.input if t)  # "" = omitted
        params = ", ".join(f"{a.name} = {_onnx_attr_text(a, onnx)}" for a in node.attribute)
        node_def.attr["parameters"].s = params.encode("utf-8")
        shapes = [_onnx_value_type(infos[t])[1] if t in infos else None for t in node.output]
        if any(s is not None for s in shapes):
            node_def.attr["_output_shapes"].CopyFrom(shape_attr(shapes))
        declared.update(node.output)

    for vi in graph.output:  # only outputs nothing produces (a malformed model) lack a node
        if vi.name not in declared:
            dtype, shape = _onnx_value_type(vi)
            _variable(out, vi.name, "Variable", dtype, shape)
            declared.add(vi.name)
    return out


def _variable(out, name: str, op: str, dtype: int, shape) -> None:
    node_def = out.node.add(name=name, op=op)
    node_def.attr["dtype"].type = dtype
    node_def.attr["shape"].shape.CopyFrom(shape_attr([shape]).list.shape[0])


def _onnx_value_type(value_info) -> tuple[int, list[int] | None]:
    """(TensorFlow dtype, shape) of an ONNX ValueInfo; -1 for a symbolic dimension."""
    tensor_type = value_info.type.tensor_type
    dtype = _ONNX_TO_TF_DTYPE.get(tensor_type.elem_type, types_pb2.DT_INVALID)
    if not value_info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return dtype, None
    return dtype, [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]


def _onnx_attr_text(attribute, onnx) -> str:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return f"tensor<{onnx.TensorProto.DataType.Name(value.data_type)}>{list(value.dims)}"
    if isinstance(value, onnx.GraphProto):
        return f"graph<{value.name}>"
    if isinstance(value, list):
        return str([v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value])
    return str(value)


# ----------------------------------------------------------------------------------- OpenVINO
def graph_from_openvino(xmlname) -> graph_pb2.GraphDef:
    """The graph of an OpenVINO IR model (its ``.xml`` file), for ``add_openvino_graph``.

    Args:
        xmlname: path of the IR ``.xml`` file (the ``.bin`` weights are not read).

    Returns:
        A ``GraphDef`` with one node per layer: named by the layer's ``name``, op = its
        ``type`` (``Parameter``, ``Convolution``, ...), inputs in port order (``name:k`` for a
        layer's k-th output), ``parameters`` from its ``<data>`` element and
        ``_output_shapes`` from its output ports.

    Raises:
        FileNotFoundError, TypeError, ValueError: no such file, not a path, not an IR file.

    Examples::

        graph = graph_from_openvino("model.xml")
        [(n.name, n.op, list(n.input)) for n in graph.node][:2]
        # [('data', 'Parameter', []), ('conv1', 'Convolution', ['data', 'conv1/weights'])]
    """
    path = _existing_file(xmlname, "xmlname")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"xmlname {path!r} is not an XML file: {err}") from err
    layers, edges = root.find("layers"), root.find("edges")
    if layers is None or edges is None:
        raise ValueError(f"xmlname {path!r} is not an OpenVINO IR file: no <layers>/<edges>")

    names, output_index, shapes = {}, {}, {}
    for layer in layers.iter("layer"):
        layer_id = layer.get("id")
        names[layer_id] = layer.get("name", layer_id)
        ports = layer.find("output")
        ports = [] if ports is None else ports.findall("port")
        for k, port in enumerate(ports):
            output_index[(layer_id, port.get("id"))] = k
        shapes[layer_id] = [[_int(d.text) for d in port.findall("dim")] for port in ports]

    inputs = {}  # to-layer id -> [(to-port, input name)]
    for edge in edges.iter("edge"):
        src, src_port = edge.get("from-layer"), edge.get("from-port")
        k = output_index.get((src, src_port), 0)
        source = names.get(src, src)
        name = source if k == 0 else f"{source}:{k}"
        inputs.setdefault(edge.get("to-layer"), []).append((_int(edge.get("to-port")), name))

    out = _new_graph()
    for layer in layers.iter("layer"):
        layer_id = layer.get("id")
        node_def = out.node.add(name=names[layer_id], op=layer.get("type", "op"))
        node_def.input.extend(name for _, name in sorted(inputs.get(layer_id, [])))
        data = layer.find("data")
        params = "" if data is None else ", ".join(f"{k} = {v}" for k, v in data.attrib.items())
        node_def.attr["parameters"].s = params.encode("utf-8")
        if shapes[layer_id]:
            node_def.attr["_output_shapes"].CopyFrom(shape_attr(shapes[layer_id]))
    return out


def _int(text) -> int:
    """An IR integer; -1 for a dynamic dimension ("?", "-1") or a missing one."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return -1
