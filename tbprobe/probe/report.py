"""``tbprobe report LOGDIR [--json]``: a diagnosis of a run from its event files alone.

It reads every event file of a run (or of every run under LOGDIR), also one still being
written or cut short by a kill (the damaged tail is reported as a note, the rest is used), and
finds: the first non-finite value (from the probe's ``anomaly`` texts and from non-finite
scalars), the gradient and update spikes with their top layers (recomputed from the
``grad_norm/``, ``param_norm/`` and ``update_ratio/`` series by the same :class:`Diagnosis` the
probe runs), and per-layer norm trends. No torch import: it runs anywhere the event files are.

A run resumed from a checkpoint with ``SummaryWriter(purge_step=N)`` writes a
``SessionLog.START`` at step N: what was read before it at steps >= N (the abandoned timeline,
scalars and anomaly texts alike) is dropped, as TensorBoard drops it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections import defaultdict

from tbprobe.probe.anomaly import fmt_number, parse_markdown
from tbprobe.probe.diagnosis import Diagnosis
from tbprobe.probe.records import StepRecord
from tbprobe.writer.proto import event_pb2
from tbprobe.writer.reader import (
    NOT_AN_EVENT,
    EventFileError,
    EventFileWarning,
    event_files,
    file_events,
)

__all__ = ["diagnose_logdir", "diagnose_run", "format_report", "run_report"]

TREND_PREFIXES = ("grad_norm", "param_norm", "update_ratio", "act_rms", "act_absmax", "outgrad_rms")
_ANOMALY_TAG = "anomaly/text_summary"
_TEXT_ROWS = 20  # rows per section in the text form; --json has them all


def _runs(logdir: str) -> dict[str, list[str]]:
    """{run name: its event files}; a run is a directory holding event files."""
    if os.path.isfile(logdir) and "tfevents" not in os.path.basename(logdir):
        raise ValueError("not an event file (its name has no 'tfevents')")
    files = event_files(logdir, recursive=True)
    runs: dict[str, list[str]] = defaultdict(list)
    # "" is the dirname of a bare file name: the current directory
    root = logdir if os.path.isdir(logdir) else os.path.dirname(logdir) or os.curdir
    for f in files:
        name = os.path.relpath(os.path.dirname(f) or os.curdir, root)
        runs["." if name == os.curdir else name].append(f)
    return dict(sorted(runs.items()))


def _scalar(value) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
        t = value.tensor
        vals = list(t.float_val) or list(t.double_val)
        return float(vals[0]) if len(vals) == 1 else None
    return None


def _read_run(files: list[str]):
    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    texts: list[tuple[int, list[dict]]] = []  # (event step, its rows) of each anomaly text
    notes, n_events = [], 0
    for path in files:  # in name order, i.e. creation time, as TensorBoard reads them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EventFileWarning)
            try:
                events = file_events(path, errors="warn")
            except OSError as e:  # e.g. a dangling symlink: the other files still count
                notes.append(f"{path}: skipped, cannot be read ({e.strerror or e})")
                continue
            for event in events:
                n_events += 1
                if _is_restart(event):
                    note = _purge(scalars, texts, int(event.step), path)
                    if note:
                        notes.append(note)
                for v in event.summary.value:
                    if v.tag == _ANOMALY_TAG and v.WhichOneof("value") == "tensor":
                        rows = []
                        for raw in v.tensor.string_val:
                            rows += parse_markdown(raw.decode("utf-8", errors="replace"))
                        texts.append((int(event.step), rows))
                        continue
                    x = _scalar(v)
                    if x is not None:
                        scalars[v.tag][int(event.step)] = x  # a later file wins a step
        for w in caught:
            if isinstance(w.message, EventFileWarning):
                notes.append(_damage_note(w.message.error))
            else:  # not ours: pass it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    anomalies = [a for _, rows in texts for a in rows]
    return scalars, anomalies, notes, n_events


def _is_restart(event) -> bool:
    """A ``SessionLog.START``: what ``SummaryWriter(purge_step=N)`` writes at step N."""
    return event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START


def _purge(scalars, texts, step: int, path: str) -> str | None:
    """Drop what was read at steps >= ``step`` (the abandoned timeline), as TensorBoard does at a
    ``SessionLog.START``: every tag, texts included. The note saying so, or None when nothing
    was dropped (the START that opens a run's first file)."""
    n_scalars = 0
    for tag in list(scalars):
        series = scalars[tag]
        late = [s for s in series if s >= step]
        for s in late:
            del series[s]
        n_scalars += len(late)
        if not series:
            del scalars[tag]
    n_texts = sum(1 for s, _ in texts if s >= step)
    texts[:] = [(s, rows) for s, rows in texts if s < step]
    if not n_scalars and not n_texts:
        return None
    return (
        f"{path}: purge_step {step} (a restart from a checkpoint): {n_scalars} scalar values "
        f"and {n_texts} anomaly text(s) at steps >= {step} read before it are dropped, "
        "as TensorBoard drops them"
    )


def _damage_note(err: EventFileError) -> str:
    if err.reason == NOT_AN_EVENT:
        return f"{err} (skipped; the records after it are read)"
    if err.reason.startswith("truncated"):
        return f"{err} (read up to there: a run still being written, or killed)"
    if err.data_after:  # reading a file stops at a CRC failure: its length may be garbage
        return f"{err} (damage inside the file: read up to there, the rest of it is skipped)"
    return f"{err} (the last record is damaged: read up to there)"


def _records(scalars) -> list[StepRecord]:
    """The steps' records from their scalars. A step whose gradient norms are not finite
    while every parameter norm (measured after the optimizer step) is counts as skipped:
    the optimizer did not apply those gradients, as an AMP GradScaler does on its normal
    overflow steps (which the probe, told so by the scaler, does not report either)."""
    maps = {"grad_norm": {}, "param_norm": {}, "update_ratio": {}}
    for tag, series in scalars.items():
        prefix, _, name = tag.partition("/")
        if prefix in maps and name:
            for step, x in series.items():
                maps[prefix].setdefault(step, {})[name] = x
    steps = sorted(set().union(*(m.keys() for m in maps.values())))
    out = []
    for s in steps:
        grads, params = maps["grad_norm"].get(s, {}), maps["param_norm"].get(s, {})
        skipped = (
            bool(params)
            and not all(math.isfinite(x) for x in grads.values())
            and all(math.isfinite(x) for x in params.values())
        )
        out.append(
            StepRecord(
                step=s,
                scheduled=True,
                skipped=skipped,
                grad_norms=grads,
                param_norms=params,
                update_ratios=maps["update_ratio"].get(s, {}),
            )
        )
    return out


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _trend(tag: str, series: dict[int, float]) -> dict:
    steps = sorted(series)
    finite = [(s, series[s]) for s in steps if math.isfinite(series[s])]
    out = {"tag": tag, "points": len(steps), "nonfinite": len(steps) - len(finite)}
    if finite:  # first/last are the finite ends, at their own steps
        (s0, v0), (s1, v1) = finite[0], finite[-1]
        smax, vmax = max(finite, key=lambda p: p[1])
        out.update(first=v0, first_step=s0, last=v1, last_step=s1)
        out.update(min=min(v for _, v in finite), max=vmax, max_step=smax)
        out["growth"] = _json_float(v1 / v0) if v0 != 0 else (1.0 if v1 == 0 else "inf")
    return out


def diagnose_run(files: list[str], diagnosis: Diagnosis | None = None) -> dict:
    """The diagnosis of one run from its event ``files`` (see :func:`diagnose_logdir`)."""
    scalars, logged, notes, n_events = _read_run(files)
    diag = diagnosis if diagnosis is not None else Diagnosis()
    found = [a for r in _records(scalars) for a in diag.feed(r)]
    first_logged = min(
        (a for a in logged if a.get("kind") == "nonfinite"), key=lambda a: a["step"], default=None
    )
    bad = [
        (s, tag, x) for tag, ser in scalars.items() for s, x in ser.items() if not math.isfinite(x)
    ]
    first_scalar = None
    if bad:
        step = min(s for s, _, _ in bad)
        tags = sorted((tag, x) for s, tag, x in bad if s == step)
        first_scalar = {"step": step, "tags": [{"tag": t, "value": str(x)} for t, x in tags]}
    trends = [
        _trend(tag, ser)
        for tag, ser in sorted(scalars.items())
        if tag.partition("/")[0] in TREND_PREFIXES and ser
    ]
    all_steps = [s for ser in scalars.values() for s in ser]
    return {
        "files": files,
        "events": n_events,
        "steps": [min(all_steps), max(all_steps)] if all_steps else None,
        "notes": notes,
        "first_nonfinite": {"anomaly": first_logged, "scalars": first_scalar},
        "logged_anomalies": sorted(logged, key=lambda a: a["step"]),
        "spikes": [a.to_dict() for a in found if a.kind == "spike"],
        "warnings": [a.to_dict() for a in found if a.kind in ("vanishing", "dead")],
        "nonfinite_norms": [a.to_dict() for a in found if a.kind == "nonfinite"],
        "trends": trends,
    }


def diagnose_logdir(path: str, diagnosis_kwargs: dict | None = None) -> dict:
    """The diagnosis of every run under ``path`` (a run directory, a directory of runs, or one
    event file), as a JSON-ready dict ``{"logdir": path, "runs": {name: diagnosis}}``.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` when it holds no event
    file or is a file whose name has no ``tfevents``. A file that cannot be read (a dangling
    symlink) or damaged records become the run's ``notes``.
    ``diagnosis_kwargs`` configure the :class:`Diagnosis` (e.g. ``spike_factor``).

    Example::

        report = diagnose_logdir("runs/exp")
        print(report["runs"]["."]["first_nonfinite"])
    """
    path = os.fspath(path)
    runs = _runs(path)
    if not runs:
        raise ValueError(f"logdir: no event files (*tfevents*) under {path!r}")
    kwargs = diagnosis_kwargs or {}
    return _json_safe(
        {
            "logdir": path,
            "runs": {
                name: diagnose_run(files, Diagnosis(**kwargs)) for name, files in runs.items()
            },
        }
    )


def _json_safe(x):
    if isinstance(x, float):
        return _json_float(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _row_text(a: dict) -> str:
    line = f"step {a['step']}: {a['kind']} at {a['where']}"
    pass_, tensor = a.get("pass") or a.get("pass_") or "", a.get("tensor") or ""
    # "grad" + "grad norm" reads "grad norm", "update" + "update" reads "update"
    what = tensor if tensor.startswith(pass_) else f"{pass_} {tensor}".strip()
    return line + (f" ({what})" if what else "") + f": {a['message']}"


def _section(title: str, items: list[str]) -> list[str]:
    lines = [f"  {title}:"]
    lines += [f"    {s}" for s in items[:_TEXT_ROWS]] or ["    none"]
    if len(items) > _TEXT_ROWS:
        lines.append(f"    … {len(items) - _TEXT_ROWS} more (see --json)")
    return lines


def format_report(report: dict) -> str:
    """The text form of :func:`diagnose_logdir`'s result."""
    lines = [f"tbprobe report: {report['logdir']}"]
    for name, run in report["runs"].items():
        span = "no scalars" if run["steps"] is None else "steps {}–{}".format(*run["steps"])
        lines.append(f"\nrun {name}: {len(run['files'])} file(s), {run['events']} events, {span}")
        lines += [f"  note: {n}" for n in run["notes"]]
        first = run["first_nonfinite"]
        items = []
        if first["anomaly"]:
            items.append("probe anomaly: " + _row_text(first["anomaly"]))
        if first["scalars"]:
            tags = first["scalars"]["tags"]
            shown = ", ".join(f"{t['tag']}={t['value']}" for t in tags[:5])
            more = f" (+{len(tags) - 5} more)" if len(tags) > 5 else ""
            items.append(f"scalars: step {first['scalars']['step']}: {shown}{more}")
        lines += _section("first non-finite value", items)
        lines += _section(
            "spikes (recomputed from the norms)", [_row_text(a) for a in run["spikes"]]
        )
        lines += _section(
            "non-finite norms (recomputed from the norms)",
            [_row_text(a) for a in run["nonfinite_norms"]],
        )
        lines += _section("warnings", [_row_text(a) for a in run["warnings"]])
        lines += _section(
            "anomalies logged by the probe", [_row_text(a) for a in run["logged_anomalies"]]
        )
        trends = sorted(run["trends"], key=_trend_order)
        rows = [
            f"{t['tag']}: "
            + (
                f"first {fmt_number(t['first'])} (step {t['first_step']}) → last "
                f"{fmt_number(t['last'])} (step {t['last_step']}), max {fmt_number(t['max'])} "
                f"at step {t['max_step']}, growth ×{fmt_number(float(t['growth']))}"
                if "first" in t
                else "no finite value"
            )
            + (f", {t['nonfinite']} non-finite" if t["nonfinite"] else "")
            for t in trends
        ]
        lines += _section("per-layer trends (largest change first)", rows)
    return "\n".join(lines)


def _trend_order(t: dict) -> tuple:
    g = float(t.get("growth", "nan"))
    change = abs(math.log(g)) if math.isfinite(g) and g > 0 else math.inf
    return (-t["nonfinite"], -change, t["tag"])


def run_report(args) -> int:
    """``tbprobe report LOGDIR [--json]``: print the diagnosis; 0 when produced (anomalies
    or not), 2 when LOGDIR is missing, holds no event file or is a file that is not one."""
    try:
        report = diagnose_logdir(args.logdir)
    except (OSError, ValueError) as e:
        print(f"tbprobe report: {args.logdir}: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(format_report(report))
    return 0
