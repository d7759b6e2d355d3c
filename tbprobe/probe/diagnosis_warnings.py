"""The diagnosis' warnings: vanishing gradients and dead (all-zero) activations, with their
episodes. Pure host code on numpy, like :mod:`tbprobe.probe.diagnosis`, which owns one
:class:`Warnings` and describes both checks.
"""

from __future__ import annotations

import numpy as np

from tbprobe.probe.anomaly import Anomaly, fmt_number
from tbprobe.probe.diagnosis_baseline import Baselines
from tbprobe.probe.diagnosis_nonfinite import owner_module
from tbprobe.probe.records import StepRecord, TensorEvent

__all__ = ["Warnings"]

# Columns of a stats row, in kernels.STAT_NAMES order (checked by the tests); not imported from
# tbprobe.kernels so that the diagnosis and `tbprobe report` never import torch.
_COUNT, _ABS_MAX = 0, 5


class Warnings:
    """The state of both checks (see :class:`~tbprobe.probe.diagnosis.Diagnosis`).

    Example::

        warn = Warnings(vanishing=1e-4, patience=3, window=50, warmup=10)
        found = warn.dead(record) + warn.vanishing(step, (names, values), grad_base, top)
    """

    def __init__(self, vanishing: float, patience: int, window: int, warmup: int):
        self.vanishing_factor, self.patience = vanishing, patience
        self.window, self.warmup = window, warmup
        self.low: dict[str, int] = {}  # grad series -> consecutive low observations
        self.vanished: dict[str, float] = {}  # grad series -> baseline when reported
        self.recovered: dict[str, int] = {}  # grad series -> step its last episode ended
        self.zero_low: set[str] = set()  # grad series whose current low run is exact zeros
        self.intermittent: set[str] = set()  # seen exactly 0, then back: 0 never reported
        self.act_seen: dict[str, int] = {}  # module -> scheduled forward observations
        self.dead_modules: set[str] = set()  # reported dead, or zero now and then
        self.zero_run: dict[str, int] = {}  # module -> all-zero observations in a row

    def vanishing(self, step: int, items, base: Baselines, seen) -> list[Anomaly]:
        """Vanishing gradients of ``items`` ``(names, values)``, whose ``base`` holds this
        step's values already; ``seen``: ``(names, largest stored values)`` of that
        observation, or None (the shortcut then sorts the medians)."""
        names, values = items
        if not names:
            return []
        low, vanished, found = self.low, self.vanished, []
        recovered = self.recovered
        # The median below also holds this step's value, so it is at most the largest value
        # stored before it or this value: a value above vanishing × that largest one (or NaN)
        # cannot be a candidate, and on most steps nothing needs sorting.
        if (
            not low
            and not vanished
            and seen is not None
            and seen[0] is names
            and not (values <= self.vanishing_factor * seen[1]).any()
        ):
            return []
        rows = base.rows(names)
        med = base.median(rows)  # already holds this step's value: a collapse must persist
        with np.errstate(invalid="ignore"):
            cand = (med > 0) & (values <= self.vanishing_factor * med)  # NaN: False
        at = np.flatnonzero(cand).tolist()  # sync-ok: numpy
        if low or vanished:  # series with a run or a report going on are looked at too
            at = sorted({*at, *(i for i, n in enumerate(names) if n in low or n in vanished)})
        zeros, intermittent = self.zero_low, self.intermittent
        for i in at:
            name, v, m = names[i], values[i], med[i]
            if name in vanished:
                if v > self.vanishing_factor * vanished[name]:
                    del vanished[name]
                    recovered[name] = step
                    if name in zeros:  # exactly 0 for a while, then back: by design
                        intermittent.add(name)
                    zeros.discard(name)
                continue
            if not (m > 0 and v <= self.vanishing_factor * m):
                if low.pop(name, None) is not None and name in zeros and v > 0:
                    intermittent.add(name)  # exactly 0 for a step or two, then back
                zeros.discard(name)
                continue
            if v != 0:
                zeros.discard(name)
            elif name not in low:
                zeros.add(name)  # a run of exact zeros, so far
            low[name] = low.get(name, 0) + 1
            # Exact zeros by design (no labels for a head in this batch) come in short runs:
            # a run of them needs a fifth of a window, a collapse to a tiny norm `patience`.
            need = max(self.patience, self.window // 5) if name in zeros else self.patience
            if low[name] < need:
                continue
            del low[name]
            vanished[name] = float(m)
            back = recovered.pop(name, None)
            if back is not None and step - back < self.window + self.patience:
                continue  # vanishing again soon after a brief recovery: the same episode
            if name in zeros and name in intermittent:
                continue  # its gradient is exactly 0 on some steps by design
            state = "exactly 0" if v == 0 else f"{v / m:.3g}× its baseline"
            found.append(
                Anomaly(
                    step,
                    "vanishing",
                    name,
                    "grad norm",
                    float(v),
                    float(m),
                    f"gradient norm of {name} is {state} (median {fmt_number(m)}) for "
                    f"{need} observations",
                    pass_="grad",
                    module="" if name == "_total" else owner_module(name),
                )
            )
        return found

    def dead(self, record: StepRecord) -> list[Anomaly]:
        """Dead modules: forward outputs all zeros on ``patience`` scheduled steps in a row."""
        seen, dead, found = self.act_seen, self.dead_modules, []
        this_step: dict[str, TensorEvent] = {}
        for e in record.events:
            if e.pass_ == "forward" and e.tensor == "output" and e.stats is not None:
                prev = this_step.get(e.module)
                if prev is None or not _all_zero(e):
                    this_step[e.module] = e
        run = self.zero_run
        for module, e in this_step.items():
            n = seen.get(module, 0)
            seen[module] = n + 1
            if not _all_zero(e):
                if run.pop(module, None) and n >= self.warmup:
                    dead.add(module)  # zero on some steps only (no input): not dead, ever
                continue
            run[module] = k = run.get(module, 0) + 1
            if n >= self.warmup and k >= self.patience and module not in dead:
                dead.add(module)  # once per module: an MoE expert or an optional feature
                count = int(e.stats[_COUNT])  # without input on some steps flaps
                found.append(
                    Anomaly(
                        record.step,
                        "dead",
                        module,
                        "output",
                        0.0,
                        None,
                        f"forward output of {module or '<root>'} is all zeros ({count} elements)",
                        pass_="forward",
                    )
                )
        return found


def _all_zero(e: TensorEvent) -> bool:
    """Every finite element is 0 (``abs_max`` is over finite elements; on the CPU the probe
    does not count zeros, see ``batch.probe_stats``)."""
    return bool(e.stats[_COUNT] > 0 and e.stats[_ABS_MAX] == 0)
