"""The optimizer's learning rates, watched on every checked step for the diagnosis.

Update sizes ‖Δw‖ need a copy of the parameters from before the optimizer step, which the
probe makes on scheduled steps only (``every``). A learning rate is a host number the probe
reads on every checked step for nothing, so a learning rate that jumps far above any its
group had before (a planted LR spike, a unit bug in a schedule) is reported at the step that
used it, whatever the schedule. Pure host code, like :mod:`tbprobe.probe.diagnosis`.
"""

from __future__ import annotations

import math

from tbprobe.probe.anomaly import Anomaly, fmt_number
from tbprobe.probe.diagnosis_nonfinite import owner_module

__all__ = ["LrWatch"]


class LrWatch:
    """Per optimizer group (keyed by its parameters' names): how many steps it was seen,
    its peak learning rate so far, and whether it is above ``factor`` × that peak now.

    A group's rate at least ``factor`` × its peak, after its first ``warmup`` observations
    (a warm-up from a tiny start factor climbs fast at first), is a spike of its updates,
    reported once while it stays up. The peak only takes rates of calm steps, so a spike
    never becomes the reference; a warm restart back to the peak (SGDR) is no spike.

    Example::

        watch = LrWatch(factor=10.0, warmup=10)
        found = watch.feed(step, ((1e-3, ("fc.weight", "fc.bias")),), report=True)
    """

    def __init__(self, factor: float, warmup: int):
        self.factor, self.warmup = factor, warmup
        self.groups: dict[tuple, list] = {}  # names -> [seen, peak, high]

    def feed(self, step: int, groups, report: bool) -> list[Anomaly]:
        """The anomalies of one step's ``groups`` ``((lr, names[, peak]), ...)`` (``peak``:
        the rate the group's schedule set out from, the peak's floor); ``report``: False on
        a step whose update sizes were measured (their own check covers it)."""
        found = []
        for lr, names, *hint in groups:
            if not (isinstance(lr, float) and math.isfinite(lr) and lr >= 0):
                continue
            s = self.groups.get(names)
            if s is None:
                floor = hint[0] if hint and math.isfinite(hint[0]) else 0.0
                s = self.groups[names] = [0, max(floor, 0.0), False]
            seen, peak, was = s
            high = seen >= self.warmup and peak > 0 and lr >= self.factor * peak
            if high and not was and report:
                found.append(_spike(step, lr, peak, names))
            s[0], s[2] = seen + 1, high
            if not high and lr > peak:
                s[1] = lr
        return found


def _spike(step: int, lr: float, peak: float, names: tuple) -> Anomaly:
    owners = {owner_module(n) for n in names}
    where = names[0] if len(owners) == 1 else "_total"
    module = owners.pop() if len(owners) == 1 else ""
    ratio = lr / peak
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    msg = (
        f"learning rate of the optimizer group of {shown} is {ratio:.3g}× its peak so far "
        f"({fmt_number(lr)} vs {fmt_number(peak)}): this step's updates of those parameters "
        "are that much larger than any before"
    )
    return Anomaly(
        step,
        "spike",
        where,
        "update",
        lr,
        peak,
        msg,
        pass_="update",
        module=module,
        top=tuple((n, ratio) for n in names[:5]),
    )
