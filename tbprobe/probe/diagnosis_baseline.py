"""Running baselines of named series (gradient norms, update sizes) for the diagnosis.

Pure host code on numpy: one ``(n, window)`` ring buffer holds the recent finite values of
every series, so the per-step work is a handful of vectorised operations whatever the number
of parameters.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Baselines"]


class Baselines:
    """Recent finite values of named series in one ``(n, window)`` ring buffer.

    ``seen`` counts finite observations per series; the first ``warmup`` of them never enter
    the buffer. :meth:`median` is NaN for a series with fewer than ``min_history`` stored
    values; :meth:`recent_max` is the largest of a span of the latest stored values.

    Example::

        base = Baselines(window=50, warmup=10, min_history=5)
        rows = base.rows(["fc.weight", "_total"])  # (2,) row indices
        med = base.median(rows)  # (2,) NaN until 5 values are stored
        base.push(rows, np.array([0.3, 0.5]))
    """

    def __init__(self, window: int, warmup: int, min_history: int):
        self.window, self.warmup, self.min_history = window, warmup, min_history
        self.index: dict[str, int] = {}
        self.buf = np.full((8, window), np.nan)
        self.seen = np.zeros(8, np.int64)
        self.pos = np.zeros(8, np.int64)
        self.stored = np.zeros(8, np.int64)
        self._last: tuple[list, np.ndarray] = ([], np.zeros(0, np.int64))

    def rows(self, names) -> np.ndarray:
        """The ``(len(names),)`` row indices of ``names``, adding rows for new series."""
        last_names, last_rows = self._last
        if names == last_names:  # the same series as last time (every step, usually)
            return last_rows
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
        rows = np.fromiter((self.index[k] for k in names), np.int64, len(names))
        self._last = (list(names), rows)
        return rows

    def median(self, rows: np.ndarray) -> np.ndarray:
        """The ``(len(rows),)`` medians of the stored values (NaN below ``min_history``)."""
        return self._median(np.sort(self.buf[rows], axis=1), self.stored[rows])

    def recent_max(self, rows: np.ndarray, skip: int, count: int) -> np.ndarray:
        """The ``(len(rows),)`` largest of the ``count`` stored values before the latest
        ``skip`` ones (NaN for a series that has none stored there).

        Example: with stored values ``1 2 9 3 4`` (oldest first), ``recent_max(r, 2, 2)`` is
        ``9``: the latest two (3, 4) are skipped, the two before them (2, 9) are compared.
        """
        return self._recent(self.buf[rows], self.pos[rows], self.stored[rows], skip, count)

    def observe(
        self, rows: np.ndarray, values: np.ndarray, skip: int, count: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(median(rows), recent_max(rows, skip, count), top)``, then ``push(rows, values)``:
        one gather of the rows for all three reads (the diagnosis does this every step).
        ``top``: the largest stored value of each series (NaN where none is)."""
        held, k = self.buf[rows], self.stored[rows]
        recent = self._recent(held, self.pos[rows], k, skip, count)
        srt = np.sort(held, axis=1)
        top = srt[np.arange(len(k)), np.maximum(k - 1, 0)]  # NaN where nothing is stored
        med = self._median(srt, k)
        self.push(rows, values)
        return med, recent, top

    def _median(self, srt: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Medians of rows sorted with their ``k`` stored values first (NaN, the unfilled
        slots, sorts last): two picks per row, ~20x cheaper than np.nanmedian, which goes
        through masked arrays on small inputs."""
        i = np.arange(len(k))
        lo, hi = np.maximum(k - 1, 0) // 2, np.minimum(k // 2, self.window - 1)
        out = 0.5 * (srt[i, lo] + srt[i, hi])
        out[k < max(self.min_history, 1)] = np.nan
        return out

    def _recent(self, held, pos, k, skip: int, count: int) -> np.ndarray:
        """:meth:`recent_max` of gathered rows ``held`` with their ring positions and counts."""
        if count + skip > self.window:
            raise ValueError(f"count: expected skip + count <= window ({self.window})")
        back = np.arange(skip, skip + count)  # (count,) how far back: 0 is the latest value
        cols = (pos[:, None] - 1 - back[None, :]) % self.window  # (n, count)
        vals = np.take_along_axis(held, cols, axis=1)
        out = np.where(back[None, :] < k[:, None], vals, -np.inf).max(axis=1, initial=-np.inf)
        return np.where(np.isneginf(out), np.nan, out)

    def push(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Append ``values`` ``(len(rows),)`` to their series; non-finite ones are dropped."""
        finite = np.isfinite(values)
        rows, values = rows[finite], values[finite]
        take = self.seen[rows] >= self.warmup
        self.seen[rows] += 1
        rows, values = rows[take], values[take]
        self.buf[rows, self.pos[rows]] = values
        self.pos[rows] = (self.pos[rows] + 1) % self.window
        self.stored[rows] = np.minimum(self.stored[rows] + 1, self.window)
