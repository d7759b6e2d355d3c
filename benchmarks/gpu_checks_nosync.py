"""The no-sync sections of ``gpu_checks``: ``nosync_kernels`` (every kernel entry point under
sync debug mode "error" and while the GPU is busy) and ``writer`` (``SummaryWriter``'s device
path under the same checks, then its event file against the host path's)."""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time

import numpy as np
import torch
from gpu_checks_common import EDGES, RTOL, Mode, Report, catalogue, sample

from tbprobe import kernels  # imports no Triton module: TRITON_INTERPRET may still be set


@contextlib.contextmanager
def sync_debug_error():
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def gpu_sleep_cycles(target_s=0.3) -> int:
    """Cycles of ``torch.cuda._sleep`` that keep the GPU busy for about ``target_s``, measured
    twice: the first run also lifts the clocks from idle."""
    cycles = 50_000_000
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize()
        cycles = int(cycles * target_s / max(time.perf_counter() - t0, 1e-4))
    return cycles


@contextlib.contextmanager
def returns_while_gpu_busy(cycles):
    """The block must return while a ~0.3 s GPU kernel queued before it still runs. This
    catches the implicit waits that sync debug mode does not see (cudaMalloc, cudaHostAlloc,
    copies from pageable memory, ...)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    yield
    took = time.perf_counter() - t0
    if torch.cuda.current_stream().query():  # the queue drained: the block waited for it
        raise AssertionError(
            f"waited for the GPU: the kernel queued before the call had finished when the call "
            f"returned, after {took * 1e3:.0f} ms"
        )


def nosync(rep, section, name, cycles):
    """One check: the block raises nothing under sync debug mode "error" and returns while the
    GPU is still busy. ``cycles`` None: sync debug mode only."""
    stack = contextlib.ExitStack()
    stack.enter_context(rep.check(section, name))
    if cycles:
        stack.enter_context(returns_while_gpu_busy(cycles))
    stack.enter_context(sync_debug_error())
    return stack


def check_nosync_kernels(mode: Mode, rep: Report) -> None:
    dev = mode.device
    xs = [sample((4113,), d, seed=i).to(dev) for i, d in enumerate(catalogue().DTYPES)]
    fmap = sample((2, 16, 33, 31), torch.bfloat16, seed=3).to(dev)
    seq = sample((2, 300, 257), torch.float16, seed=4).to(dev)
    calls = {
        f"tensor_stats({len(xs)} dtypes)": lambda: kernels.tensor_stats(xs),
        "histogram tensorflow": lambda: kernels.histogram(xs[0], "tensorflow"),
        "histogram 64": lambda: kernels.histogram(xs[3], 64),
        "histogram 7 range": lambda: kernels.histogram(xs[6], 7, (-1.5, 2.5)),
        "histogram edges": lambda: kernels.histogram(xs[1], EDGES),
        "histogram_many tensorflow": lambda: kernels.histogram_many(xs, "tensorflow"),
        "histogram_many 64": lambda: kernels.histogram_many(xs, 64),
        "thumbnail conv": lambda: kernels.thumbnail(fmap),
        "thumbnail sequence": lambda: kernels.thumbnail(seq),
    }
    for fn in calls.values():  # warm-up: compiles, tables, allocations
        fn()
    torch.cuda.synchronize()
    cycles = gpu_sleep_cycles()
    probe = torch.ones(1, device=dev)
    with rep.check("nosync_kernels", "harness: sync debug mode raises on .item()"):
        try:
            with sync_debug_error():
                probe.sum().item()
        except RuntimeError:
            pass
        else:
            raise AssertionError("sync debug mode 'error' did not raise on .item()")
    with rep.check("nosync_kernels", "harness: a wait for the GPU is caught"):
        try:
            with returns_while_gpu_busy(cycles):
                torch.cuda.current_stream().synchronize()
        except AssertionError:
            pass
        else:
            raise AssertionError("returns_while_gpu_busy did not catch a synchronize()")
    for name, fn in calls.items():
        with nosync(rep, "nosync_kernels", f"no sync: {name}", cycles):
            fn()
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- writer


def writer_inputs():
    """(method, tag, CPU tensor, kwargs) logged through SummaryWriter, every step."""
    g = torch.Generator().manual_seed(9)
    u8 = torch.uint8
    return [
        ("add_scalar", "s/fp32", torch.tensor(1.5), {}),
        ("add_scalar", "s/bf16", torch.tensor(3.3, dtype=torch.bfloat16), {}),
        ("add_scalar", "s/fp16_1elem", torch.tensor([-2.7], dtype=torch.float16), {}),
        ("add_scalar", "s/int64", torch.tensor(7), {}),
        ("add_scalar", "s/mean", torch.randn(1000, generator=g).mean(), {}),
        ("add_scalar", "s/nan", torch.tensor(math.nan), {}),
        ("add_histogram", "h/tf_fp32", sample((10007,), torch.float32, seed=1), {}),
        ("add_histogram", "h/tf_bf16", sample((64, 65), torch.bfloat16, seed=2), {}),
        ("add_histogram", "h/tf_int8", sample((999,), torch.int8, seed=3), {}),
        ("add_histogram", "h/64_fp32", sample((4113,), torch.float32, 4, "heavy"), {"bins": 64}),
        ("add_histogram", "h/30_fp16", sample((33, 17), torch.float16, seed=5), {"bins": 30}),
        ("add_histogram", "h/64_int64", sample((500,), torch.int64, seed=6), {"bins": 64}),
        ("add_image", "i/chw_fp32", torch.rand(3, 37, 53, generator=g), {}),
        (
            "add_image",
            "i/hw_u8",
            torch.randint(0, 256, (40, 31), generator=g, dtype=u8),
            {"dataformats": "HW"},
        ),
        (
            "add_image",
            "i/hwc_bf16",
            torch.rand(29, 41, 3, generator=g).bfloat16(),
            {"dataformats": "HWC"},
        ),
        ("add_images", "i/nchw_fp32", torch.rand(10, 3, 16, 12, generator=g), {}),
        (
            "add_images",
            "i/nhwc_u8",
            torch.randint(0, 256, (5, 9, 7, 1), generator=g, dtype=u8),
            {"dataformats": "NHWC"},
        ),
    ]


@contextlib.contextmanager
def forced_device_path():
    """Dry run only: CPU tensors take the writer's device path (reduce, defer, resolve on the
    writer thread), so CI runs the code that CUDA tensors run."""
    from tbprobe.writer import values

    real = values.is_device_tensor
    values.is_device_tensor = lambda v: values.is_tensor(v) and v.device.type != "meta"
    try:
        yield
    finally:
        values.is_device_tensor = real


def _read_values(logdir) -> dict:
    from tbprobe.writer.reader import read_events

    out = {}
    for ev in read_events(logdir, errors="raise"):
        for v in ev.summary.value:
            key = (v.tag, ev.step)
            assert key not in out, f"{key} written twice"
            out[key] = v
    return out


def _same_value(a, b) -> None:
    kind = a.WhichOneof("value")
    assert kind == b.WhichOneof("value"), f"{kind} vs {b.WhichOneof('value')}"
    if kind == "simple_value":
        same = a.simple_value == b.simple_value or (
            math.isnan(a.simple_value) and math.isnan(b.simple_value)
        )
        assert same, f"{a.simple_value!r} vs {b.simple_value!r}"
    elif kind == "histo":
        ha, hb = a.histo, b.histo
        for f in ("min", "max", "num"):
            assert getattr(ha, f) == getattr(hb, f), f"{f}: {getattr(ha, f)} vs {getattr(hb, f)}"
        assert list(ha.bucket_limit) == list(hb.bucket_limit), "bucket_limit differs"
        assert list(ha.bucket) == list(hb.bucket), "bucket counts differ"
        scale = math.sqrt(hb.num * hb.sum_squares)  # >= sum |x| (Cauchy-Schwarz)
        assert abs(ha.sum - hb.sum) <= RTOL * scale, f"sum {ha.sum!r} vs {hb.sum!r}"
        assert abs(ha.sum_squares - hb.sum_squares) <= RTOL * hb.sum_squares, "sum_squares"
        assert a.metadata.summary_description == b.metadata.summary_description
    elif kind == "image":
        from PIL import Image

        ia, ib = a.image, b.image
        assert (ia.height, ia.width, ia.colorspace) == (ib.height, ib.width, ib.colorspace)
        pa = np.asarray(Image.open(io.BytesIO(ia.encoded_image_string)))
        pb = np.asarray(Image.open(io.BytesIO(ib.encoded_image_string)))
        assert np.array_equal(pa, pb), f"pixels differ in {int((pa != pb).sum())} places"
    else:
        assert a == b, f"{kind} values differ"


def check_writer(mode: Mode, rep: Report) -> None:
    """The device path of ``SummaryWriter`` against its host path, through the event file."""
    from tbprobe import SummaryWriter

    inputs = writer_inputs()
    dev_inputs = [(m, t, x.to(mode.device), kw) for m, t, x, kw in inputs]
    steps = (0, 1)
    gpu = mode.device == "cuda"

    def log(w, items, step, checked=False):
        for method, tag, x, kw in items:
            if not (checked and gpu):
                getattr(w, method)(tag, x, step, **kw)
                continue
            w.flush()  # earlier events resolved: their pinned buffers are free again
            # step 0 under sync debug mode only, step 1 also while the GPU is busy
            with nosync(rep, "writer", f"no sync: {method}('{tag}') step {step}", cycles[step]):
                getattr(w, method)(tag, x, step, **kw)

    with tempfile.TemporaryDirectory(prefix="tbprobe-gpu-check-") as tmp:
        with contextlib.nullcontext() if gpu else forced_device_path():
            with SummaryWriter(os.path.join(tmp, "warmup")) as w:  # compiles, caches, pinned
                for step in steps:
                    log(w, dev_inputs, step)
            cycles = (None, gpu_sleep_cycles()) if gpu else (None, None)
            with SummaryWriter(os.path.join(tmp, "device")) as dev_w:
                for step in steps:
                    log(dev_w, dev_inputs, step, checked=True)
        with SummaryWriter(os.path.join(tmp, "host")) as host_w:
            for step in steps:
                log(host_w, inputs, step)
        with rep.check("writer", "no dropped events"):
            assert dev_w.dropped_events == 0 and host_w.dropped_events == 0
        got = _read_values(os.path.join(tmp, "device"))
        want = _read_values(os.path.join(tmp, "host"))
    with rep.check("writer", "read back: same tags and steps"):
        assert set(got) == set(want), f"missing {sorted(set(want) - set(got))}"
        assert len(want) == len(inputs) * len(steps), f"{len(want)} values in the host file"
    for _method, tag, _x, _kw in inputs:
        for step in steps:
            with rep.check("writer", f"read back: {tag} step {step} equals the CPU path's"):
                _same_value(got[(tag, step)], want[(tag, step)])
