"""Landed steps: decoded, written and fed to the diagnosis, and the reaction to their anomalies.

Steps packed at a step boundary reach the host later; this is the host side that takes them
from there. It is apart from :mod:`tbprobe.probe.probe` so that the probe module keeps to the
hooks and the step boundary; ``Probe`` binds :func:`poll` and :func:`react` as its ``_poll``
and ``_react`` methods, so the per-step path gains no call.
"""

from __future__ import annotations

import sys
import warnings

from tbprobe.probe.emit import at_step, build_record, write_step


class AnomalyError(RuntimeError):
    """Raised from the training step when ``on_anomaly="raise"``; ``.anomalies`` lists them."""

    def __init__(self, anomalies):
        self.anomalies = list(anomalies)
        msgs = "; ".join(str(a).removeprefix("tbprobe: ") for a in self.anomalies)  # step, place
        super().__init__(f"tbprobe found {len(self.anomalies)} anomalies: {msgs}")


def poll(probe, wait: bool) -> list:
    """Decode, write and diagnose the pending steps that have landed (all of them if
    ``wait``), in order; the new anomalies."""
    new = []
    while probe._pending:
        p = probe._pending[0]
        if not p.ready():
            if not wait:
                break
            p.wait()
        probe._pending.popleft()
        try:
            data = p.decode()
            record = build_record(p.meta, data)
            probe.last_record = record
            if probe._out is not None:
                write_step(probe._out, p.meta, data, record, probe.cfg)
            if probe._diagnosis is not None:
                new.extend(probe._diagnosis.feed(record))
        except Exception as exc:
            probe._hooks.fail("step", "write", exc)
    return new


def react(probe, new: list, raising: bool = True) -> None:
    """Record, write and report ``new`` anomalies, then react as ``on_anomaly`` says."""
    if not new:
        return
    probe.anomalies.extend(new)
    writes = probe._out is not None
    try:
        from tbprobe.probe.anomaly import format_markdown

        for step in sorted({a.step for a in new}) if writes else ():
            group = [a for a in new if a.step == step]
            with at_step(probe._out, step) as gs:
                probe._out.add_text("anomaly", format_markdown(group), gs)
    except Exception as exc:
        probe._hooks.fail("anomaly", "write", exc)
    for a in new if writes else ():
        print(str(a), file=sys.stderr)  # "tbprobe: step N: <kind> at <where> ...: message"
    reaction = probe.cfg.on_anomaly
    if callable(reaction):
        for a in new:
            reaction(a)
    elif reaction == "snapshot" and probe._attached:
        where = [getattr(a, "module", None) or a.where for a in new]
        probe._arm(probe.snapshots.resolve(where, strict=False), 1)
    elif reaction == "raise" and raising:
        raise AnomalyError(new)
    else:
        warnings.warn(
            f"tbprobe: {len(new)} anomalies at step {new[0].step}: {new[0].message}",
            RuntimeWarning,
            stacklevel=3,
        )
