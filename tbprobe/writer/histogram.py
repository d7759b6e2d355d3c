"""Histogram summaries with tensorboardX's bins and trimming, NaN/Inf counted apart."""

from __future__ import annotations

import numpy as np

from tbprobe.writer.proto import summary_pb2
from tbprobe.writer.values import to_float, to_numpy

NUMPY_BIN_RULES = ("auto", "fd", "doane", "scott", "stone", "rice", "sturges", "sqrt")


def subsample(counts: np.ndarray, edges: np.ndarray, max_bins: int | None):
    """Merge adjacent bins so there are at most ``max_bins`` (tensorboardX's rule)."""
    n = len(counts)
    if max_bins is None or n <= max_bins:
        return counts, edges
    step = n // max_bins
    rem = n % step
    if rem:
        counts = np.pad(counts, (0, step - rem))
    counts = counts.reshape(-1, step).sum(axis=-1)
    new_edges = np.empty(len(counts) + 1, dtype=edges.dtype)
    new_edges[:-1] = edges[:-1:step]
    new_edges[-1] = edges[-1]
    return counts, new_edges


def trim(counts: np.ndarray, edges: np.ndarray):
    """Keep the occupied range plus one empty bin on its left; return (limits, counts).

    TensorBoard stores right edges only (``bucket_limit``), so the empty bin keeps the left
    edge of the first occupied bin.
    """
    nonzero = np.flatnonzero(counts)
    if len(nonzero) == 0:
        return np.array([0.0]), np.array([0.0])
    start, end = int(nonzero[0]), int(nonzero[-1]) + 1
    kept = counts[start - 1 : end] if start > 0 else np.concatenate(([0], counts[:end]))
    return edges[start : end + 1], kept


def histogram_value(
    tag: str, counts, edges, stats, max_bins: int | None = None
) -> summary_pb2.Summary.Value:
    """A ``histo`` value from counts, edges and a ``STAT_NAMES`` row (host arrays)."""
    counts = np.asarray(counts, dtype=np.int64)
    edges = np.asarray(edges, dtype=np.float64)
    count, total, total_sq, lo, hi, _abs_max, nan, pinf, ninf, _zeros = (float(v) for v in stats)
    if count == 0:
        lo = hi = 0.0
    counts, edges = subsample(counts, edges, max_bins)
    limits, kept = trim(counts, edges)
    value = summary_pb2.Summary.Value(tag=tag)
    h = value.histo
    h.min, h.max, h.num, h.sum, h.sum_squares = lo, hi, count, total, total_sq
    h.bucket_limit.extend(limits.tolist())
    h.bucket.extend(kept.astype(np.float64).tolist())
    if nan or pinf or ninf:
        value.metadata.summary_description = (
            f"non-finite values not in the histogram: nan={int(nan)}, +inf={int(pinf)}, "
            f"-inf={int(ninf)}"
        )
    return value


def raw_histogram_value(
    tag,
    min,
    max,
    num,
    sum,
    sum_squares,
    bucket_limits,
    bucket_counts,  # noqa: A002
) -> summary_pb2.Summary.Value:
    """``add_histogram_raw``: the caller's buckets, checked for matching lengths."""
    limits = to_numpy(bucket_limits, "bucket_limits").astype(np.float64).reshape(-1)
    counts = to_numpy(bucket_counts, "bucket_counts").astype(np.float64).reshape(-1)
    if len(limits) != len(counts):
        raise ValueError(
            f"bucket_limits and bucket_counts: lengths differ ({len(limits)} != {len(counts)})"
        )
    if len(limits) == 0:
        raise ValueError("bucket_limits: expected at least one bucket")
    value = summary_pb2.Summary.Value(tag=tag)
    h = value.histo
    h.min, h.max, h.num = to_float(min, "min"), to_float(max, "max"), to_float(num, "num")
    h.sum, h.sum_squares = to_float(sum, "sum"), to_float(sum_squares, "sum_squares")
    h.bucket_limit.extend(limits.tolist())
    h.bucket.extend(counts.tolist())
    return value
