"""The worker side of bench_writer.py: one (writer, case) run inside a fresh interpreter.

bench_writer.py starts itself with ``--worker LIB CASE SIZE CALLS`` for every run, and that
calls ``worker_main`` here: it builds the writer (tbprobe, tensorboardX or
torch.utils.tensorboard) in a temporary log directory, times the case, reads every event back
with tbprobe's reader and prints one ``RESULT {json}`` line for the driver. The writer
libraries and torch are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

IMAGE_SHAPE = (3, 512, 512)  # (C, H, W)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _writer_class(lib: str):
    if lib == "tbprobe":
        from tbprobe import SummaryWriter
    elif lib == "tensorboardX":
        from tensorboardX import SummaryWriter
    else:
        from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


def _read_back(logdir: str):
    """Every event under ``logdir``, read by tbprobe's reader (independent of the writers);
    a damaged or truncated file raises."""
    from tbprobe.writer import read_events

    return list(read_events(logdir, recursive=True, errors="raise"))


def _values_of(events, tag: str):
    return [(e.step, v) for e in events for v in e.summary.value if v.tag == tag]


def run_scalar(lib: str, logdir: str, n: int) -> dict:
    import random

    rng = random.Random(0)
    values = [rng.random() for _ in range(n)]  # Python floats, as a loss.item() would give
    writer = _writer_class(lib)(logdir)
    add = writer.add_scalar
    t0 = time.perf_counter()
    for step in range(n):
        add("bench/loss", values[step], step)
    t1 = time.perf_counter()
    writer.close()
    t2 = time.perf_counter()

    got = _values_of(_read_back(logdir), "bench/loss")
    steps_ok = sorted(s for s, _ in got) == list(range(n))
    # simple_value is a float32: compare at float32 precision
    values_ok = steps_ok and all(abs(v.simple_value - values[s]) <= 1e-6 for s, v in got)
    return {
        "events": n,
        "read_back": len(got),
        "intact": steps_ok and values_ok and len(got) == n,
        "calls_s": t1 - t0,
        "total_s": t2 - t0,
        "events_per_s": n / (t2 - t0),
        "us_per_call": (t1 - t0) / n * 1e6,
    }


def _timed_calls(lib: str, logdir: str, calls: int, add) -> dict:
    """``calls`` + 1 rounds of: new writer (untimed), ``add(writer, step)``, ``close()``."""
    cls = _writer_class(lib)
    total, caller = [], []
    for step in range(calls + 1):
        writer = cls(os.path.join(logdir, f"call{step:02d}"))
        t0 = time.perf_counter()
        add(writer, step)
        t1 = time.perf_counter()
        writer.close()
        t2 = time.perf_counter()
        if step > 0:  # step 0 is the warm-up
            total.append(t2 - t0)
            caller.append(t1 - t0)
    return {"calls": calls, "samples_s": total, "caller_samples_s": caller}


def run_histogram(lib: str, logdir: str, numel: int, calls: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen, dtype=torch.float32)  # (M,)
    result = _timed_calls(lib, logdir, calls, lambda w, s: w.add_histogram("bench/hist", x, s))

    got = _values_of(_read_back(logdir), "bench/hist")
    result["events"] = calls + 1
    result["read_back"] = len(got)
    result["intact"] = len(got) == calls + 1 and all(
        v.HasField("histo") and int(v.histo.num) == numel for _, v in got
    )
    return result


def run_image(lib: str, logdir: str, calls: int) -> dict:
    import torch

    if lib == "tbprobe":
        # tbprobe's add_image is new; report "not available" rather than crash if it is not
        # importable or not wired up yet.
        try:
            from tbprobe.writer import image  # noqa: F401
        except ImportError as e:
            return {"status": "not available", "reason": f"{type(e).__name__}: {e}"}

    gen = torch.Generator().manual_seed(0)
    img = torch.rand(IMAGE_SHAPE, generator=gen, dtype=torch.float32)  # (3, 512, 512)
    try:
        result = _timed_calls(lib, logdir, calls, lambda w, s: w.add_image("bench/img", img, s))
    except (ImportError, AttributeError, NotImplementedError) as e:
        if lib != "tbprobe":
            raise
        return {"status": "not available", "reason": f"{type(e).__name__}: {e}"}

    got = _values_of(_read_back(logdir), "bench/img")
    _, h, w = IMAGE_SHAPE
    result["events"] = calls + 1
    result["read_back"] = len(got)
    result["intact"] = len(got) == calls + 1 and all(
        v.HasField("image")
        and (v.image.height, v.image.width) == (h, w)
        and v.image.encoded_image_string.startswith(PNG_SIGNATURE)
        for _, v in got
    )
    return result


def worker_main(lib: str, case: str, size: int, calls: int) -> None:
    """Run ``case`` on ``lib``'s writer in a temporary log directory; print the result line."""
    logdir = tempfile.mkdtemp(prefix=f"bench_{lib}_{case}_")
    try:
        if case == "scalar":
            result = run_scalar(lib, logdir, size)
        elif case == "histogram":
            result = run_histogram(lib, logdir, size, calls)
        else:
            result = run_image(lib, logdir, calls)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    if "status" not in result:
        result["status"] = "ok" if result["intact"] else "lost"
    print("RESULT " + json.dumps(result), flush=True)
