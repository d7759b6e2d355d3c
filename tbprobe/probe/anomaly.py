"""Anomaly records: what the diagnosis found, where and at which step, and their text forms.

An :class:`Anomaly` is plain host data. :func:`format_markdown` renders a list of them as the
markdown table written under the ``anomaly`` tag (TensorBoard's Text dashboard renders it), and
:func:`parse_markdown` reads such a table back (``tbprobe report`` uses it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

KINDS = ("nonfinite", "spike", "vanishing", "dead")
ERRORS = ("nonfinite", "spike")  # the rest are warnings
_COLUMNS = ("step", "kind", "where", "pass", "tensor", "value", "baseline", "message")


@dataclass(frozen=True)
class Anomaly:
    """One finding of the diagnosis.

    ``kind`` is one of ``KINDS``. ``where`` is the module name (forward/backward findings) or
    the parameter name (gradient and update findings; ``"_total"`` for the total gradient
    norm); ``module`` is always the module it belongs to. ``tensor`` says what was measured
    (``"output"``, ``"grad_input"``, ``"grad_output"``, ``"grad"``, ``"grad norm"``,
    ``"update"``); ``pass_`` is ``"forward"``, ``"backward"``, ``"grad"`` (the accumulated
    parameter gradient) or ``"update"`` (the optimizer step). ``value`` is the measured number
    (the non-finite element count, a norm) and ``baseline`` what it was compared with (None
    where nothing was). ``producer`` is True when the module's inputs were finite (it made the
    non-finite value), False when they were not (it passed it on), None when unknown. ``top``
    lists ``(name, ratio)`` of the worst offenders, highest ratio first.

    Example::

        a = Anomaly(12, "spike", "fc.weight", "grad norm", 40.0, 2.0, "20x its baseline")
        print(a)  # tbprobe: step 12: spike at fc.weight (grad norm): 20x its baseline
    """

    step: int
    kind: str
    where: str
    tensor: str
    value: float
    baseline: float | None
    message: str
    pass_: str | None = None
    module: str | None = None
    producer: bool | None = None
    top: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.module is None:
            object.__setattr__(self, "module", self.where)

    @property
    def severity(self) -> str:
        """``"error"`` for non-finite values and spikes, ``"warning"`` for the rest."""
        return "error" if self.kind in ERRORS else "warning"

    def __str__(self) -> str:
        return f"tbprobe: step {self.step}: {self.kind} at {self.where} ({self.tensor}): " + (
            self.message
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (non-finite floats become strings ``"nan"``, ``"inf"``)."""
        out = asdict(self)
        out["top"] = [[name, _json_float(r)] for name, r in self.top]
        out["value"] = _json_float(self.value)
        out["baseline"] = None if self.baseline is None else _json_float(self.baseline)
        out["severity"] = self.severity
        return out


def _json_float(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else str(x)


def fmt_number(x: float | None) -> str:
    """A short human form of a measured number: ``3``, ``0.0123``, ``4.56e+07``, ``nan``."""
    if x is None:
        return "—"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def format_markdown(anomalies) -> str:
    """A markdown table of ``anomalies`` (one row each), for the ``anomaly`` text event.

    Example::

        writer.add_text("anomaly", format_markdown(new), step)
    """
    rows = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for a in anomalies:
        if not isinstance(a, Anomaly):
            raise TypeError(f"anomalies: expected Anomaly records, got {type(a).__name__}")
        cells = (
            a.step,
            a.kind,
            f"`{a.where}`",
            a.pass_ or "",
            a.tensor,
            fmt_number(a.value),
            fmt_number(a.baseline),
            a.message,
        )
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def _split_row(line: str) -> list[str]:
    cells, cur, i = [], [], 0
    body = line.strip()[1:]  # drop the leading "|"
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            cur.append(body[i + 1])
            i += 2
            continue
        if ch == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    return cells


def parse_markdown(text: str) -> list[dict]:
    """The rows of tables written by :func:`format_markdown`, as dicts keyed by column name.

    Lines that are not rows of such a table are ignored, so damaged or foreign text yields
    fewer rows, never an exception. ``step`` is an int, ``value``/``baseline`` floats or None.

    Example::

        parse_markdown(format_markdown([a]))[0]["where"]  # "fc.weight"
    """
    rows, header = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = _split_row(line)
        if tuple(cells) == _COLUMNS:
            header = cells
            continue
        if header is None or set(line) <= set("|-: "):
            continue
        if len(cells) != len(header):
            continue
        row = dict(zip(header, cells, strict=True))
        try:
            row["step"] = int(row["step"])
        except ValueError:
            continue
        row["where"] = row["where"].strip("`")
        for key in ("value", "baseline"):
            try:
                row[key] = float(row[key])
            except ValueError:
                row[key] = None
        rows.append(row)
    return rows
