"""The diagnosis: non-finite attribution, gradient and update spikes, vanishing gradients, dead
activations — from the per-step host records the probe produces.

Pure host code on plain floats and numpy: no torch, no device. The probe calls
:meth:`Diagnosis.feed` once per :class:`~tbprobe.probe.records.StepRecord`, in step order (a
record may arrive a step late; the diagnosis only needs the order). ``tbprobe report`` feeds it
records rebuilt from the scalars of an event file, so both apply the same baselines.
The attribution of non-finite values is in :mod:`tbprobe.probe.diagnosis_nonfinite`, the
running baselines in :mod:`tbprobe.probe.diagnosis_baseline`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from tbprobe.probe.anomaly import Anomaly, fmt_number
from tbprobe.probe.diagnosis_baseline import Baselines
from tbprobe.probe.diagnosis_lr import LrWatch
from tbprobe.probe.diagnosis_nonfinite import (
    attribute,
    grad_norm_anomaly,
    has_nonfinite,
    owner_module,
    param_anomaly,
)
from tbprobe.probe.records import StepRecord, TensorEvent

__all__ = ["Diagnosis", "owner_module"]

# Columns of a stats row, in kernels.STAT_NAMES order (checked by the tests); not imported from
# tbprobe.kernels so that the diagnosis and `tbprobe report` never import torch.
_COUNT, _ABS_MAX = 0, 5
_NO_SERIES: tuple[list[str], np.ndarray] = ([], np.zeros(0))


@dataclass(kw_only=True, eq=False)
class Diagnosis:
    """Turns each step's record into anomalies.

    - **nonfinite**: the first tensor, in execution order, with NaN/Inf elements; refined to
      the module that produced it (see :func:`~tbprobe.probe.diagnosis_nonfinite.attribute`).
      One report per episode: a run stays in it while non-finite values persist, and a later,
      new episode is reported again. On a step whose optimizer step an AMP ``GradScaler``
      skipped (``record.skipped``), non-finite gradients are a normal overflow, not reported;
      non-finite forward outputs still are. An overflow the scaler's backoff does not cure
      (``max_skipped`` skipped steps in a row, and the scale, where known, down to 1 or
      less: a NaN made in the backward pass on every step) is reported at the first step
      of the run of skips; a scale that starts high halves many times before it fits. A
      parameter that the optimizer step made non-finite from finite gradients is reported
      at that step, pass ``"update"``.
    - **spike**: a gradient norm (per parameter or ``_total``) or an update size ‖Δw‖ at
      least ``spike_factor`` × its baseline, the median of its last ``window`` finite values
      (the first ``warmup`` observations of a series are skipped, and at least ``min_history``
      values are needed), that rose *suddenly*: it is also at least ``spike_factor`` × the
      largest of the ``recent`` observations before the last ``rise`` ones — or, for a
      parameter whose total did not spike, ``param_spike_factor`` × (default
      ``spike_factor``²: one tensor's norm is far noisier than the total's). Healthy
      training often grows its gradients 10–100× over tens of steps, noisily; an explosion
      climbs that far within ``rise`` observations. A parameter counts only when its value
      reaches ``min_share`` × the baseline of the total (``_total``; for updates, the
      root-sum-square of all ‖Δw‖; its baseline restarts when a series joins it, e.g. a
      backbone unfrozen mid-run). Reported once per episode (it lasts while some series
      stays ``spike_factor`` × above its baseline), with the ``top_k`` offenders by ratio.
      Update sizes are judged at each parameter's peak learning rate so far (‖Δw‖ × peak ÷
      its rate now), so a schedule's decay and warm restart (SGDR) move no baseline, while
      a rate above any it had (a planted LR spike) counts in full.
      A step that saw under half its usual data (``StepRecord.volume`` against the median
      of the last ``window`` steps': an epoch's last, short batch) has noisier gradients:
      its norms are judged divided by √(usual ÷ its volume), the most that noise can
      inflate a mean gradient's norm (a batch of 1 after batches of 256: ÷ 16).
    - **vanishing** (warning): a gradient norm at most ``vanishing`` × its baseline (exactly 0
      included) for ``patience`` observations in a row; a series that vanishes again within
      ``window`` steps of recovering (an MoE expert that gets tokens now and then) is the
      same episode, not reported again; a series that was exactly 0 and came back (a
      multi-task head without labels in some batches, an optional feature's embedding) is
      never reported for being exactly 0 again, and a run of exact zeros needs
      max(``patience``, ``window`` // 5) observations.
    - **dead** (warning): a module's forward output all zeros on ``patience`` scheduled
      steps in a row, after the module's first ``warmup`` observations; once per module,
      and never for a module seen all zeros before and back since (an MoE expert or an
      optional feature's embedding without input on some steps is zero now and then).

    Example::

        diag = Diagnosis(spike_factor=10.0)
        for record in records:
            for anomaly in diag.feed(record):
                print(anomaly)
    """

    spike_factor: float = 10.0
    window: int = 50
    warmup: int = 10
    min_history: int = 5
    rise: int = 3
    recent: int = 10
    param_spike_factor: float | None = None
    vanishing: float = 1e-4
    patience: int = 3
    min_share: float = 0.1
    top_k: int = 5
    max_skipped: int = 8
    check_nonfinite: bool = True
    check_spikes: bool = True
    check_warnings: bool = True
    _state: dict = field(init=False, repr=False, default_factory=dict)
    _param_factor: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self):
        for name in ("check_nonfinite", "check_spikes", "check_warnings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        ints = ("window", "warmup", "min_history", "rise", "recent", "patience", "top_k")
        ints += ("max_skipped",)
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {v!r}")
            if v < (0 if name == "warmup" else 1):
                raise ValueError(f"{name}: expected an integer >= {int(name != 'warmup')}, got {v}")
        if self.min_history > self.window:
            raise ValueError(f"min_history: expected <= window ({self.window})")
        if self.rise - 1 + self.recent > self.window:
            raise ValueError(f"recent: expected rise - 1 + recent <= window ({self.window})")
        for name in ("spike_factor", "param_spike_factor", "vanishing", "min_share"):
            v = getattr(self, name)
            if v is None and name == "param_spike_factor":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name}: expected a finite number, got {v!r}")
        if self.spike_factor <= 1:
            raise ValueError(f"spike_factor: expected > 1, got {self.spike_factor}")
        psf = self.param_spike_factor
        if psf is not None and psf < self.spike_factor:
            raise ValueError(f"param_spike_factor: expected >= spike_factor, got {psf}")
        self._param_factor = float(self.spike_factor**2 if psf is None else psf)
        if not 0 <= self.min_share < 1:
            raise ValueError(f"min_share: expected 0 <= min_share < 1, got {self.min_share}")
        if not 0 <= self.vanishing < 1:
            raise ValueError(f"vanishing: expected 0 <= vanishing < 1, got {self.vanishing}")
        self.reset()

    def reset(self) -> None:
        """Forget every baseline and episode (e.g. after loading a checkpoint)."""
        args = (self.window, self.warmup, self.min_history)
        self._state = {
            "grad": Baselines(*args),
            "update": Baselines(*args),
            "in_nonfinite": False,
            "spiking": {"grad": False, "update": False},
            "low": {},  # grad series -> consecutive low observations
            "vanished": {},  # grad series -> baseline when reported
            "recovered": {},  # grad series -> step its last vanishing episode ended
            "zero_low": set(),  # grad series whose current low run is of exact zeros
            "intermittent": set(),  # grad series seen exactly 0, then back: never reported 0
            "act_seen": {},  # module -> scheduled forward observations
            "dead": set(),  # modules reported dead (once each)
            "zero_run": {},  # module -> all-zero scheduled observations in a row
            "grad_top": None,  # (names, largest stored grad norms) from the last observation
            "skips": (0, None, False),  # AMP skips in a row, the first's attribution, told
            "volumes": deque(maxlen=self.window),  # StepRecord.volume of recent steps
            "vol_last": (0, 1.0, 0),  # the last volume, its allowance, the usual volume
            "peak_lr": ([], np.zeros(0)),  # (update series, their peak learning rates)
            "peak_by_name": {},  # peak learning rates of series no longer in the last step
            "lr": LrWatch(self.spike_factor, self.warmup),  # every checked step's rates
        }

    def feed(self, record: StepRecord) -> list[Anomaly]:
        """The anomalies that ``record`` reveals, in the order found (often none).

        Example::

            new = diag.feed(StepRecord(step=3, scheduled=True, grad_norms={"_total": 1e9}))
        """
        if not isinstance(record, StepRecord):
            raise TypeError(f"record: expected a StepRecord, got {type(record).__name__}")
        skipped = getattr(record, "skipped", False) is True  # an AMP-skipped optimizer step
        found: list[Anomaly] = []
        broken = has_nonfinite(record.events, record.grad_norms)
        bad_params = not broken and not all(math.isfinite(v) for v in record.param_norms.values())
        if self.check_nonfinite:
            found += _rank_note(self._check_nonfinite(record, skipped, broken, bad_params), record)
        if self.check_warnings and not broken and not self._state["in_nonfinite"]:
            found += self._check_dead(record)  # NaN everywhere but in a padding row: not dead
        if broken or bad_params:
            return found  # its norms are those of a broken step: no baseline, no spike
        grads = _items(record.grad_norms)
        # A skipped optimizer step made no update: its zero ‖Δw‖ is no observation.
        updates, scale = (_NO_SERIES, None) if skipped else self._update_sizes(record)
        if self.check_spikes:
            allow = self._allowance(record)
            found += self._check_spikes(record.step, "grad", grads, allow)
            spikes = self._check_spikes(record.step, "update", updates, allow)
            found += self._lr_note(self._peak_note(spikes, updates[0], scale), record)
            lr_groups = getattr(record, "lr_groups", ())
            if lr_groups:  # update sizes, where measured, say it with ‖Δw‖ (above)
                found += self._state["lr"].feed(record.step, lr_groups, not updates[0])
        else:
            self._observe("grad", grads)
        if scale is not None and not self._state["spiking"]["update"]:
            self._state["peak_lr"] = self._state["peak_new"]  # a calm step: rates it had
        if self.check_warnings:
            found += self._check_vanishing(record.step, grads)
        return found

    # ------------------------------------------------------------------ non-finite values
    def _check_nonfinite(
        self, record: StepRecord, skipped: bool, broken: bool, bad_params: bool
    ) -> list[Anomaly]:
        """``broken``: :func:`has_nonfinite` of the whole record; ``bad_params``: a parameter
        norm is not finite while it is not broken."""
        events, grad_norms = record.events, record.grad_norms
        persistent = self._skips(record, skipped, broken)
        if persistent is not None:
            return [persistent]
        if skipped and broken:  # an AMP overflow in the gradients is normal; the forward is not
            events, grad_norms = tuple(e for e in events if e.pass_ == "forward"), {}
            broken = has_nonfinite(events, grad_norms)
        if bad_params and not skipped:  # an episode while the parameters stay non-finite
            if self._state["in_nonfinite"]:
                return []
            self._state["in_nonfinite"] = True
            return [param_anomaly(record.step, record.param_norms, grad_norms)]
        if not broken:
            if events or grad_norms:  # a step that was checked and is clean ends an episode
                self._state["in_nonfinite"] = False
            return []
        if self._state["in_nonfinite"]:
            return []
        self._state["in_nonfinite"] = True
        return [_first_nonfinite(record.step, events, grad_norms)]

    def _skips(self, record: StepRecord, skipped: bool, broken: bool) -> Anomaly | None:
        """Count AMP-skipped steps in a row; from the ``max_skipped``-th on, once the scale
        (``record.loss_scale``, where known) is at most 1, the first one's attribution,
        unless an episode is already reported. A scaler's backoff cures an overflow within
        a few halvings of a fitting scale (from an ``init_scale`` of 2**24, a dozen); a
        NaN the backward pass makes on every step never is, and at a scale of 1 an fp16
        gradient that still overflows is above 65504 itself."""
        n, first, told = self._state["skips"]
        if not skipped:
            self._state["skips"] = (0, None, False)
            return None
        if first is None and broken:
            first = _first_nonfinite(record.step, record.events, record.grad_norms)
        self._state["skips"] = (n + 1, first, told)
        scale = getattr(record, "loss_scale", None)
        if told or n + 1 < self.max_skipped or first is None or self._state["in_nonfinite"]:
            return None
        if scale is not None and scale > 1.0:  # the backoff is still at work
            return None
        self._state["skips"] = (n + 1, first, True)  # once per run of skips
        self._state["in_nonfinite"] = True
        at = "" if scale is None else f", its scale down to {scale:.3g}"
        msg = (
            f"{first.message}; the GradScaler then skipped {n + 1} optimizer steps in a row "
            f"(to step {record.step}{at}): not an overflow its backoff cures"
        )
        return replace(first, message=msg)

    # ------------------------------------------------------------------ spikes
    def _observe(self, family: str, items: tuple[list[str], np.ndarray]) -> tuple:
        base: Baselines = self._state[family]
        names, values = items
        known = len(base.index)
        rows = base.rows(names)
        if known and len(base.index) > known and "_total" in base.index:
            base.forget("_total")  # a new series joins the total (a layer unfrozen)
        med, peak, top = base.observe(rows, values, self.rise - 1, self.recent)
        if family == "grad":  # for _check_vanishing, which follows on the same series
            self._state["grad_top"] = (names, top)
        return names, values, med, peak

    def _allowance(self, record: StepRecord) -> tuple[float, str]:
        """``(a, note)``: how much noisier than usual this step's gradients may be, and
        the message's note on it. ``a`` is √(usual volume ÷ this one) when the step saw
        under half the median volume of the last ``window`` steps (an epoch's last, short
        batch), else 1; the mean gradient of b samples has a norm at most √(B/b)× that of
        B samples when noise dominates it, and less when the signal does."""
        v = record.volume if isinstance(record.volume, int) else 0
        if v <= 0:
            return 1.0, ""
        vols = self._state["volumes"]
        last, a, usual = self._state["vol_last"]
        if v != last or a != 1.0 or len(vols) < self.min_history:  # else a constant batch
            usual = sorted(vols)[len(vols) // 2] if len(vols) >= self.min_history else 0
            a = math.sqrt(usual / v) if 2 * v < usual else 1.0
            self._state["vol_last"] = (v, a, usual)
        vols.append(v)
        if a == 1.0:
            return 1.0, ""
        note = (
            f" (norms divided by {a:.3g}: this step saw {v / usual:.2g}× the usual data, "
            "a short batch, so its gradients may be that much noisier)"
        )
        return a, note

    def _check_spikes(self, step: int, family: str, items, allow=(1.0, "")) -> list[Anomaly]:
        """``allow``: :meth:`_allowance`'s; the values are judged, shown and kept in the
        baselines divided by its factor (an explosion still stands out: a short batch's
        gradients are only noisier)."""
        if not items[0]:  # not measured this step (update sizes come on scheduled steps)
            return []
        factor, note = allow
        if factor != 1.0:
            items = (items[0], items[1] / factor)
        names, values, med, peak = self._observe(family, items)
        ratio = np.divide(values, med, out=np.full(len(names), np.nan), where=med > 0)
        hit = ratio >= self.spike_factor  # NaN (no baseline): False
        was = self._state["spiking"][family]
        if not was and not hit.any():
            return []  # calm, as most steps are: nothing is sudden, and the state stays calm
        total = names.index("_total") if "_total" in names else None
        if total is not None and med[total] > 0:
            # A parameter's spike that stays below min_share of the usual total is noise in
            # a small tensor (a LayerNorm bias early in training), not an explosion.
            small = values < self.min_share * med[total]
            small[total] = False
            hit &= ~small
        # Sudden: far above everything the series reached just before the climb. Gradual
        # growth (a model starting to learn) always has recent values close to this one. One
        # tensor's norm is much noisier than the total's (a conv bias can jump 10x in two
        # healthy steps), so a parameter alone must jump param_spike_factor.
        need = np.full(len(names), self._param_factor)
        if total is not None:
            need[total] = self.spike_factor
        sudden = hit & (values >= need * peak)  # NaN peak (none stored yet): False
        if np.isfinite(ratio).any():  # some baseline exists: the step tells calm from not
            self._state["spiking"][family] = bool(hit.any()) if was else bool(sudden.any())
        if was or not sudden.any():
            return []
        a = self._spike(step, family, names, values, med, peak, ratio, hit, sudden, total)
        return [replace(a, value=a.value * factor, message=a.message + note) if note else a]

    def _update_sizes(self, record: StepRecord) -> tuple[tuple[list[str], np.ndarray], object]:
        """``((names, ‖Δw‖ at peak learning rate), scale)``: each parameter's update size
        times its peak learning rate so far ÷ its learning rate now (``scale``, an array, or
        None without learning rates), so that a schedule (warm-up, decay, a warm restart
        back to the peak) moves no baseline, while a learning rate above any the parameter
        had before counts in full (the peak takes a new rate once a step at it is calm: a
        planted LR spike does not become the reference; it starts from the rate the
        group's schedule set out from, so a run resumed late in a cycle knows the rate a
        warm restart returns to). A zero learning rate makes no observation."""
        names, values = _update_sizes(record)
        lrs = record.lrs
        if not lrs or not names:
            return (names, values), None
        n = len(names) - 1  # the last series is the total, rebuilt below
        lr = np.fromiter((lrs.get(k, math.nan) for k in names[:n]), np.float64, n)
        known, peaks = self._state["peak_lr"]
        if known != names:
            peak = self._state["peak_by_name"]
            for k, v in zip(known, peaks.tolist(), strict=True):  # sync-ok: numpy
                peak[k] = v
            for _, group, *hint in getattr(record, "lr_groups", ()):  # the schedules' peaks
                for k in group if hint else ():
                    if k not in peak and math.isfinite(hint[0]):
                        peak[k] = hint[0]
            peaks = np.fromiter((peak.get(k, 0.0) for k in names[:n]), np.float64, n)
        with np.errstate(invalid="ignore", divide="ignore"):
            use = np.isfinite(lr) & (lr >= 0)
            peaks = np.where(use, np.fmax(peaks, lr), peaks)
            scale = np.where(use, peaks / lr, 1.0)  # lr 0: inf (peak 0: NaN): no observation
        self._state["peak_new"] = (list(names), peaks)
        sized = values[:n] * scale
        # A series observed again (a group that a learning rate of 0 kept frozen starts to
        # train) joins the total: its baseline restarts, as for a new series.
        seen, prev = np.isfinite(sized), self._state.get("upd_seen")
        if prev is not None and prev[0] == names and (seen & ~prev[1]).any():
            self._state["update"].forget("_total")
        self._state["upd_seen"] = (list(names), seen)
        finite = sized[np.isfinite(sized)]
        sized = np.append(sized, np.sqrt(np.sum(finite * finite)))
        return (names, sized), np.append(scale, 1.0)

    def _peak_note(self, found: list[Anomaly], names: list[str], scale) -> list[Anomaly]:
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

    def _lr_note(self, found: list[Anomaly], record: StepRecord) -> list[Anomaly]:
        """Say so in an update spike's message when its parameter's learning rate rose since
        the last step that measured updates (a schedule's warm restart, a planted spike):
        the likely cause. Remembers this step's learning rates."""
        lrs, prev = record.lrs, self._state.get("lrs") or {}
        if lrs:
            self._state["lrs"] = lrs
        out = []
        for a in found:
            now, before = lrs.get(a.where), prev.get(a.where)
            if now is not None and before is not None and before >= 0 and now > 2 * before:
                rise = f"×{now / before:.3g}" if before > 0 else "from 0"
                note = f"; its learning rate rose {rise} (to {fmt_number(now)}) since the last"
                a = replace(a, message=a.message + note + " measured update")
            out.append(a)
        return out

    def _spike(self, step, family, names, values, med, peak, ratio, hit, sudden, total):
        params = [i for i in range(len(names)) if i != total and np.isfinite(ratio[i])]
        params.sort(key=lambda i: -ratio[i])
        hits = [i for i in params if hit[i]]
        ranked = hits or [i for i in params if ratio[i] > 1]  # only the total: contributors
        top = tuple((names[i], float(ratio[i])) for i in ranked[: self.top_k])
        total_sudden = total is not None and bool(sudden[total])
        worst = next((i for i in hits if sudden[i] or total_sudden), total)
        what = "gradient norm" if family == "grad" else "update size ‖Δw‖"
        msg = f"{what} of {names[worst]} is {ratio[worst]:.3g}× its baseline"
        msg += f" ({fmt_number(values[worst])} vs median {fmt_number(med[worst])}; "
        jump = values[worst] / peak[worst] if peak[worst] > 0 else math.inf
        msg += f"{jump:.3g}× its recent peak)"
        if total is not None and worst != total and np.isfinite(ratio[total]):
            msg += f"; total {ratio[total]:.3g}×"
        if top:
            msg += "; top: " + ", ".join(f"{n} {r:.3g}×" for n, r in top)
        where = names[worst]
        return Anomaly(
            step,
            "spike",
            where,
            "grad norm" if family == "grad" else "update",
            float(values[worst]),
            float(med[worst]),
            msg,
            pass_="grad" if family == "grad" else "update",
            module="" if where == "_total" else owner_module(where),
            top=top,
        )

    # ------------------------------------------------------------------ warnings
    def _check_vanishing(self, step: int, items) -> list[Anomaly]:
        names, values = items
        if not names:
            return []
        low, vanished, found = self._state["low"], self._state["vanished"], []
        recovered = self._state["recovered"]
        seen = self._state["grad_top"]
        # The median below also holds this step's value, so it is at most the largest value
        # stored before it or this value: a value above vanishing × that largest one (or NaN)
        # cannot be a candidate, and on most steps nothing needs sorting.
        if (
            not low
            and not vanished
            and seen is not None
            and seen[0] is names
            and not (values <= self.vanishing * seen[1]).any()
        ):
            return []
        base: Baselines = self._state["grad"]
        rows = base.rows(names)
        med = base.median(rows)  # already holds this step's value: a collapse must persist
        with np.errstate(invalid="ignore"):
            cand = (med > 0) & (values <= self.vanishing * med)  # NaN: False
        at = np.flatnonzero(cand).tolist()  # sync-ok: numpy
        if low or vanished:  # series with a run or a report going on are looked at too
            at = sorted({*at, *(i for i, n in enumerate(names) if n in low or n in vanished)})
        zeros, intermittent = self._state["zero_low"], self._state["intermittent"]
        for i in at:
            name, v, m = names[i], values[i], med[i]
            if name in vanished:
                if v > self.vanishing * vanished[name]:
                    del vanished[name]
                    recovered[name] = step
                    if name in zeros:  # exactly 0 for a while, then back: by design
                        intermittent.add(name)
                    zeros.discard(name)
                continue
            if not (m > 0 and v <= self.vanishing * m):
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

    def _check_dead(self, record: StepRecord) -> list[Anomaly]:
        seen, dead, found = self._state["act_seen"], self._state["dead"], []
        this_step: dict[str, TensorEvent] = {}
        for e in record.events:
            if e.pass_ == "forward" and e.tensor == "output" and e.stats is not None:
                prev = this_step.get(e.module)
                if prev is None or not _all_zero(e):
                    this_step[e.module] = e
        run = self._state["zero_run"]
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


def _first_nonfinite(step: int, events, grad_norms) -> Anomaly:
    """The report of a step with a non-finite value: attributed from the per-tensor counts
    where there are some, else from the gradient norms."""
    if any(e.nonfinite > 0 for e in events):
        return attribute(step, events)
    return grad_norm_anomaly(step, grad_norms)


def _rank_note(found: list[Anomaly], record: StepRecord) -> list[Anomaly]:
    """Under torch.distributed, say on which ranks a non-finite value was (``record.ranks``):
    a bad sample in one rank's data shard, or every rank (all-reduced gradients)."""
    ranks = getattr(record, "ranks", None)
    if not found or not ranks:
        return found
    n, lo, hi, world = ranks
    if n == 1:
        where = f"on rank {lo} of {world}"
    elif n == world:
        where = f"on every rank ({world})"
    else:
        where = f"on {n} of {world} ranks ({lo} to {hi})"
    return [replace(a, message=f"{a.message}; {where}") for a in found]


def _all_zero(e: TensorEvent) -> bool:
    """Every finite element is 0 (``abs_max`` is over finite elements; on the CPU the probe
    does not count zeros, see ``batch.probe_stats``)."""
    return bool(e.stats[_COUNT] > 0 and e.stats[_ABS_MAX] == 0)


def _items(mapping) -> tuple[list[str], np.ndarray]:
    names = list(mapping)
    return names, np.fromiter(mapping.values(), np.float64, len(names))


def _update_sizes(record: StepRecord) -> tuple[list[str], np.ndarray]:
    """‖Δw‖ per parameter: the update ratio times ‖w‖ (the ratio alone without ‖w‖).

    ‖Δw‖ rather than ‖Δw‖/‖w‖: the ratio of a parameter whose norm passes near zero (a scalar
    or a zero-initialised bias) jumps without anything being wrong.
    """
    names, values = _items(record.update_ratios)
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
