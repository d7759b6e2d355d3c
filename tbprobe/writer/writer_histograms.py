"""``add_histogram`` and ``add_histogram_raw``: a mixin of ``SummaryWriter``."""

from __future__ import annotations

import numbers

import numpy as np

from tbprobe.writer import values as _values
from tbprobe.writer.histogram import NUMPY_BIN_RULES, histogram_value, raw_histogram_value
from tbprobe.writer.naming import check_tag, clean_tag


class HistogramMixin:
    # ------------------------------------------------------------------ histograms
    def add_histogram(
        self,
        tag: str,
        values,
        global_step: int | None = None,
        bins="tensorflow",
        walltime: float | None = None,
        max_bins: int | None = None,
    ):
        """Histogram of ``values`` (any shape; numbers, arrays or tensors on any device).

        ``bins``: ``"tensorflow"`` (TensorBoard's default exponential bins), a numpy rule
        (``"auto"``, ``"fd"``, ...), an int, or the edges. NaN and ±Inf are counted apart and
        reported in the summary description; they never raise or poison min/max/sum.

        Examples::

            writer.add_histogram("weights/fc1", model.fc1.weight, step)
        """
        if self._skip(global_step):
            return
        tag = clean_tag(tag)
        step, wall = self._step_wall(global_step, walltime)
        if max_bins is not None:
            try:
                max_bins = _values.check_int(max_bins, "max_bins", 1)
            except TypeError:  # max_bins has always raised ValueError
                raise ValueError(
                    f"max_bins: expected a positive int or None, got {max_bins!r}"
                ) from None
        if isinstance(bins, numbers.Integral) and not isinstance(bins, (bool, np.bool_)):
            bins = int(bins)
        from tbprobe import kernels

        if isinstance(bins, str) and bins in NUMPY_BIN_RULES:
            self._histogram_numpy_rule(tag, values, bins, max_bins, step, wall)
            return
        if _values.is_device_tensor(values):
            if values.numel() == 0:
                raise ValueError("values: the histogram input is empty")
            h = kernels.histogram(values, bins)

            def build(counts, edges, stats):
                return [histogram_value(tag, counts, edges, stats, max_bins)]

            self._emit_deferred([h.counts, h.edges, h.stats], build, step, wall)
            return
        arr = _host_values(values)
        h = kernels.histogram(arr, bins)
        value = histogram_value(tag, h.counts.numpy(), h.edges.numpy(), h.stats.numpy(), max_bins)
        self._emit([value], step, wall)

    def _histogram_numpy_rule(self, tag, values, rule, max_bins, step, wall):
        from tbprobe import kernels

        def build(arr):
            flat = np.asarray(arr).reshape(-1)
            finite = flat[np.isfinite(flat)]
            edges = np.histogram_bin_edges(finite.astype(np.float64), bins=rule)
            h = kernels.histogram(flat, edges)
            return [
                histogram_value(tag, h.counts.numpy(), h.edges.numpy(), h.stats.numpy(), max_bins)
            ]

        if _values.is_device_tensor(values):
            if values.numel() == 0:
                raise ValueError("values: the histogram input is empty")
            t = _values.widen_tensor(values, "values").reshape(-1)
            self._emit_deferred([t], build, step, wall)
        else:
            self._emit(build(_host_values(values)), step, wall)

    def add_histogram_raw(
        self,
        tag: str,
        min,  # noqa: A002 - tensorboardX's argument names
        max,  # noqa: A002
        num,
        sum,  # noqa: A002
        sum_squares,
        bucket_limits,
        bucket_counts,
        global_step: int | None = None,
        walltime: float | None = None,
    ):
        """A histogram from precomputed buckets (right edges ``bucket_limits``)."""
        if self._skip(global_step):
            return
        step, wall = self._step_wall(global_step, walltime)
        value = raw_histogram_value(  # the tag as given: tensorboardX does not clean it here
            check_tag(tag), min, max, num, sum, sum_squares, bucket_limits, bucket_counts
        )
        self._emit([value], step, wall)


def _host_values(values) -> np.ndarray:
    arr = _values.to_numpy(values, "values")
    if arr.size == 0:
        raise ValueError("values: the histogram input is empty")
    return arr
