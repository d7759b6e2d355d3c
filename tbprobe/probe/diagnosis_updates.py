"""Update sizes ‖Δw‖ for the diagnosis, judged at each parameter's peak learning rate, and
the notes an update spike's message gets; also how much noisier a short batch's gradients
may be. Pure host code on numpy, like :mod:`tbprobe.probe.diagnosis`, which owns one
:class:`UpdateSizes` and one :class:`ShortBatch`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

import numpy as np

from tbprobe.probe.anomaly import Anomaly, fmt_number
from tbprobe.probe.diagnosis_baseline import Baselines
from tbprobe.probe.records import StepRecord

__all__ = ["ShortBatch", "UpdateSizes", "update_sizes"]


class UpdateSizes:
    """Per parameter: its peak learning rate so far (committed on calm steps only), the
    series observed last time, and the learning rates of the last measured update.

    Example::

        sizes = UpdateSizes()
        (names, values), scale = sizes.measure(record, update_baselines)
        ...  # the spike check on (names, values)
        sizes.commit()  # a calm step: its rates become peaks
    """

    def __init__(self):
        self.peak_lr: tuple[list, np.ndarray] = ([], np.zeros(0))  # (series, peak rates)
        self.peak_new: tuple[list, np.ndarray] | None = None  # this step's, until committed
        self.peak_by_name: dict[str, float] = {}  # peaks of series not in the last step
        self.seen: tuple[list, np.ndarray] | None = None  # (series, observed last time)
        self.lrs: dict = {}  # the last measured update's learning rates

    def commit(self) -> None:
        """The step was calm: the rates it saw become the peaks."""
        if self.peak_new is not None:
            self.peak_lr = self.peak_new

    def measure(
        self, record: StepRecord, base: Baselines
    ) -> tuple[tuple[list[str], np.ndarray], object]:
        """``((names, ‖Δw‖ at peak learning rate), scale)``: each parameter's update size
        times its peak learning rate so far ÷ its learning rate now (``scale``, an array, or
        None without learning rates), so that a schedule (warm-up, decay, a warm restart
        back to the peak) moves no baseline, while a learning rate above any the parameter
        had before counts in full (the peak takes a new rate once a step at it is calm: a
        planted LR spike does not become the reference; it starts from the rate the
        group's schedule set out from, so a run resumed late in a cycle knows the rate a
        warm restart returns to). A zero learning rate makes no observation. ``base``: the
        update sizes' baselines (their total restarts when a series is observed again)."""
        names, values = update_sizes(record)
        lrs = record.lrs
        if not lrs or not names:
            return (names, values), None
        n = len(names) - 1  # the last series is the total, rebuilt below
        lr = np.fromiter((lrs.get(k, math.nan) for k in names[:n]), np.float64, n)
        known, peaks = self.peak_lr
        if known != names[:n]:
            peak = self.peak_by_name
            for k, v in zip(known, peaks.tolist(), strict=True):  # sync-ok: numpy
                peak[k] = v
            for _, group, *hint in record.lr_groups:  # the schedules' peaks
                for k in group if hint else ():
                    if k not in peak and math.isfinite(hint[0]):
                        peak[k] = hint[0]
            peaks = np.fromiter((peak.get(k, 0.0) for k in names[:n]), np.float64, n)
        with np.errstate(invalid="ignore", divide="ignore"):
            use = np.isfinite(lr) & (lr >= 0)
            peaks = np.where(use, np.fmax(peaks, lr), peaks)
            scale = np.where(use, peaks / lr, 1.0)  # lr 0: inf (peak 0: NaN): no observation
        self.peak_new = (list(names[:n]), peaks)  # the total has no rate
        sized = values[:n] * scale
        # A series observed again (a group that a learning rate of 0 kept frozen starts to
        # train) joins the total: its baseline restarts, as for a new series.
        seen, prev = np.isfinite(sized), self.seen
        if prev is not None and prev[0] == names and (seen & ~prev[1]).any():
            base.forget("_total")
        self.seen = (list(names), seen)
        finite = sized[np.isfinite(sized)]
        sized = np.append(sized, np.sqrt(np.sum(finite * finite)))
        return (names, sized), np.append(scale, 1.0)

    def peak_note(self, found: list[Anomaly], names: list[str], scale) -> list[Anomaly]:
        """An update spike judged at a learning rate below its parameter's peak says so,
        and its ``value`` is the ‖Δw‖ measured."""
        if scale is None or not found:
            return found
        out = []
        for a in found:
            s = float(scale[names.index(a.where)]) if a.where in names else 1.0
            if s != 1.0 and math.isfinite(s):
                note = " (sizes at each parameter's peak learning rate so far: "
                note += f"this one's ×{s:.3g})"
                a = replace(a, value=a.value / s, message=a.message + note)
            out.append(a)
        return out

    def lr_note(self, found: list[Anomaly], record: StepRecord) -> list[Anomaly]:
        """Say so in an update spike's message when its parameter's learning rate rose since
        the last step that measured updates (a schedule's warm restart, a planted spike):
        the likely cause. Remembers this step's learning rates."""
        lrs, prev = record.lrs, self.lrs
        if lrs:
            self.lrs = lrs
        out = []
        for a in found:
            now, before = lrs.get(a.where), prev.get(a.where)
            if now is not None and before is not None and before >= 0 and now > 2 * before:
                rise = f"×{now / before:.3g}" if before > 0 else "from 0"
                note = f"; its learning rate rose {rise} (to {fmt_number(now)}) since the last"
                a = replace(a, message=a.message + note + " measured update")
            out.append(a)
        return out


class ShortBatch:
    """The recent steps' ``StepRecord.volume`` (the data each saw): a step that saw under
    half the usual has noisier gradients (an epoch's last, short batch).

    Example::

        short = ShortBatch(window=50, min_history=5)
        factor, note = short.allowance(record)  # (1.0, "") on a usual step
    """

    def __init__(self, window: int, min_history: int):
        self.min_history = min_history
        self.volumes: deque = deque(maxlen=window)
        self.last = (0, 1.0, 0)  # the last volume, its allowance, the usual volume

    def allowance(self, record: StepRecord) -> tuple[float, str]:
        """``(a, note)``: how much noisier than usual this step's gradients may be, and
        the message's note on it. ``a`` is √(usual volume ÷ this one) when the step saw
        under half the median volume of the last ``window`` steps (an epoch's last, short
        batch), else 1; the mean gradient of b samples has a norm at most √(B/b)× that of
        B samples when noise dominates it, and less when the signal does."""
        v = record.volume if isinstance(record.volume, int) else 0
        if v <= 0:
            return 1.0, ""
        vols = self.volumes
        last, a, usual = self.last
        if v != last or a != 1.0 or len(vols) < self.min_history:  # else a constant batch
            usual = sorted(vols)[len(vols) // 2] if len(vols) >= self.min_history else 0
            a = math.sqrt(usual / v) if 2 * v < usual else 1.0
            self.last = (v, a, usual)
        vols.append(v)
        if a == 1.0:
            return 1.0, ""
        note = (
            f" (norms divided by {a:.3g}: this step saw {v / usual:.2g}× the usual data, "
            "a short batch, so its gradients may be that much noisier)"
        )
        return a, note


def update_sizes(record: StepRecord) -> tuple[list[str], np.ndarray]:
    """‖Δw‖ per parameter: the update ratio times ‖w‖ (the ratio alone without ‖w‖).

    ‖Δw‖ rather than ‖Δw‖/‖w‖: the ratio of a parameter whose norm passes near zero (a scalar
    or a zero-initialised bias) jumps without anything being wrong.
    """
    names = list(record.update_ratios)
    values = np.fromiter(record.update_ratios.values(), np.float64, len(names))
    if record.param_norms:
        norms = np.fromiter(
            (float(record.param_norms.get(k, 1.0)) for k in names), np.float64, len(names)
        )
        values = values * norms
    if len(names) and "_total" not in names:
        finite = values[np.isfinite(values)]
        names = [*names, "_total"]
        values = np.append(values, np.sqrt(np.sum(finite * finite)))
    return names, values
