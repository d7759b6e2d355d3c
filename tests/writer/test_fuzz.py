"""Garbage into every add_* method: a clear ValueError/TypeError or a readable event, never
another exception, a hang, or a damaged file."""

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbprobe import SummaryWriter
from tbprobe.writer import read_events

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _filled(shape, fill, dtype):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.full(shape, fill).astype(dtype)


arrays = st.one_of(
    st.builds(
        _filled,
        st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple),
        floats,
        st.sampled_from(["float32", "float64", "float16", "uint8", "int64", "bool"]),
    ),
    st.builds(
        lambda shape, dtype: torch.zeros(shape, dtype=dtype),
        st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple),
        st.sampled_from([torch.float32, torch.bfloat16, torch.int32, torch.bool, torch.complex64]),
    ),
)
garbage = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    floats,
    st.text(max_size=20),
    st.binary(max_size=10),
    st.lists(floats, max_size=5),
    st.dictionaries(st.text(max_size=3), floats, max_size=2),
    arrays,
)
tags = st.one_of(st.text(max_size=30), st.text(min_size=4097, max_size=4200), garbage)

CALLS = {
    "add_scalar": lambda w, t, a, b: w.add_scalar(t, a, b),
    "add_scalars": lambda w, t, a, b: w.add_scalars(t, {"x": a}, b),
    "add_histogram": lambda w, t, a, b: w.add_histogram(t, a, 1, bins=b),
    "add_image": lambda w, t, a, b: w.add_image(t, a, 1, dataformats=b),
    "add_images": lambda w, t, a, b: w.add_images(t, a, 1, dataformats=b),
    "add_video": lambda w, t, a, b: w.add_video(t, a, 1, fps=b),
    "add_audio": lambda w, t, a, b: w.add_audio(t, a, 1, sample_rate=b),
    "add_text": lambda w, t, a, b: w.add_text(t, a, b),
    "add_tensor": lambda w, t, a, b: w.add_tensor(t, a, b),
    "add_pr_curve": lambda w, t, a, b: w.add_pr_curve(t, a, b, 1),
    "add_mesh": lambda w, t, a, b: w.add_mesh(t, a, faces=b),
    "add_histogram_raw": lambda w, t, a, b: w.add_histogram_raw(t, 0, 1, 1, 1, 1, a, b),
    "add_hparams": lambda w, t, a, b: w.add_hparams({"h": a}, {"m": b}, name=t),
    "add_embedding": lambda w, t, a, b: w.add_embedding(a, metadata=b, tag=t),
}


@pytest.mark.parametrize("method", sorted(CALLS))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tag=tags, a=garbage, b=garbage)
def test_garbage_in_clear_error_or_event(tmp_path_factory, method, tag, a, b):
    """Each call either raises ValueError/TypeError or writes events that read back cleanly."""
    d = str(tmp_path_factory.mktemp("fuzz"))
    with SummaryWriter(d) as w, contextlib.suppress(ValueError, TypeError):
        CALLS[method](w, tag, a, b)
    for ev in read_events(d, recursive=True, errors="raise"):
        assert math.isfinite(ev.wall_time)
