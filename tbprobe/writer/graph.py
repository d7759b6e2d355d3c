"""Model graphs for TensorBoard's graph dashboard: ``add_graph``, ``add_onnx_graph``, ...

``graph_from_module`` traces a PyTorch model with ``torch.jit.trace`` and lays the inlined
TorchScript graph out as tensorboardX 2.6.5 does (it delegates to
``torch.utils.tensorboard``), so a dashboard built on tensorboardX looks the same:

- one node per value an op produces, named ``<scope>/<debug name>`` where the scope is the
  module path, e.g. ``Net/Sequential[seq]/Linear[2]/input.3``; parameters read by
  ``prim::GetAttr`` sit one level deeper, e.g. ``Net/Linear[fc]/weight/weight.1``;
- ``input/<arg>`` and ``output/output.<i>`` nodes (op ``IO Node``) for the graph's inputs and
  outputs;
- attributes ``attr`` (the op's TorchScript attributes as text) and ``_output_shapes``.

Differences from tensorboardX, none of which moves a node or an edge: the model is traced
once (``check_trace=False``; the check re-runs the model and only warns), each submodule's
train/eval flag is restored exactly (tensorboardX resets all of them to the root's), a
``ScriptModule``'s graph is inlined on a copy (tensorboardX inlines the user's, in place, so
its unnamed values are numbered differently here), and nodes carry the device of the tensor
they produce.

The ONNX and OpenVINO readers live in ``tbprobe.writer.onnx_graph`` and are re-exported here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from tbprobe.writer.onnx_graph import (
    PRODUCER_VERSION,
    graph_from_onnx,
    graph_from_openvino,
    shape_attr,
)
from tbprobe.writer.proto import graph_pb2

__all__ = ["graph_from_module", "graph_from_onnx", "graph_from_openvino"]

_GETATTR = "prim::GetAttr"
_ROOT = "__module"  # torch.jit.trace's qualified name for the traced model in scope names
_IO_OP = "IO Node"


@dataclass
class _Node:
    """One node of the dashboard's graph, before it becomes a ``NodeDef``."""

    name: str
    op: str
    inputs: list[str]
    attr: str
    shape: list[int] | None
    device: str


def graph_from_module(
    model: nn.Module,
    input_to_model=None,
    verbose: bool = False,
    use_strict_trace: bool = True,
) -> tuple[graph_pb2.GraphDef, graph_pb2.RunMetadata]:
    """The graph of ``model`` run on ``input_to_model``, as tensorboardX's ``add_graph`` shows it.

    Args:
        model: the ``torch.nn.Module`` to draw. It runs once, in eval mode, under
            ``torch.jit.trace``; every submodule's train/eval flag is restored afterwards.
        input_to_model: what ``model`` is called with: a tensor (one argument), a tuple or list
            (one argument per element; elements may be tensors or nested tuples, lists and dicts
            of tensors), a dict (one argument), or ``None`` for a model whose ``forward`` takes
            no arguments.
        verbose: print the traced TorchScript graph.
        use_strict_trace: passed to ``torch.jit.trace(strict=...)``; ``False`` lets ``forward``
            return lists and dicts.

    Returns:
        ``(GraphDef, RunMetadata)``: the graph for ``Event.graph_def`` and step stats listing the
        devices the graph ran on, for ``Event.tagged_run_metadata``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``input_to_model`` is not one of the
            above.
        RuntimeError: ``torch.jit.trace`` failed; the message names the model and the cause.

    Examples::

        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        graph, run_metadata = graph_from_module(net, torch.zeros(2, 4))
        [n.name for n in graph.node][:2]   # ['input/input.1', 'output/output.1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _example_args(input_to_model)
    traced = _trace(model, args, strict=bool(use_strict_trace))
    jit_graph = _inlined_graph(traced, owned=traced is not model)
    if verbose:
        print(jit_graph)
    nodes = _layout(jit_graph, traced)

    graph = graph_pb2.GraphDef(versions=graph_pb2.VersionDef(producer=PRODUCER_VERSION))
    for n in nodes:
        node_def = graph.node.add(name=n.name, op=n.op, input=n.inputs, device=n.device)
        node_def.attr["attr"].s = n.attr.encode("utf-8")
        if n.shape is not None:
            node_def.attr["_output_shapes"].CopyFrom(shape_attr([n.shape]))
    devices = list(dict.fromkeys(n.device for n in nodes if n.device)) or ["/device:CPU:0"]
    run_metadata = graph_pb2.RunMetadata()
    for device in devices:
        run_metadata.step_stats.dev_stats.add(device=device)
    return graph, run_metadata


# ---------------------------------------------------------------------------------- tracing
def _example_args(input_to_model) -> tuple:
    """``input_to_model`` as ``torch.jit.trace``'s positional arguments (tensorboardX's meaning)."""
    if input_to_model is None:
        return ()
    if isinstance(input_to_model, torch.Tensor):
        return (input_to_model,)
    if isinstance(input_to_model, (tuple, list)):
        _check_traceable(input_to_model, "input_to_model")
        return tuple(input_to_model)
    if isinstance(input_to_model, dict):
        _check_traceable(input_to_model, "input_to_model")
        return (input_to_model,)
    raise TypeError(
        "input_to_model must be a tensor, a tuple or list of tensors, or None; "
        f"got {type(input_to_model).__name__}"
    )


def _check_traceable(value, where: str) -> None:
    """Raise unless ``value`` is a tensor or a (nested) tuple, list or dict of tensors."""
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_traceable(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_traceable(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} must be a tensor (or a tuple, list or dict of tensors), "
        f"got {type(value).__name__}: torch.jit.trace can only trace tensors"
    )


def _trace(model: nn.Module, args: tuple, strict: bool):
    """Trace ``model`` in eval mode, then put every submodule back in the mode it was in."""
    if isinstance(model, torch.jit.ScriptModule):
        return model  # what torch.jit.trace returns for one, with a warning
    modes = [(m, m.training) for m in model.modules()]
    model.train(False)
    try:
        with warnings.catch_warnings():
            # Tracing is how we read the graph, not something the user chose.
            warnings.filterwarnings(
                "ignore",
                message=r"`torch\.jit\.trace(_method)?` is deprecated",
                category=DeprecationWarning,
            )
            return torch.jit.trace(model, args, strict=strict, check_trace=False)
    except Exception as err:
        hint = " (input_to_model is None: does forward need arguments?)" if not args else ""
        raise RuntimeError(
            f"add_graph could not trace model {type(model).__name__} with torch.jit.trace"
            f"{hint}: {type(err).__name__}: {err}"
        ) from err
    finally:
        # train() first, so that modules overriding it can undo what train(False) did;
        # then each flag exactly, since train(mode) sets every submodule to the same mode.
        model.train(modes[0][1])
        for module, training in modes:
            module.training = training


def _inlined_graph(traced, owned: bool):
    """The traced graph with submodule calls inlined.

    Inlining our own trace in place numbers values as tensorboardX does. Tracing a
    ``ScriptModule`` returns the user's module itself: its graph gets a copy (tensorboardX
    inlines the user's module in place).
    """
    inline = getattr(torch._C, "_jit_pass_inline", None)
    if not owned or inline is None:
        return traced.inlined_graph
    jit_graph = traced.graph
    inline(jit_graph)
    return jit_graph


# ----------------------------------------------------------------------------------- layout
def _layout(jit_graph, traced) -> list[_Node]:
    """Nodes in tensorboardX's order: inputs, outputs, then each op's outputs."""
    labels = {
        name: f"{_type_name(m)}[{name.rsplit('.', 1)[-1]}]"
        for name, m in traced.named_modules(prefix=_ROOT)
    }
    root = _type_name(traced)

    inputs = [
        v
        for v in jit_graph.inputs()
        if v.uses() and v.type().kind() != "ClassType"  # unused, or the module itself
    ]
    ops = []  # (display scope, jit node)
    attr_scopes = {}  # debug name of a GetAttr output -> its raw scope
    for node in jit_graph.nodes():
        scope = node.scopeName()
        if node.kind() == _GETATTR:
            # GetAttr nodes carry no scope: derive one from the chain of attribute reads,
            # e.g. self.seq -> self.seq.0 -> .weight gives "__module.seq/__module.seq.0/...".
            parent = node.input().node()
            field = node.s("name")
            if parent.kind() == _GETATTR:
                parent_scope = attr_scopes[parent.output().debugName()]
                scope = f"{parent_scope}/{parent_scope.rsplit('/', 1)[-1]}.{field}"
            else:
                scope = f"{_ROOT}.{field}"
            attr_scopes[node.output().debugName()] = scope
            if node.output().type().kind() == "ClassType":
                continue  # a submodule: its scope already shows it
        ops.append((_display_scope(scope, labels, root), node))

    # A value is named after the scope of the op that produces it; one nothing produces
    # (a module object) after the last op that reads it.
    names = {}
    for scope, node in ops:
        for v in node.inputs():
            names[v.debugName()] = f"{scope}/{v.debugName()}"
    for v in inputs:
        names[v.debugName()] = f"input/{v.debugName()}"
    for scope, node in ops:
        for v in node.outputs():
            names[v.debugName()] = f"{scope}/{v.debugName()}"

    nodes = [_Node(names[v.debugName()], _IO_OP, [], "", _io_shape(v), _device(v)) for v in inputs]
    for i, v in enumerate(jit_graph.outputs()):
        d = v.debugName()
        nodes.append(
            _Node(f"output/output.{i + 1}", _IO_OP, [names.get(d, d)], "", _io_shape(v), _device(v))
        )
    for _, node in ops:
        ins = [names.get(v.debugName(), v.debugName()) for v in node.inputs()]
        attr = _attr_text(node)
        for v in node.outputs():
            shape = list(v.type().sizes()) if v.isCompleteTensor() else None
            nodes.append(_Node(names[v.debugName()], node.kind(), ins, attr, shape, _device(v)))
    return nodes


def _type_name(module) -> str:
    """The class name of the module a traced (or scripted) module came from."""
    if isinstance(module, torch.jit.TracedModule) and getattr(module, "_name", None):
        return module._name
    return getattr(module, "original_name", "Module")


def _display_scope(scope: str, labels: dict[str, str], root: str) -> str:
    """``__module.seq/__module.seq.0`` -> ``Net/Sequential[seq]/Linear[0]``."""
    parts = [labels.get(alias, alias.rsplit(".", 1)[-1]) for alias in scope.split("/")]
    return f"{root}/{'/'.join(parts)}" if any(parts) else root


def _io_shape(value) -> list[int] | None:
    """An input's or output's shape: ``None`` if unknown, ``[1]`` if not a tensor."""
    try:
        sizes = value.type().sizes()
    except (RuntimeError, AttributeError):
        return [1]
    return None if sizes is None else list(sizes)


def _device(value) -> str:
    """``/device:CPU:0``-style name of the device a tensor value lives on, else ``""``."""
    ty = value.type()
    device = ty.device() if isinstance(ty, torch._C.TensorType) else None
    if device is None:
        return ""
    return f"/device:{device.type.upper()}:{device.index or 0}"


def _attr_text(node) -> str:
    """The node's attributes as tensorboardX prints them, e.g. ``{ value : 1}``."""
    values = {}
    for key in node.attributeNames():
        kind = node.kindOf(key)
        try:
            values[key] = getattr(node, kind)(key)
        except (AttributeError, RuntimeError, TypeError):
            values[key] = f"<{kind}>"
    # Quotes confuse TensorBoard's attribute display.
    return str(values).replace("'", " ")
