"""The diagnosis: non-finite attribution, gradient and update spikes, vanishing gradients, dead
activations — from the per-step host records the probe produces.

Pure host code on plain floats and numpy: no torch, no device. The probe calls
:meth:`Diagnosis.feed` once per :class:`~tbprobe.probe.records.StepRecord`, in step order (a
record may arrive a step late; the diagnosis only needs the order). ``tbprobe report`` feeds it
records rebuilt from the scalars of an event file, so both apply the same baselines.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from tbprobe.probe.anomaly import Anomaly, fmt_number
from tbprobe.probe.records import StepRecord, TensorEvent

__all__ = ["Diagnosis", "owner_module"]

# Columns of a stats row, in kernels.STAT_NAMES order (checked by the tests); not imported from
# tbprobe.kernels so that the diagnosis and `tbprobe report` never import torch.
_COUNT, _ZEROS = 0, 9


def owner_module(param: str) -> str:
    """The module a parameter belongs to: ``"layers.2.weight"`` -> ``"layers.2"``.

    Example: ``owner_module("bias")`` -> ``""`` (the root module).
    """
    return param.rsplit(".", 1)[0] if "." in param else ""


def _is_ancestor(anc: str, name: str) -> bool:
    return anc != name and (anc == "" or name.startswith(anc + "."))


class _Baselines:
    """Recent finite values of named series in one ``(n, window)`` ring buffer.

    ``seen`` counts finite observations per series; the first ``warmup`` of them never enter
    the buffer. ``median`` is NaN for a series with fewer than ``min_history`` values.
    """

    def __init__(self, window: int, warmup: int, min_history: int):
        self.window, self.warmup, self.min_history = window, warmup, min_history
        self.index: dict[str, int] = {}
        self.buf = np.full((8, window), np.nan)
        self.seen = np.zeros(8, np.int64)
        self.pos = np.zeros(8, np.int64)
        self.stored = np.zeros(8, np.int64)

    def rows(self, names) -> np.ndarray:
        for name in names:
            if name not in self.index:
                self.index[name] = len(self.index)
        n = len(self.index)
        if n > len(self.seen):
            cap = max(n, 2 * len(self.seen))
            self.buf = np.vstack([self.buf, np.full((cap - len(self.buf), self.window), np.nan)])
            for attr in ("seen", "pos", "stored"):
                old = getattr(self, attr)
                setattr(self, attr, np.concatenate([old, np.zeros(cap - len(old), np.int64)]))
        return np.fromiter((self.index[k] for k in names), np.int64, len(names))

    def median(self, rows: np.ndarray) -> np.ndarray:
        out = np.full(len(rows), np.nan)
        ok = self.stored[rows] >= self.min_history
        if ok.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[ok] = np.nanmedian(self.buf[rows[ok]], axis=1)
        return out

    def push(self, rows: np.ndarray, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        rows, values = rows[finite], values[finite]
        take = self.seen[rows] >= self.warmup
        self.seen[rows] += 1
        rows, values = rows[take], values[take]
        self.buf[rows, self.pos[rows]] = values
        self.pos[rows] = (self.pos[rows] + 1) % self.window
        self.stored[rows] = np.minimum(self.stored[rows] + 1, self.window)


@dataclass(kw_only=True, eq=False)
class Diagnosis:
    """Turns each step's record into anomalies.

    - **nonfinite**: the first tensor, in execution order, with NaN/Inf elements; refined to
      the module that produced it (see :meth:`_attribute`). One report per episode: a run
      stays in it while non-finite values persist, and a later, new episode is reported again.
    - **spike**: a gradient norm (per parameter or ``_total``) or an update size ‖Δw‖ at
      least ``spike_factor`` × its baseline, the median of its last ``window`` finite values
      (the first ``warmup`` observations of a series are skipped, and at least ``min_history``
      values are needed). A parameter counts only when its value reaches ``min_share`` × the
      baseline of the total (``_total``; for updates, the root-sum-square of all ‖Δw‖).
      Reported once per episode, with the ``top_k`` offenders by ratio.
    - **vanishing** (warning): a gradient norm at most ``vanishing`` × its baseline (exactly 0
      included) for ``patience`` observations in a row.
    - **dead** (warning): a module's forward output all zeros on a scheduled step, after the
      module's first ``warmup`` observations.

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
    vanishing: float = 1e-4
    patience: int = 3
    min_share: float = 0.1
    top_k: int = 5
    check_nonfinite: bool = True
    check_spikes: bool = True
    check_warnings: bool = True
    _state: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        for name in ("check_nonfinite", "check_spikes", "check_warnings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("window", "warmup", "min_history", "patience", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {v!r}")
        if self.window < 1 or self.top_k < 1 or self.patience < 1 or self.min_history < 1:
            raise ValueError("window, min_history, patience, top_k: expected integers >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected an integer >= 0, got {self.warmup}")
        if self.min_history > self.window:
            raise ValueError(f"min_history: expected <= window ({self.window})")
        for name in ("spike_factor", "vanishing", "min_share"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name}: expected a finite number, got {v!r}")
        if self.spike_factor <= 1:
            raise ValueError(f"spike_factor: expected > 1, got {self.spike_factor}")
        if not 0 <= self.min_share < 1:
            raise ValueError(f"min_share: expected 0 <= min_share < 1, got {self.min_share}")
        if not 0 <= self.vanishing < 1:
            raise ValueError(f"vanishing: expected 0 <= vanishing < 1, got {self.vanishing}")
        self.reset()

    def reset(self) -> None:
        """Forget every baseline and episode (e.g. after loading a checkpoint)."""
        args = (self.window, self.warmup, self.min_history)
        self._state = {
            "grad": _Baselines(*args),
            "update": _Baselines(*args),
            "in_nonfinite": False,
            "spiking": {"grad": False, "update": False},
            "low": {},  # grad series -> consecutive low observations
            "vanished": {},  # grad series -> baseline when reported
            "act_seen": {},  # module -> scheduled forward observations
            "dead": set(),
        }

    def feed(self, record: StepRecord) -> list[Anomaly]:
        """The anomalies that ``record`` reveals, in the order found (often none).

        Example::

            new = diag.feed(StepRecord(step=3, scheduled=True, grad_norms={"_total": 1e9}))
        """
        if not isinstance(record, StepRecord):
            raise TypeError(f"record: expected a StepRecord, got {type(record).__name__}")
        found: list[Anomaly] = []
        if self.check_nonfinite:
            found += self._check_nonfinite(record)
        if self.check_warnings:
            found += self._check_dead(record)
        if _has_nonfinite(record):
            return found  # its norms are those of a broken step: no baseline, no spike
        grads = _items(record.grad_norms)
        if self.check_spikes:
            found += self._check_spikes(record.step, "grad", grads)
            found += self._check_spikes(record.step, "update", _update_sizes(record))
        else:
            self._observe("grad", grads)
        if self.check_warnings:
            found += self._check_vanishing(record.step, grads)
        return found

    # ------------------------------------------------------------------ non-finite values
    def _check_nonfinite(self, record: StepRecord) -> list[Anomaly]:
        bad_norms = [k for k, v in record.grad_norms.items() if not math.isfinite(v)]
        bad = _has_nonfinite(record)
        checked = bool(record.events) or bool(record.grad_norms)
        if not bad:
            if checked:
                self._state["in_nonfinite"] = False
            return []
        if self._state["in_nonfinite"]:
            return []
        self._state["in_nonfinite"] = True
        if any(e.nonfinite > 0 for e in record.events):
            return [self._attribute(record)]
        where = next((k for k in bad_norms if k != "_total"), bad_norms[0])
        value = record.grad_norms[where]
        return [
            Anomaly(
                record.step,
                "nonfinite",
                where,
                "grad norm",
                value,
                None,
                f"gradient norm of {where} is {value} (first non-finite value seen; no "
                "per-tensor counts on this step)",
                pass_="grad",
                module=owner_module(where) if where != "_total" else "",
            )
        ]

    def _attribute(self, record: StepRecord) -> Anomaly:
        """The first non-finite event, refined to the module that produced the value.

        A parameter gradient is reported as its module's backward when that module's
        ``grad_input`` is non-finite too (parameter hooks fire before the module's backward
        hook). A propagator (non-finite inputs) is replaced by its innermost enclosing module
        whose inputs were finite: the value was made inside it, outside any hooked child.
        """
        events = [e for e in record.events if e.nonfinite > 0]
        first = events[0]
        chosen = first
        if first.pass_ == "grad":
            owner = owner_module(first.module)
            chosen = next(
                (
                    e
                    for e in events
                    if e.pass_ == "backward" and e.module == owner and e.tensor == "grad_input"
                ),
                first,
            )
        producer = _producer(chosen, record.events)
        if producer is False:
            enclosing = next(
                (
                    e
                    for e in events
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
        module = owner_module(chosen.module) if chosen.pass_ == "grad" else chosen.module
        name = chosen.module or "<root>"
        origin = {
            True: "produced here: its inputs were finite",
            False: "propagated: its inputs were already non-finite",
            None: "inputs not measured",
        }[producer]
        msg = (
            f"{chosen.nonfinite} NaN/Inf in the {chosen.pass_} {chosen.tensor} of {name} ({origin})"
        )
        if chosen is not first:
            msg += f"; first non-finite hooked tensor: {first.pass_} {first.tensor} of "
            msg += first.module or "<root>"
        return Anomaly(
            record.step,
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

    # ------------------------------------------------------------------ spikes
    def _observe(self, family: str, items: tuple[list[str], np.ndarray]) -> tuple:
        base: _Baselines = self._state[family]
        names, values = items
        rows = base.rows(names)
        med = base.median(rows)
        base.push(rows, values)
        return names, values, med

    def _check_spikes(self, step: int, family: str, items) -> list[Anomaly]:
        names, values, med = self._observe(family, items)
        if not names:
            return []
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(med > 0, values / med, np.nan)
        hit = np.nan_to_num(ratio, nan=0.0) >= self.spike_factor
        total = names.index("_total") if "_total" in names else None
        if total is not None and med[total] > 0:
            # A parameter's spike that stays below min_share of the usual total is noise in
            # a small tensor (a LayerNorm bias early in training), not an explosion.
            small = values < self.min_share * med[total]
            small[total] = False
            hit &= ~small
        was = self._state["spiking"][family]
        has_baseline = bool(np.isfinite(ratio).any())
        if has_baseline:
            self._state["spiking"][family] = bool(hit.any())
        if not hit.any() or was:
            return []
        params = [i for i in range(len(names)) if i != total and np.isfinite(ratio[i])]
        params.sort(key=lambda i: -ratio[i])
        hits = [i for i in params if hit[i]]
        ranked = hits or [i for i in params if ratio[i] > 1]  # only the total: contributors
        top = tuple((names[i], float(ratio[i])) for i in ranked[: self.top_k])
        worst = hits[0] if hits else total
        what = "gradient norm" if family == "grad" else "update size ‖Δw‖"
        msg = f"{what} of {names[worst]} is {ratio[worst]:.3g}× its baseline"
        msg += f" ({fmt_number(values[worst])} vs median {fmt_number(med[worst])})"
        if total is not None and worst != total and np.isfinite(ratio[total]):
            msg += f"; total {ratio[total]:.3g}×"
        if top:
            msg += "; top: " + ", ".join(f"{n} {r:.3g}×" for n, r in top)
        where = names[worst]
        return [
            Anomaly(
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
        ]

    # ------------------------------------------------------------------ warnings
    def _check_vanishing(self, step: int, items) -> list[Anomaly]:
        names, values = items
        if not names:
            return []
        base: _Baselines = self._state["grad"]
        rows = base.rows(names)
        med = base.median(rows)  # already holds this step's value: a collapse must persist
        low, vanished, found = self._state["low"], self._state["vanished"], []
        for name, v, m in zip(names, values, med, strict=True):
            if name in vanished:
                if v > self.vanishing * vanished[name]:
                    del vanished[name]
                continue
            if not (m > 0 and v <= self.vanishing * m):
                low.pop(name, None)
                continue
            low[name] = low.get(name, 0) + 1
            if low[name] < self.patience:
                continue
            del low[name]
            vanished[name] = float(m)
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
                    f"{self.patience} observations",
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
        for module, e in this_step.items():
            n = seen.get(module, 0)
            seen[module] = n + 1
            if not _all_zero(e):
                dead.discard(module)
            elif n >= self.warmup and module not in dead:
                dead.add(module)
                count = int(e.stats[_COUNT])
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


def _has_nonfinite(record: StepRecord) -> bool:
    return any(e.nonfinite > 0 for e in record.events) or not all(
        math.isfinite(v) for v in record.grad_norms.values()
    )


def _all_zero(e: TensorEvent) -> bool:
    return bool(e.stats[_COUNT] > 0 and e.stats[_ZEROS] == e.stats[_COUNT])


def _producer(e: TensorEvent, events) -> bool | None:
    if e.inputs_nonfinite is not None:
        return e.inputs_nonfinite == 0
    if e.pass_ == "grad":  # a parameter gradient: what reached its module from above
        owner = owner_module(e.module)
        for o in events:
            if o.pass_ == "backward" and o.module == owner and o.tensor == "grad_output":
                return o.nonfinite == 0
    return None


def _items(mapping) -> tuple[list[str], np.ndarray]:
    names = list(mapping)
    return names, np.fromiter((float(mapping[k]) for k in names), np.float64, len(names))


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
