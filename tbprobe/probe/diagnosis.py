"""The diagnosis: non-finite attribution, gradient and update spikes, vanishing gradients, dead
activations — from the per-step host records the probe produces.

Pure host code on plain floats and numpy: no torch, no device. The probe calls
:meth:`Diagnosis.feed` once per :class:`~tbprobe.probe.records.StepRecord`, in step order (a
record may arrive a step late; the diagnosis only needs the order). ``tbprobe report`` feeds it
records rebuilt from the scalars of an event file, so both apply the same baselines.
The attribution of non-finite values is in :mod:`tbprobe.probe.diagnosis_nonfinite`, the
running baselines in :mod:`tbprobe.probe.diagnosis_baseline`, update sizes and short batches
in :mod:`tbprobe.probe.diagnosis_updates`, the learning rates in
:mod:`tbprobe.probe.diagnosis_lr`, the warnings in :mod:`tbprobe.probe.diagnosis_warnings`.
"""

from __future__ import annotations

import math
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
from tbprobe.probe.diagnosis_updates import ShortBatch, UpdateSizes
from tbprobe.probe.diagnosis_warnings import Warnings
from tbprobe.probe.records import StepRecord

__all__ = ["Diagnosis", "owner_module"]

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
            "grad_top": None,  # (names, largest stored grad norms) from the last observation
            "skips": (0, None, False),  # AMP skips in a row, the first's attribution, told
        }
        self._warn = Warnings(self.vanishing, self.patience, self.window, self.warmup)
        self._short = ShortBatch(self.window, self.min_history)
        self._updates = UpdateSizes()
        self._lrs = LrWatch(self.spike_factor, self.warmup)  # every checked step's rates

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
            found += self._warn.dead(record)  # NaN everywhere but in a padding row: not dead
        if broken or bad_params:
            return found  # its norms are those of a broken step: no baseline, no spike
        grads = _items(record.grad_norms)
        # A skipped optimizer step made no update: its zero ‖Δw‖ is no observation.
        sizes = self._updates
        updates, scale = (
            (_NO_SERIES, None) if skipped else sizes.measure(record, self._state["update"])
        )
        if self.check_spikes:
            allow = self._short.allowance(record)
            found += self._check_spikes(record.step, "grad", grads, allow)
            spikes = self._check_spikes(record.step, "update", updates, allow)
            found += sizes.lr_note(sizes.peak_note(spikes, updates[0], scale), record)
            lr_groups = record.lr_groups
            if lr_groups:  # update sizes, where measured, say it with ‖Δw‖ (above)
                found += self._lrs.feed(record.step, lr_groups, not updates[0])
        else:
            self._observe("grad", grads)
        if scale is not None and not self._state["spiking"]["update"]:
            sizes.commit()  # a calm step: the learning rates it had become peaks
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
                self._state["clean_step"] = record.step
            return []
        if self._state["in_nonfinite"]:
            return []
        self._state["in_nonfinite"] = True
        return [self._param_origin(_first_nonfinite(record.step, events, grad_norms), record)]

    def _param_origin(self, a: Anomaly, record: StepRecord) -> Anomaly:
        """``a``, or, where a module made a forward output non-finite because one of its
        parameters already was (``record.param_faults``, known on the CPU), the report of
        that parameter: it turned non-finite after the forward of the last clean checked
        step (its optimizer step, or code that changed it), pass ``"update"``; at the first
        checked step it came in non-finite (a bad initialisation or checkpoint)."""
        faults = record.param_faults
        if not faults or a.pass_ != "forward" or a.producer is not True:
            return a
        pname = next((p for m, p in faults if m == a.where), None)
        if pname is None:
            return a
        where = f"{a.where}.{pname}" if a.where else pname
        made = f"made the forward output of {a.where or '<root>'} non-finite at step {a.step}"
        clean = self._state.get("clean_step")
        if clean is None:
            msg = f"{where} was non-finite before the forward of step {a.step}, the first "
            msg += f"checked (a bad initialisation or checkpoint), and {made}"
            return replace(a, where=where, tensor="param", message=msg)
        msg = f"{where} is non-finite: it turned so after the forward of step {clean} (its "
        msg += f"optimizer step, or code that changed it), and {made}"
        return replace(a, step=clean, where=where, tensor="param", pass_="update", message=msg)

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
        scale = record.loss_scale
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

    def _check_spikes(self, step: int, family: str, items, allow=(1.0, "")) -> list[Anomaly]:
        """``allow``: :meth:`ShortBatch.allowance`'s; the values are judged, shown and kept in the
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
        return self._warn.vanishing(step, items, self._state["grad"], self._state["grad_top"])


def _first_nonfinite(step: int, events, grad_norms) -> Anomaly:
    """The report of a step with a non-finite value: attributed from the per-tensor counts
    where there are some, else from the gradient norms."""
    if any(e.nonfinite > 0 for e in events):
        return attribute(step, events)
    return grad_norm_anomaly(step, grad_norms)


def _rank_note(found: list[Anomaly], record: StepRecord) -> list[Anomaly]:
    """Under torch.distributed, say on which ranks a non-finite value was (``record.ranks``):
    a bad sample in one rank's data shard, or every rank (all-reduced gradients)."""
    ranks = record.ranks
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


def _items(mapping) -> tuple[list[str], np.ndarray]:
    names = list(mapping)
    return names, np.fromiter(mapping.values(), np.float64, len(names))
