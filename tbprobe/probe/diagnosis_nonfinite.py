"""Non-finite attribution: which module made the first NaN/Inf of a step, in which pass.

Pure host code on :class:`~tbprobe.probe.records.StepRecord` data. :class:`Diagnosis` keeps
the episode state (one report per episode) and calls :func:`attribute` on the step that starts
one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from tbprobe.probe.anomaly import Anomaly
from tbprobe.probe.records import TensorEvent

__all__ = [
    "attribute",
    "grad_norm_anomaly",
    "has_nonfinite",
    "owner_module",
    "param_anomaly",
]

_ORIGIN = {
    True: "produced here: its inputs were finite",
    False: "propagated: its inputs were already non-finite",
    None: "inputs not measured",
}


def owner_module(param: str) -> str:
    """The module a parameter belongs to: ``"layers.2.weight"`` -> ``"layers.2"``.

    Example: ``owner_module("bias")`` -> ``""`` (the root module).
    """
    return param.rsplit(".", 1)[0] if "." in param else ""


def _is_ancestor(anc: str, name: str) -> bool:
    return anc != name and (anc == "" or name.startswith(anc + "."))


def has_nonfinite(events: Sequence[TensorEvent], grad_norms: Mapping[str, float]) -> bool:
    """True when an event counted NaN/Inf elements or a gradient norm is not finite.

    Example: ``has_nonfinite((), {"_total": float("inf")})`` -> ``True``.
    """
    return any(e.nonfinite > 0 for e in events) or not all(
        math.isfinite(v) for v in grad_norms.values()
    )


def _producer(e: TensorEvent, events) -> bool | None:
    if e.inputs_nonfinite is not None:
        return e.inputs_nonfinite == 0
    if e.pass_ == "grad":  # a parameter gradient: what reached its module from above
        owner = owner_module(e.module)
        for o in events:
            if o.pass_ == "backward" and o.module == owner and o.tensor == "grad_output":
                return o.nonfinite == 0
    return None


def attribute(step: int, events: Sequence[TensorEvent]) -> Anomaly:
    """The first non-finite event of ``events`` (in ``seq`` order, at least one with
    ``nonfinite > 0``), refined to the module that produced the value.

    A parameter gradient is reported as its module's backward when that module's
    ``grad_input`` is non-finite too (parameter hooks fire before the module's backward
    hook). A propagator (non-finite inputs) is replaced by its innermost enclosing module
    whose inputs were finite: the value was made inside it, outside any hooked child. So is
    a module's non-finite ``grad_output`` that came from no hooked consumer, when an
    enclosing module's own ``grad_output`` was finite (see ``_made_in_backward``).

    Example::

        a = attribute(5, record.events)  # Anomaly(5, "nonfinite", "blk.fc2", "output", ...)
    """
    bad = [e for e in events if e.nonfinite > 0]
    first = chosen = bad[0]
    if first.pass_ == "grad":
        owner = owner_module(first.module)
        chosen = next(
            (
                e
                for e in bad
                if e.pass_ == "backward" and e.module == owner and e.tensor == "grad_input"
            ),
            first,
        )
    producer = _producer(chosen, events)
    if producer is False:
        enclosing = next(
            (
                e
                for e in bad
                if e.seq > chosen.seq
                and e.pass_ == chosen.pass_
                and e.tensor == chosen.tensor
                and _is_ancestor(e.module, chosen.module)
                and e.inputs_nonfinite == 0
            ),
            None,
        )
        if enclosing is not None:
            chosen, producer = enclosing, True
    outside = False
    if producer is False and chosen.pass_ == "forward" and not _earlier_forward(chosen, bad):
        outside = True  # its inputs were not finite, and no hooked module before it made them
    if producer is None and chosen.pass_ == "backward" and chosen.tensor == "grad_output":
        made = _made_in_backward(chosen, events, bad)
        if made is not None:
            chosen, producer = made, True
        else:  # no hooked consumer and no hooked module around it passed it on
            outside = True
    module = owner_module(chosen.module) if chosen.pass_ == "grad" else chosen.module
    name = chosen.module or "<root>"
    origin = _ORIGIN[producer]
    if outside and chosen.pass_ == "forward":
        origin += (
            ", and no hooked module before it made them so: the model's input, or code "
            "between modules"
        )
    elif outside:
        origin = "it came from outside the hooked modules: the loss, or code between modules"
    msg = f"{chosen.nonfinite} NaN/Inf in the {_what(chosen)} of {name} ({origin})"
    if chosen is not first:
        msg += f"; first non-finite hooked tensor: {_what(first)} of {first.module or '<root>'}"
    return Anomaly(
        step,
        "nonfinite",
        chosen.module,
        chosen.tensor,
        float(chosen.nonfinite),
        None,
        msg,
        pass_=chosen.pass_,
        module=module,
        producer=producer,
    )


def _made_in_backward(chosen: TensorEvent, events, bad) -> TensorEvent | None:
    """For a first non-finite ``grad_output`` of a module (no hooked consumer passed it on:
    its ``grad_input`` would have come first), the ``grad_input`` event of the innermost
    enclosing module whose own ``grad_output`` was finite: the gradient turned non-finite
    inside that module's backward, in its own code (``torch.sqrt`` at 0 between two hooked
    children), or None."""
    finite_in = [
        e
        for e in events
        if e.pass_ == "backward"
        and e.tensor == "grad_output"
        and e.nonfinite == 0
        and _is_ancestor(e.module, chosen.module)
    ]
    for anc in sorted(finite_in, key=lambda e: -len(e.module)):
        return next(
            (
                e
                for e in bad
                if e.pass_ == "backward" and e.module == anc.module and e.tensor == "grad_input"
            ),
            None,
        )
    return None


def grad_norm_anomaly(step: int, grad_norms: Mapping[str, float]) -> Anomaly:
    """The report for a step whose only non-finite evidence is a gradient norm (no
    per-tensor counts): the first non-finite parameter norm, else ``_total``.

    Example: ``grad_norm_anomaly(3, {"x.weight": nan, "_total": nan}).where`` -> ``"x.weight"``.
    """
    bad = [k for k, v in grad_norms.items() if not math.isfinite(v)]
    where = next((k for k in bad if k != "_total"), bad[0])
    value = grad_norms[where]
    return Anomaly(
        step,
        "nonfinite",
        where,
        "grad norm",
        value,
        None,
        f"gradient norm of {where} is {value} (first non-finite value seen; no per-tensor "
        "counts on this step)",
        pass_="grad",
        module=owner_module(where) if where != "_total" else "",
    )


def param_anomaly(step: int, param_norms: Mapping[str, float], grad_norms) -> Anomaly | None:
    """The report for a step whose optimizer step made a parameter non-finite while every
    hooked tensor and gradient was finite (its state or learning rate went bad), or None.

    Example: ``param_anomaly(4, {"fc.weight": nan}, {"fc.weight": 0.3}).pass_`` -> ``"update"``.
    """
    bad = [k for k, v in param_norms.items() if not math.isfinite(v)]
    if not bad:
        return None
    where, value = bad[0], param_norms[bad[0]]
    grad = grad_norms.get(where)
    why = "its gradient was finite" if grad is not None else "its gradient was not measured"
    return Anomaly(
        step,
        "nonfinite",
        where,
        "param",
        value,
        None,
        f"{where} is non-finite after the optimizer step ({why}): the optimizer's state or "
        f"learning rate made it; {len(bad)} parameter(s) in all",
        pass_="update",
        module=owner_module(where),
    )


def _what(e: TensorEvent) -> str:
    """How a message names an event's tensor: "gradient" (a parameter's), "forward output",
    "backward grad_input"."""
    return "gradient" if e.pass_ == "grad" else f"{e.pass_} {e.tensor}"


def _earlier_forward(chosen: TensorEvent, bad: list) -> bool:
    """Whether a hooked forward output before ``chosen`` (not one of the modules around it,
    whose calls start before it) was non-finite."""
    return any(
        e.pass_ == "forward" and e.seq < chosen.seq and not _is_ancestor(e.module, chosen.module)
        for e in bad
    )
