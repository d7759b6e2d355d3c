"""Model graphs for the graph dashboard: PyTorch traces, ONNX and OpenVINO files.

References: ``torch.utils.tensorboard._pytorch_graph.graph`` is what tensorboardX 2.6.5's
``add_graph`` calls; ``tensorboardX.onnx_graph`` / ``tensorboardX.openvino_graph`` back
``add_onnx_graph`` / ``add_openvino_graph``.
"""

import functools
import re
import struct
import sys
import time
import warnings

import pytest
import torch
from crc32c import crc32c
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX.proto import graph_pb2 as tbx_graph_pb2
from torch import nn
from torch.utils.tensorboard._pytorch_graph import graph as reference_graph

from tbprobe.writer.graph import graph_from_module, graph_from_onnx, graph_from_openvino
from tbprobe.writer.proto import event_pb2, types_pb2

# The reference traces with torch.jit.trace, which warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")


# ------------------------------------------------------------------------------------ models
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Tanh(), nn.Dropout())) for _ in "ab"]
        )
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h) + h
        return h * self.scale


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, y):
        return self.fc(self.fc(x) + y)


class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = self.fc(x)
        return h, h.max(dim=1)


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return {"logits": self.fc(x), "double": x * 2}


class NoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self):
        return self.w * 2


class PairAndDict(nn.Module):
    def forward(self, pair, extra):
        return pair[0] + pair[1] * extra["scale"]


class ScriptedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Broken(nn.Module):
    def forward(self, x):
        raise ValueError("shapes do not line up")


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


CASES = {
    "cnn": (SmallCNN, lambda: _x(2, 1, 8, 8), True),
    "nested": (Nested, lambda: _x(2, 3), True),
    "called_twice": (CalledTwice, lambda: (_x(2, 3), _x(2, 3)), True),
    "list_input": (CalledTwice, lambda: [_x(2, 3), _x(2, 3)], True),
    "returns_tuple": (ReturnsTuple, lambda: _x(2, 3), True),
    "returns_dict": (ReturnsDict, lambda: _x(2, 3), False),
    "nested_inputs": (PairAndDict, lambda: ((_x(2, 3), _x(2, 3)), {"scale": _x(2, 3)}), True),
}


def _view(graph_def_bytes):
    """(name, op, inputs, attr text, output shapes) per node, parsed as tensorboardX parses."""
    graph = tbx_graph_pb2.GraphDef()
    graph.ParseFromString(graph_def_bytes)
    rows = []
    for n in graph.node:
        shapes = [[d.size for d in s.dim] for s in n.attr["_output_shapes"].list.shape]
        rows.append((n.name, n.op, list(n.input), n.attr["attr"].s, shapes))
    return rows


def _write_events(path, events):
    """An event file framed as TensorBoard frames it, written independently of tbprobe."""

    def masked(data):
        c = crc32c(data)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    with open(path, "wb") as f:
        first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        for event in [first, *events]:
            data = event.SerializeToString()
            header = struct.pack("<Q", len(data))
            f.write(header + struct.pack("<I", masked(header)))
            f.write(data + struct.pack("<I", masked(data)))


# ----------------------------------------------------------------------------- PyTorch graphs
@pytest.mark.parametrize("case", list(CASES))
def test_module_graph_matches_tensorboardx(case):
    """Node names, ops, inputs, attr text and output shapes equal tensorboardX's, in order."""
    make_model, make_input, strict = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    ours, _ = graph_from_module(model, make_input(), use_strict_trace=strict)
    reference, _ = reference_graph(model, make_input(), use_strict_trace=strict)
    assert _view(ours.SerializeToString()) == _view(reference.SerializeToString())


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The input to trace is already a ScriptModule")
def test_scripted_model_is_not_modified():
    """A ScriptModule is drawn from a copy of its graph (tensorboardX inlines it in place)."""
    model = torch.jit.script(ScriptedBlock())
    before = str(model.graph)
    ours, _ = graph_from_module(model, _x(2, 3))
    assert str(model.graph) == before
    reference, _ = reference_graph(model, _x(2, 3))

    def numbers_hidden(view):  # a copied graph numbers unnamed values differently
        hide = functools.partial(re.sub, r"/\d+$", "/#")
        return [(hide(n), op, [hide(i) for i in ins], *rest) for n, op, ins, *rest in view]

    assert numbers_hidden(_view(ours.SerializeToString())) == numbers_hidden(
        _view(reference.SerializeToString())
    )


def test_nodes_are_named_by_module_scope():
    """Ops sit under their module path; inputs and outputs under input/ and output/."""
    graph, _ = graph_from_module(SmallCNN(), _x(2, 1, 8, 8))
    by_op = {}
    for n in graph.node:
        by_op.setdefault(n.op, []).append(n)
    assert [n.name for n in by_op["IO Node"]] == ["input/x", "output/output.1"]
    (conv,) = by_op["aten::_convolution"]
    assert conv.name.startswith("SmallCNN/Conv2d[conv]/")
    assert conv.input[0] == "input/x"
    assert conv.input[1].startswith("SmallCNN/Conv2d[conv]/weight/weight")
    assert conv.input[2].startswith("SmallCNN/Conv2d[conv]/bias/bias")
    (linear,) = by_op["aten::linear"]
    assert linear.name.startswith("SmallCNN/Linear[fc]/")
    assert [d.size for d in linear.attr["_output_shapes"].list.shape[0].dim] == [2, 10]
    assert graph.node[1].input == [linear.name]
    assert graph.versions.producer == 22


def test_nested_containers_give_nested_scopes():
    """Ops inside nested Sequentials get the module path; a ModuleList (never called) does not."""
    graph, _ = graph_from_module(Nested(), _x(2, 3))
    tanh = [n.name for n in graph.node if n.op == "aten::tanh"]
    assert [name.rsplit("/", 1)[0] for name in tanh] == [
        f"Nested/Sequential[{i}]/Sequential[1]/Tanh[0]" for i in "01"
    ]


def test_module_called_twice_has_both_calls_in_its_scope():
    """Each call of a shared module adds its own op under the same scope."""
    graph, _ = graph_from_module(CalledTwice(), (_x(2, 3), _x(2, 3)))
    linears = [n for n in graph.node if n.op == "aten::linear"]
    assert len(linears) == 2
    assert all(n.name.startswith("CalledTwice/Linear[fc]/") for n in linears)
    assert linears[1].name != linears[0].name


def test_tuple_output_is_one_output_node():
    """A tuple result is one output node fed by the tuple op, as in tensorboardX."""
    graph, _ = graph_from_module(ReturnsTuple(), _x(2, 3))
    outputs = [n for n in graph.node if n.name.startswith("output/")]
    assert [n.name for n in outputs] == ["output/output.1"]
    (producer,) = [n for n in graph.node if n.name == outputs[0].input[0]]
    assert producer.op == "prim::TupleConstruct"


def test_dict_output_needs_non_strict_trace():
    """A dict result traces with use_strict_trace=False and fails clearly otherwise."""
    graph, _ = graph_from_module(ReturnsDict(), _x(2, 3), use_strict_trace=False)
    assert "prim::DictConstruct" in {n.op for n in graph.node}
    with pytest.raises(RuntimeError, match="ReturnsDict"):
        graph_from_module(ReturnsDict(), _x(2, 3))


def test_model_without_inputs():
    """input_to_model=None traces a forward that takes no arguments."""
    graph, _ = graph_from_module(NoInputs())
    assert [n.name for n in graph.node if n.op == "IO Node"] == ["output/output.1"]
    assert "aten::mul" in {n.op for n in graph.node}


def test_train_and_eval_flags_are_restored_per_module():
    """Every submodule keeps its own mode, also after a failed trace."""
    model = Nested().train()
    model.blocks[1].eval()  # e.g. a frozen block
    before = [m.training for m in model.modules()]
    graph_from_module(model, _x(2, 3))
    assert [m.training for m in model.modules()] == before
    assert not model.blocks[1].training

    broken = nn.Sequential(nn.Linear(3, 3), Broken()).train()
    with pytest.raises(RuntimeError):
        graph_from_module(broken, _x(2, 3))
    assert all(m.training for m in broken.modules())


def test_traced_in_eval_mode():
    """Dropout is traced as in eval mode, so the graph is deterministic."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    first, _ = graph_from_module(model, _x(2, 3))
    second, _ = graph_from_module(model, _x(2, 3))
    assert first == second
    assert model.training


def test_trace_failure_names_the_model():
    """A forward that cannot be traced raises RuntimeError naming the model and the cause."""
    with pytest.raises(RuntimeError, match=r"Broken.*ValueError: shapes do not line up"):
        graph_from_module(Broken(), _x(2, 3))
    with pytest.raises(RuntimeError, match=r"SmallCNN.*input_to_model is None"):
        graph_from_module(SmallCNN())


@pytest.mark.parametrize(
    ("model", "inputs", "error", "match"),
    [
        ("not a model", None, TypeError, "model must be a torch.nn.Module, got str"),
        (lambda x: x, _x(1), TypeError, "model must be a torch.nn.Module"),
        (SmallCNN(), "x", TypeError, "input_to_model must be a tensor"),
        (SmallCNN(), 3.0, TypeError, "input_to_model must be a tensor"),
        (CalledTwice(), (_x(2, 3), 3), TypeError, r"input_to_model\[1\] must be a tensor"),
        (CalledTwice(), [_x(2, 3), {"y": "no"}], TypeError, r"input_to_model\[1\]\['y'\]"),
    ],
)
def test_bad_arguments_are_named(model, inputs, error, match):
    """Wrong argument types raise TypeError naming the argument."""
    with pytest.raises(error, match=match):
        graph_from_module(model, inputs)


def test_run_metadata_lists_devices():
    """Run metadata names the device; nodes carry the device of the tensor they produce."""
    graph, run_metadata = graph_from_module(SmallCNN(), _x(2, 1, 8, 8))
    assert [d.device for d in run_metadata.step_stats.dev_stats] == ["/device:CPU:0"]
    conv = next(n for n in graph.node if n.op == "aten::_convolution")
    assert conv.device == "/device:CPU:0"


def test_no_warnings_and_verbose_prints(capsys):
    """Tracing for the dashboard warns about nothing; verbose prints the TorchScript graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph_from_module(SmallCNN(), _x(2, 1, 8, 8), verbose=True)
    assert "aten::_convolution" in capsys.readouterr().out


def test_tensorboard_reads_module_graph(tmp_path):
    """TensorBoard's EventAccumulator reads the graph and the run metadata back."""
    graph, run_metadata = graph_from_module(SmallCNN(), _x(2, 1, 8, 8))
    trm = event_pb2.TaggedRunMetadata(tag="step1", run_metadata=run_metadata.SerializeToString())
    _write_events(
        tmp_path / "events.out.tfevents.1.test",
        [
            event_pb2.Event(wall_time=time.time(), graph_def=graph.SerializeToString()),
            event_pb2.Event(wall_time=time.time(), tagged_run_metadata=trm),
        ],
    )
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    read = acc.Graph()
    assert [(n.name, n.op, list(n.input)) for n in read.node] == [
        (n.name, n.op, list(n.input)) for n in graph.node
    ]
    assert read.node[0].attr["_output_shapes"].list.shape[0].dim[1].size == 1
    assert acc.RunMetadata("step1").step_stats.dev_stats[0].device == "/device:CPU:0"


# ------------------------------------------------------------------------------------ ONNX
def _tiny_onnx(path, with_split=False):
    """X[N,1,4,4] -> Conv(W, B) -> Relu -> Flatten -> Y, optionally Split into two outputs."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [2, 1, 3, 3], [0.1] * 18)
    b = helper.make_tensor("B", TensorProto.FLOAT, [2], [0.0, 0.5])
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["conv_out"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"]),
        helper.make_node("Flatten", ["relu_out"], ["Y"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8])]
    if with_split:
        nodes.append(helper.make_node("Split", ["Y"], ["half0", "half1"], axis=1, num_outputs=2))
        nodes.append(helper.make_node("Add", ["half0", "half1"], ["Z"]))
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 4]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 4, 4])],
        outputs,
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_onnx_graph_matches_tensorboardx(tmp_path):
    """Op nodes equal tensorboardX's; its duplicate output nodes fold away, weights are added."""
    from tensorboardX.onnx_graph import load_onnx_graph

    path = _tiny_onnx(tmp_path / "tiny.onnx")
    ours = tbx_graph_pb2.GraphDef.FromString(graph_from_onnx(path).SerializeToString())
    reference = load_onnx_graph(path)

    def ops(graph):
        return [(n.name, n.op, list(n.input)) for n in graph.node if n.op != "Variable"]

    assert ops(reference) == [(n, o, i) for n, o, i in ops(ours) if o != "Const"]
    assert {n.name for n in ours.node if n.op == "Const"} == {"W", "B"}
    # tensorboardX names the graph output "Y" twice (Variable and Flatten); we keep the op.
    assert [n.name for n in reference.node].count("Y") == 2
    assert len({n.name for n in ours.node}) == len(ours.node)
    assert {n.name for n in reference.node} | {"W", "B"} == {n.name for n in ours.node}


def test_onnx_types_shapes_and_parameters(tmp_path):
    """Dtypes are TensorFlow's, symbolic dims are -1, inferred shapes and attributes show."""
    graph = graph_from_onnx(_tiny_onnx(tmp_path / "tiny.onnx"))
    nodes = {n.name: n for n in graph.node}
    x = nodes["X"]
    assert (x.op, x.attr["dtype"].type) == ("Variable", types_pb2.DT_FLOAT)
    assert [d.size for d in x.attr["shape"].shape.dim] == [-1, 1, 4, 4]
    assert [d.size for d in nodes["W"].attr["shape"].shape.dim] == [2, 1, 3, 3]
    conv = nodes["conv_out"]
    assert conv.attr["parameters"].s == b"kernel_shape = [3, 3]"
    assert [d.size for d in conv.attr["_output_shapes"].list.shape[0].dim] == [-1, 2, 2, 2]
    assert [d.size for d in nodes["Y"].attr["_output_shapes"].list.shape[0].dim] == [-1, 8]


def test_onnx_second_outputs_are_named_with_index(tmp_path):
    """A consumer of a node's k-th output gets the input "name:k", which TensorBoard draws."""
    graph = graph_from_onnx(_tiny_onnx(tmp_path / "split.onnx", with_split=True))
    nodes = {n.name: n for n in graph.node}
    assert nodes["half0"].op == "Split"
    assert list(nodes["Z"].input) == ["half0", "half0:1"]
    assert len(nodes["half0"].attr["_output_shapes"].list.shape) == 2


def test_onnx_model_proto_is_accepted(tmp_path):
    """An onnx.ModelProto gives the same graph as its file."""
    path = _tiny_onnx(tmp_path / "tiny.onnx")
    import onnx

    assert graph_from_onnx(onnx.load(path)) == graph_from_onnx(path)


def test_onnx_missing_package(tmp_path, monkeypatch):
    """Without onnx installed, a clear ImportError says how to get it."""
    path = _tiny_onnx(tmp_path / "tiny.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"^add_onnx_graph needs onnx: pip install onnx$"):
        graph_from_onnx(path)


def test_onnx_bad_arguments(tmp_path):
    """Missing file, wrong type and non-ONNX bytes raise errors naming onnx_model_file."""
    with pytest.raises(FileNotFoundError, match="onnx_model_file"):
        graph_from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="onnx_model_file"):
        graph_from_onnx(42)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xff not a protobuf")
    with pytest.raises(ValueError, match="onnx_model_file"):
        graph_from_onnx(junk)


def test_tensorboard_reads_onnx_graph(tmp_path):
    """TensorBoard's EventAccumulator reads the ONNX graph back."""
    graph = graph_from_onnx(_tiny_onnx(tmp_path / "tiny.onnx"))
    logdir = tmp_path / "run"
    logdir.mkdir()
    _write_events(
        logdir / "events.out.tfevents.1.test",
        [event_pb2.Event(wall_time=time.time(), graph_def=graph.SerializeToString())],
    )
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert [n.name for n in acc.Graph().node] == [n.name for n in graph.node]


# -------------------------------------------------------------------------------- OpenVINO
def _port(port_id, *dims):
    return f'<port id="{port_id}">' + "".join(f"<dim>{d}</dim>" for d in dims) + "</port>"


_OPENVINO_XML = f"""<?xml version="1.0"?>
<net name="tiny" version="11">
  <layers>
    <layer id="0" name="data" type="Parameter" version="opset1">
      <data shape="1,3,8,8" element_type="f32"/>
      <output>{_port(0, 1, 3, 8, 8)}</output>
    </layer>
    <layer id="1" name="conv1/weights" type="Const" version="opset1">
      <data element_type="f32" shape="4,3,3,3" offset="0" size="432"/>
      <output>{_port(0, 4, 3, 3, 3)}</output>
    </layer>
    <layer id="2" name="conv1" type="Convolution" version="opset1">
      <data strides="1,1" pads_begin="0,0" pads_end="0,0" dilations="1,1"/>
      <input><port id="0"/><port id="1"/></input>
      <output>{_port(2, 1, 4, 6, 6)}</output>
    </layer>
    <layer id="3" name="relu1" type="ReLU" version="opset1">
      <input><port id="0"/></input>
      <output>{_port(1, 1, 4, 6, 6)}</output>
    </layer>
    <layer id="4" name="out" type="Result" version="opset1">
      <input><port id="0"/></input>
    </layer>
  </layers>
  <edges>
    <edge from-layer="1" from-port="0" to-layer="2" to-port="1"/>
    <edge from-layer="0" from-port="0" to-layer="2" to-port="0"/>
    <edge from-layer="2" from-port="2" to-layer="3" to-port="0"/>
    <edge from-layer="3" from-port="1" to-layer="4" to-port="0"/>
  </edges>
</net>
"""


def test_openvino_graph_has_every_tensorboardx_edge(tmp_path):
    """One node per layer, typed, inputs in port order, covering every tensorboardX edge."""
    from tensorboardX.openvino_graph import load_openvino_graph

    path = tmp_path / "tiny.xml"
    path.write_text(_OPENVINO_XML)
    graph = graph_from_openvino(path)
    nodes = {n.name: n for n in graph.node}
    assert [(n.name, n.op) for n in graph.node] == [
        ("data", "Parameter"),
        ("conv1/weights", "Const"),
        ("conv1", "Convolution"),
        ("relu1", "ReLU"),
        ("out", "Result"),
    ]
    assert list(nodes["conv1"].input) == ["data", "conv1/weights"]  # port order, not edge order
    for edge in load_openvino_graph(str(path)).node:  # tensorboardX: one node per edge
        assert edge.input[0] in nodes[edge.name].input
    assert b"strides = 1,1" in nodes["conv1"].attr["parameters"].s
    assert [d.size for d in nodes["relu1"].attr["_output_shapes"].list.shape[0].dim] == [1, 4, 6, 6]


def test_openvino_bad_arguments(tmp_path):
    """Missing file, wrong type and non-IR XML raise errors naming xmlname."""
    with pytest.raises(FileNotFoundError, match="xmlname"):
        graph_from_openvino(tmp_path / "missing.xml")
    with pytest.raises(TypeError, match="xmlname"):
        graph_from_openvino(None)
    bad = tmp_path / "bad.xml"
    bad.write_text("<net><layers/></net>")
    with pytest.raises(ValueError, match="xmlname"):
        graph_from_openvino(bad)
    bad.write_text("<net>")
    with pytest.raises(ValueError, match="xmlname"):
        graph_from_openvino(bad)
