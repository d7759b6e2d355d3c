"""What the probe hands to the diagnosis: one host-side record per step.

The probe reduces hooked tensors on their device, copies the packed results to pinned host
memory without a sync and, once the copy has landed, turns them into a :class:`StepRecord`.
Everything here is plain host data (ints, floats, numpy rows), so the diagnosis never touches
a device tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

PASSES = ("forward", "backward", "grad")


@dataclass(frozen=True, kw_only=True)
class TensorEvent:
    """One hooked tensor of one step, in execution order.

    ``module`` is the module's qualified name (``""`` for the root module), or the parameter's
    name when ``pass_ == "grad"``. ``tensor`` says which tensor was measured: ``"output"``
    (forward), ``"grad_output"`` or ``"grad_input"`` (backward), ``"grad"`` (the accumulated
    parameter gradient). ``nonfinite`` counts its NaN and ±Inf elements over the step's
    micro-batches. ``inputs_nonfinite`` counts the non-finite elements of what this
    computation consumed (forward: the module's tensor inputs; backward ``grad_input``: the
    module's ``grad_output``), or is None where unknown: ``nonfinite > 0`` with
    ``inputs_nonfinite == 0`` marks the producer of a non-finite value, not a propagator.
    ``stats`` is the float64 row in ``kernels.STAT_NAMES`` order on scheduled steps, else
    None. On CUDA every column is filled; on the CPU the columns the probe does not read are
    NaN (``sum`` and ``zeros``; also ``min``/``max``/``abs_max`` of gradients), see
    ``tbprobe.probe.batch.probe_stats``.
    """

    seq: int
    module: str
    pass_: str
    tensor: str
    nonfinite: int
    inputs_nonfinite: int | None = None
    stats: np.ndarray | None = None

    def __post_init__(self):
        if self.pass_ not in PASSES:
            raise ValueError(f"pass_: expected one of {PASSES}, got {self.pass_!r}")


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """Everything the probe measured in one optimizer step, on the host.

    ``events`` are sorted by ``seq``. ``grad_norms`` maps parameter names (and ``"_total"``)
    to the L2 norm of the accumulated, unscaled gradient; ``param_norms`` and
    ``update_ratios`` (‖Δw‖/‖w‖) likewise, and ``lrs`` the learning rate of each updated
    parameter's optimizer group. A mapping is empty on a step where it was not computed.
    ``scheduled`` is True on the steps the probe logs (``every``), where the events carry
    full ``stats``. ``skipped`` is True when an AMP ``GradScaler`` found Inf/NaN
    gradients and skipped this step's optimizer step (AMP's normal overflow steps).
    ``volume`` is the number of elements of the hooked modules' training forward outputs
    over the step's micro-batches (0: not counted): it is proportional to the data the step
    saw, so an epoch's last, short batch shows as a small volume. Under torch.distributed,
    ``ranks`` is ``(n, lowest, highest, world)`` of the ranks whose own tensors held the
    step's non-finite values (None: none did, or not distributed). ``lr_groups`` holds
    ``(learning rate, parameter names)`` per group of the probe's optimizer, on every
    checked step (update sizes need a scheduled one). ``loss_scale`` is an AMP
    ``GradScaler``'s scale in this step (None without one). ``param_faults`` lists
    ``(module, parameter)`` where a module's forward output was non-finite from finite
    inputs while its parameter already was (known on the CPU, in the hook).
    """

    step: int
    scheduled: bool
    skipped: bool = False
    events: tuple[TensorEvent, ...] = ()
    grad_norms: Mapping[str, float] = field(default_factory=dict)
    param_norms: Mapping[str, float] = field(default_factory=dict)
    update_ratios: Mapping[str, float] = field(default_factory=dict)
    lrs: Mapping[str, float] = field(default_factory=dict)  # learning rate per updated param
    volume: int = 0
    ranks: tuple[int, int, int, int] | None = None
    lr_groups: tuple = ()
    loss_scale: float | None = None
    param_faults: tuple[tuple[str, str], ...] = ()
