"""Host side of a landed step: the :class:`StepRecord` for the diagnosis and the tags written.

Runs in ``Probe.step()`` on arrays already copied to the host, so nothing here touches a
device tensor. Tag names follow DESIGN.md's table.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from tbprobe.probe.records import StepRecord, TensorEvent
from tbprobe.probe.snapshot import image_for_tensorboard

COUNT, SUM_SQ, MIN, MAX, ABS_MAX, NAN, POS_INF, NEG_INF = 0, 2, 3, 4, 5, 6, 7, 8


@dataclass
class StepMeta:
    """Host-side description of what a packed step holds, in packing order."""

    step: int
    scheduled: bool
    full: bool
    events: list = field(default_factory=list)  # (seq, module, pass_, tensor)
    order: list = field(default_factory=list)  # the row id of each packed row
    n_rows: int = 0  # row ids handed out
    event_rows: list = field(default_factory=list)  # row ids merged into each event
    event_inputs: list = field(default_factory=list)  # row ids of its inputs, or None
    event_calls: list = field(default_factory=list)  # ``collect.Event.calls`` (or empty)
    grads: list = field(default_factory=list)  # (seq, param name)
    params: list = field(default_factory=list)  # param names
    updates: list = field(default_factory=list)  # param names with a pre-step copy
    lrs: dict = field(default_factory=dict)  # {param name: its group's learning rate}
    volume: int = 0  # StepState.volume
    param_faults: tuple = ()  # StepState.param_faults
    lr_groups: tuple = ()  # ((lr, param names), ...) per optimizer group: pack.lr_groups
    hists: list = field(default_factory=list)  # tags
    ghists: list = field(default_factory=list)  # tags binned over all ranks, fixed edges
    thumbs: list = field(default_factory=list)  # (module, shape, kind)
    snap_modules: frozenset = frozenset()
    on_landed: object = None  # distributed: called with the landed data (dist_events.landed)


def norm_of(row: np.ndarray) -> float:
    """L2 norm from a stats row: NaN if any NaN, inf if any ±inf, else sqrt(sum of squares)."""
    bad = _nonfinite_value(row)
    return math.sqrt(row[SUM_SQ]) if bad is None else bad


def _nonfinite_value(row: np.ndarray) -> float | None:
    """NaN for a row with a NaN, inf for one with ±inf (the tensor's RMS or largest
    magnitude is that, as its norm is), else None: a chart shows the non-finite value."""
    if row[NAN] > 0:
        return math.nan
    if row[POS_INF] + row[NEG_INF] > 0:
        return math.inf
    return None


def _rms(row: np.ndarray) -> float:
    bad = _nonfinite_value(row)
    if bad is not None:
        return bad
    return math.sqrt(row[SUM_SQ] / row[COUNT]) if row[COUNT] > 0 else math.nan


def _absmax(row: np.ndarray) -> float:
    bad = _nonfinite_value(row)
    if bad is not None:
        return bad
    return float(row[ABS_MAX]) if row[COUNT] > 0 else math.nan


def _segments(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat row ids and the start of each (non-empty) list, for ``ufunc.reduceat``."""
    lens = np.fromiter((len(g) for g in ids), np.int64, len(ids))
    starts = np.zeros(len(ids), np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    flat = np.fromiter((r for g in ids for r in g), np.int64, int(lens.sum()))
    return flat, starts


def merge_events(meta: StepMeta, data: dict) -> None:
    """``data["ev"]``: each event's rows merged (counts and sums add, minima and maxima
    combine), ``(E, 10)`` or ``(E,)`` counts; ``data["evin"]``: its inputs' non-finite
    count, NaN where unknown."""
    packed = data["rows"]
    by_id = np.zeros((meta.n_rows, *packed.shape[1:]))  # a row lost to a failure: zeros
    by_id[np.asarray(meta.order, np.int64)] = packed
    flat, starts = _segments(meta.event_rows)
    rows = by_id[flat]
    ev = np.add.reduceat(rows, starts, axis=0)
    if meta.full:
        ev[:, MIN] = np.minimum.reduceat(rows[:, MIN], starts)
        ev[:, MAX : ABS_MAX + 1] = np.maximum.reduceat(rows[:, MAX : ABS_MAX + 1], starts, axis=0)
    data["ev"] = ev
    nf = by_id[:, NAN : NEG_INF + 1].sum(1) if meta.full else by_id
    evin = np.full(len(meta.events), np.nan)
    known = [i for i, g in enumerate(meta.event_inputs) if g is not None]
    some = [i for i in known if meta.event_inputs[i]]
    evin[known] = 0.0
    if some:
        flat, starts = _segments([meta.event_inputs[i] for i in some])
        evin[some] = np.add.reduceat(nf[flat], starts)
    data["evin"] = evin
    data["evseq"] = _first_bad_calls(meta, nf, evin)


def _first_bad_calls(meta: StepMeta, nf: np.ndarray, evin: np.ndarray) -> dict:
    """``{event index: seq}`` of the first non-finite call of each event whose module ran
    more than once in the step; that call's inputs' count replaces the event's in ``evin``
    (the module made the value there, or passed on what another made before it)."""
    out: dict = {}
    for i, calls in enumerate(meta.event_calls):
        if calls is None:
            continue
        rows, ins = meta.event_rows[i], meta.event_inputs[i]
        for k, (seq, r0, i0) in enumerate(calls):
            last = k + 1 == len(calls)
            r1 = len(rows) if last else calls[k + 1][1]
            if not nf[rows[r0:r1]].any():
                continue
            out[i] = seq
            if ins is not None:
                i1 = len(ins) if last else calls[k + 1][2]
                evin[i] = nf[ins[i0:i1]].sum()
            break
    return out


def norms_of(rows: np.ndarray) -> np.ndarray:
    """:func:`norm_of` of every row of ``rows`` ``(n, 10)``, vectorised."""
    bad_nan = rows[:, NAN] > 0
    bad_inf = (rows[:, POS_INF] + rows[:, NEG_INF]) > 0
    out = np.sqrt(rows[:, SUM_SQ])
    out[bad_inf] = math.inf
    out[bad_nan] = math.nan
    return out


def _clean_check(meta: StepMeta, data: dict) -> bool:
    """A checked (not scheduled) step of counts only where nothing is non-finite: its events
    would say nothing, so the record skips them (the common step, kept cheap)."""
    if meta.scheduled or meta.full or not meta.grads:
        return False
    rows = data.get("rows")
    if rows is not None and rows.size and rows.max() > 0:
        return False
    return not data["grad"][:, NAN : NEG_INF + 1].any()


def is_broken(data: dict) -> bool:
    """True for a distributed step that some rank failed to pack: its global values are
    incomplete (:mod:`tbprobe.probe.dist_pack`), so it is neither written nor diagnosed."""
    flag = data.get("broken")
    return flag is not None and bool(flag.reshape(-1)[0] > 0)


def build_record(meta: StepMeta, data: dict) -> StepRecord:
    """The :class:`StepRecord` of a decoded step (an empty one for a broken step)."""
    if is_broken(data):
        warnings.warn(
            "tbprobe: a rank failed to pack its partial statistics; the global values of the "
            "steps it failed are not written (that rank's probe.errors has the exception)",
            RuntimeWarning,
            stacklevel=2,
        )
        return StepRecord(step=meta.step, scheduled=meta.scheduled)
    if meta.on_landed is not None:  # dist_events.landed: drop the events no rank fired
        meta.on_landed(data)
    stats_on = meta.scheduled
    events = []
    clean = _clean_check(meta, data)
    if meta.events and not clean:
        merge_events(meta, data)
        ev, evin, evseq = data["ev"], data["evin"], data["evseq"]
        nonfinite = (
            ev[:, NAN : NEG_INF + 1].sum(1) if meta.full else ev
        ).tolist()  # sync-ok: numpy
        keep = stats_on and meta.full  # rows of a fresh array: views, not copies
        for i, ((seq, module, pass_, tensor), nf_in) in enumerate(
            zip(meta.events, evin.tolist(), strict=True)  # sync-ok: numpy
        ):
            events.append(
                TensorEvent(
                    seq=evseq.get(i, seq),
                    module=module,
                    pass_=pass_,
                    tensor=tensor,
                    nonfinite=int(nonfinite[i]),
                    inputs_nonfinite=None if nf_in != nf_in else int(nf_in),
                    stats=ev[i] if keep else None,
                )
            )
    grad_norms, param_norms, ratios = {}, {}, {}
    if meta.grads:
        rows = data["grad"]
        names = [name for _, name in meta.grads]
        grad_norms = dict(zip(names, norms_of(rows).tolist(), strict=True))  # sync-ok: numpy
        grad_norms["_total"] = norm_of(rows.sum(0))
        if not clean:
            nf = (rows[:, NAN] + rows[:, POS_INF] + rows[:, NEG_INF]).tolist()  # sync-ok: numpy
            for i, (seq, name) in enumerate(meta.grads):
                events.append(
                    TensorEvent(
                        seq=seq,
                        module=name,
                        pass_="grad",
                        tensor="grad",
                        nonfinite=int(nf[i]),
                        stats=rows[i] if stats_on else None,
                    )
                )
    if meta.params:
        norms = norms_of(data["param"]).tolist()  # sync-ok: numpy
        param_norms = dict(zip(meta.params, norms, strict=True))
    if meta.updates:
        upd = norms_of(data["upd"])
        for name, u in zip(meta.updates, upd.tolist(), strict=True):  # sync-ok: numpy
            w = param_norms.get(name, math.nan)
            # No update (a zero learning rate in a warm-up) is a ratio of 0, also for a
            # parameter still at 0 (a zero-initialised bias): 0/0 is no non-finite value.
            ratios[name] = u / w if w > 0 else (0.0 if u == 0 else math.nan)
    events.sort(key=lambda e: e.seq)
    skip = data.get("skip")
    scale = data.get("scale")
    scale = float(scale.reshape(-1)[0]) if scale is not None else None
    ranks = data.get("ranks")
    if ranks is not None:
        r = ranks.reshape(-1).tolist()  # sync-ok: numpy
        ranks = (int(r[0]), int(r[3]), int(r[4]), int(r[1])) if r[0] > 0 else None
    return StepRecord(
        step=meta.step,
        scheduled=meta.scheduled,
        skipped=skip is not None and bool(skip.reshape(-1)[0] > 0),
        events=tuple(events),
        grad_norms=grad_norms,
        param_norms=param_norms,
        update_ratios=ratios,
        lrs=meta.lrs,
        volume=meta.volume,
        ranks=ranks,
        lr_groups=meta.lr_groups,
        loss_scale=scale,
        param_faults=meta.param_faults,
    )


@contextlib.contextmanager
def at_step(writer, step: int):
    """The ``global_step`` to pass so that ``step`` is written even when it is not a multiple
    of the writer's ``log_freq`` (the probe chose to write it)."""
    lf = getattr(writer, "log_freq", 1)
    if isinstance(lf, int) and lf > 1 and step % lf and hasattr(writer, "use_metadata"):
        with writer.use_metadata(global_step=step):
            yield None
    else:
        yield step


def write_step(writer, meta: StepMeta, data: dict, record: StepRecord, cfg) -> None:
    """Write the tags of a decoded step with host values (nothing for a broken step)."""
    if is_broken(data):
        return
    track = cfg.track
    with at_step(writer, meta.step) as gs:
        tags, values = [], []
        if meta.scheduled and "grads" in track:
            _scalars(tags, values, "grad_norm/", record.grad_norms)
        if meta.scheduled and "params" in track:
            _scalars(tags, values, "param_norm/", record.param_norms)
            _scalars(tags, values, "update_ratio/", record.update_ratios)
        if meta.events and meta.full and (meta.scheduled or meta.snap_modules):
            _module_scalars(tags, values, meta, data["ev"], track)
        batch = getattr(writer, "_add_scalar_batch", None)
        if batch is not None:  # tbprobe's writer: the step's scalars in one event
            batch(tags, values, gs)
        else:
            for tag, v in zip(tags, values, strict=True):
                writer.add_scalar(tag, v, gs)
        for i, tag in enumerate(meta.hists):
            _write_hist(writer, tag, data["hcounts"][i], data["hedges"][i], data["hstats"][i], gs)
        for i, tag in enumerate(meta.ghists):
            _write_global_hist(writer, tag, data["gcounts"][i], data["gstats"][i], gs)
        for i, (module, shape, kind) in enumerate(meta.thumbs):
            img, fmt = image_for_tensorboard(data[("t", i)], shape, kind, module, cfg)
            writer.add_image(f"snapshot/{module}", img, gs, dataformats=fmt)


def _scalars(tags: list, values: list, prefix: str, mapping) -> None:
    tags.extend(prefix + name for name in mapping)
    values.extend(mapping.values())


def _module_scalars(tags: list, values: list, meta: StepMeta, rows, track) -> None:
    for (_, module, pass_, tensor), row in zip(meta.events, rows, strict=True):
        if not meta.scheduled and module not in meta.snap_modules:
            continue
        if pass_ == "forward" and ("acts" in track or module in meta.snap_modules):
            tags += (f"act_rms/{module}", f"act_absmax/{module}")
            values += (_rms(row), _absmax(row))
        elif tensor == "grad_output" and "outgrads" in track and meta.scheduled:
            tags.append(f"outgrad_rms/{module}")
            values.append(_rms(row))


def _write_hist(writer, tag: str, counts, edges, stats, gs) -> None:
    """``counts`` ``(n,)``, ``edges`` ``(n + 1,)`` and the stats row ``(10,)``."""
    _add_raw(writer, tag, stats, edges[1:], counts, gs)


def _add_raw(writer, tag: str, stats, limits, counts, gs) -> None:
    """``add_histogram_raw`` of bucket ``limits``/``counts`` (host arrays) with min, max,
    num, sum and sum of squares from the stats row; nothing when no value is finite."""
    if stats[COUNT] <= 0:  # nothing finite to draw
        return
    writer.add_histogram_raw(
        tag,
        min=float(stats[MIN]),
        max=float(stats[MAX]),
        num=int(stats[COUNT]),
        sum=float(stats[1]),
        sum_squares=float(stats[SUM_SQ]),
        bucket_limits=limits.tolist(),  # sync-ok: host (numpy) arrays
        bucket_counts=counts.tolist(),  # sync-ok: host (numpy) arrays
        global_step=gs,
    )


def _write_global_hist(writer, tag: str, counts, stats, gs) -> None:
    """A histogram summed over the ranks on the fixed :data:`~tbprobe.probe.dist_slots.
    GLOBAL_BINS` edges, trimmed as the writer trims ``add_histogram``'s (the occupied bins and
    one empty bin before them); min, max, num, sum and sum of squares from the merged stats."""
    from tbprobe.probe.dist_slots import global_edges
    from tbprobe.writer.histogram import trim

    if stats[COUNT] <= 0:
        return
    limits, kept = trim(np.asarray(counts, np.int64), global_edges())
    _add_raw(writer, tag, stats, limits, kept, gs)
