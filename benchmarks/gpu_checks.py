"""GPU correctness and no-sync checks of tbprobe: step 2 of ``benchmarks/gpu_check.sh``.

Sections (``SECTIONS`` below; add one by appending to the list):

- ``stats``, ``histogram``, ``histogram_many``, ``thumbnail``: the kernels on CUDA tensors of
  every dtype of the shared catalogue (``tests/kernels/catalogue.py``), its odd shapes, strided
  views and NaN/Inf-laden inputs, against float64 numpy on the CPU: counts, min, max and
  histogram bins exact; sums within 1e-6 of the sum of magnitudes, sums of squares within 1e-6
  relative; thumbnails within 1 grey level of a float64 numpy oracle.
- ``big``: one int8 tensor of 2^31 + 17 elements (2 GiB) whose contents are a pattern with
  counts known in closed form: ``tensor_stats`` and ``histogram`` (tensorflow and int bins)
  must give them exactly.
- ``nosync_kernels``: second calls (tables cached) of every kernel entry point under
  ``torch.cuda.set_sync_debug_mode("error")``; each must raise nothing.
- ``writer``: ``SummaryWriter.add_scalar`` / ``add_histogram`` (tensorflow and int bins) /
  ``add_image`` / ``add_images`` of CUDA tensors under sync debug mode "error", then the event
  file is read back and must hold what the same calls with CPU tensors wrote.

``nosync_kernels`` and ``writer`` also queue a ~0.2 s GPU kernel before each call and require
the call to return while it still runs: that catches the implicit waits (cudaMalloc,
cudaHostAlloc, copies from pageable memory) that sync debug mode does not see.

On the GPU each section (the kernel sections split by dtype into ``--shards``) runs as its own
process, ``--jobs`` at a time: Triton compiles in parallel and a CUDA fault in one unit cannot
poison the others; a unit that dies or outlives ``--unit-timeout`` is one failure.

``--dry-run`` runs everything on CPU tensors so CI covers the same code: the kernels with
``TBPROBE_KERNELS=torch`` and, on a tiny subset, ``TBPROBE_KERNELS=triton`` under
``TRITON_INTERPRET=1``; ``big`` on 4096 + 17 elements; the writer's device path forced for CPU
tensors. Only the sync-debug-mode and GPU-busy checks and the 2^31 size are skipped. A dry run
keeps every unit in one process unless ``--jobs`` says otherwise.

Usage::

    python benchmarks/gpu_checks.py [--quick] [--json PATH] [--only SECTION ...] [--jobs N]
    python benchmarks/gpu_checks.py --dry-run --quick       # CPU, ~10 s

Exit status: 0 when every check passed (or was skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tbprobe import kernels  # imports no Triton module: TRITON_INTERPRET may still be set

ROOT = Path(__file__).resolve().parent.parent
EDGES = [-1e3, -10.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0, 100.0, 1e4]  # explicit histogram edges
STAT = ("count", "sum", "sum_sq", "min", "max", "abs_max", "nan", "pos_inf", "neg_inf", "zeros")
EXACT = [i for i, s in enumerate(STAT) if s not in ("sum", "sum_sq")]
RTOL = 1e-6
BIG_N = 2**31  # elements of the pattern part of the big tensor; 17 more follow it
TAIL = 17
PATTERN_MOD = 251  # x[i] = i % 251 - 125 below BIG_N, -128 in the tail


@dataclass
class Mode:
    device: str  # "cuda", or "cpu" in a dry run
    dry_run: bool
    quick: bool
    shard: tuple[int, int] = (0, 1)  # (k, n): this unit checks the dtypes i with i % n == k

    def mine(self, dtypes) -> list:
        k, n = self.shard
        return [d for i, d in enumerate(dtypes) if i % n == k]

    @property
    def backends(self):
        """(label, TBPROBE_KERNELS value or None for the default dispatch, tiny catalogue)."""
        if self.dry_run:
            return [("torch", "torch", False), ("triton-interp", "triton", True)]
        return [("triton", None, False)]


@dataclass
class Report:
    path: str | None
    meta: dict
    checks: list = field(default_factory=list)
    sections: list = field(default_factory=list)
    _saved: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def check(self, section: str, name: str):
        """Records a pass, or a fail with the exception's text; never lets it escape."""
        try:
            yield
        except Exception as e:  # a failing check must not stop the others
            detail = f"{type(e).__name__}: {e}".strip()[:600]
            self.add(section, name, "fail", detail)
        else:
            self.add(section, name, "pass")

    def add(self, section, name, status, detail=""):
        self.checks.append({"section": section, "name": name, "status": status, "detail": detail})
        if status == "fail":
            print(f"FAIL {section}/{name}: {detail}", flush=True)
        if time.monotonic() - self._saved > 5:  # a unit killed by its timeout keeps these
            self.save()

    def counts(self, section=None):
        rows = [c for c in self.checks if section is None or c["section"] == section]
        return {s: sum(c["status"] == s for c in rows) for s in ("pass", "fail", "skip")}

    def save(self) -> None:
        """Written after every section, so a run killed by its timeout still leaves results."""
        self._saved = time.monotonic()
        if not self.path:
            return
        total = self.counts()
        doc = dict(self.meta, sections=self.sections, checks=self.checks)
        doc["summary"] = dict(total, checks=len(self.checks), ok=total["fail"] == 0)
        with open(self.path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


@functools.lru_cache(maxsize=1)
def _catalogue():
    """The kernel tests' catalogue, loaded by path (a `tests` package elsewhere can't shadow it)."""
    spec = importlib.util.spec_from_file_location(
        "tbprobe_catalogue", ROOT / "tests" / "kernels" / "catalogue.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- inputs


def sample(shape, dtype, seed=0, nonfinite="some", int_bits=50):
    """Fixed-seed CPU values of ``dtype``. Floats: ``"some"`` puts NaN, +Inf, -Inf and 0 in,
    ``"heavy"`` makes ~30% non-finite, ``"nan"``/``"inf"`` every element. Integers reach far
    past fp32's 2^24 (``int_bits``) and hold their dtype's extremes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        if info.min == 0:
            x = x.abs()
        x = (x * 2.0 ** min(info.bits - 4, int_bits)).clamp(info.min, info.max).to(dtype)
        if x.numel() >= 3 and int_bits >= info.bits - 4:
            x.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
        return x
    if nonfinite == "nan":
        x.fill_(math.nan)
    elif nonfinite == "inf":
        x.fill_(math.inf)
    elif nonfinite == "heavy":
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        x = torch.where(u < 0.1, math.nan, torch.where(u < 0.2, math.inf, x))
        x = torch.where(u > 0.9, -math.inf, x)
    x = x.to(dtype)
    if nonfinite == "some":
        flat = x.view(-1)
        specials = [math.nan, math.inf, -math.inf, 0.0][: max(flat.numel() - 1, 0)]
        for i, v in enumerate(specials):
            flat[(i * 7919) % flat.numel()] = v
    return x


@dataclass
class Case:
    id: str
    base: torch.Tensor  # contiguous, on the CPU
    view: object = None  # base -> the tensor checked (a strided view), or None

    def cpu(self):
        return self.view(self.base) if self.view else self.base

    def on(self, device):
        b = self.base.to(device)
        return self.view(b) if self.view else b


def _dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def kernel_cases(mode: Mode, tiny: bool) -> list[Case]:
    cat = _catalogue()
    if tiny:  # the Triton interpreter is slow: a few dtypes, three shapes
        dtypes = [torch.float32, torch.bfloat16, torch.float8_e5m2, torch.int8, torch.bool]
        shapes = [(1,), (1041,), (5, 99)]
    else:
        dtypes = cat.DTYPES
        shapes = cat.SHAPES if not mode.quick else [(), (1,), (18,), (1041,), (311, 384), (0,)]
    views = {"T": lambda t: t.t(), "step3": lambda t: t[:, ::3], "slice": lambda t: t[::2, 1:]}
    cases, mine = [], mode.mine(dtypes)
    for k, dtype in enumerate(dtypes):  # seeds from the full list: the same data in any shard
        if dtype not in mine:
            continue
        dn = _dname(dtype)
        for j, shape in enumerate(shapes):
            cases.append(Case(f"{dn}{list(shape)}", sample(shape, dtype, seed=100 * k + j)))
        for name, fn in views.items() if not tiny else [("T", views["T"])]:
            cases.append(Case(f"{dn}[96,130].{name}", sample((96, 130), dtype, seed=7 + k), fn))
        if dtype.is_floating_point:
            for nf in ["heavy", "nan", "inf"] if not tiny else ["heavy"]:
                cases.append(Case(f"{dn}[4113]-{nf}", sample((4113,), dtype, k, nonfinite=nf)))
        if not tiny:
            cases.append(Case(f"{dn}[100]-constant", torch.full((100,), 3).to(dtype)))
    return cases


# ----------------------------------------------------------------------------- references


def stats_reference(x_cpu) -> tuple[np.ndarray, float]:
    """The float64 numpy statistics row (the test catalogue's oracle) and the sum of
    magnitudes (the sum's error scale)."""
    xd = x_cpu.double().numpy().reshape(-1)
    return _catalogue().stats_reference(x_cpu), float(np.abs(xd[np.isfinite(xd)]).sum())


def assert_stats(got, want, abs_sum) -> None:
    got = np.asarray(got, dtype=np.float64)
    bad = [STAT[i] for i in EXACT if got[i] != want[i]]
    if bad:
        raise AssertionError(f"{bad} differ: got {got.tolist()}, want {want.tolist()}")
    if abs(got[1] - want[1]) > RTOL * abs_sum:
        raise AssertionError(f"sum {got[1]!r} vs {want[1]!r} (sum |x| {abs_sum:.6g})")
    if abs(got[2] - want[2]) > RTOL * want[2]:
        raise AssertionError(f"sum_sq {got[2]!r} vs {want[2]!r}")


def histogram_reference(x_cpu, bins, range_=None) -> tuple[np.ndarray, np.ndarray]:
    """numpy's counts and edges of the finite values of ``x.double()``."""
    xd = x_cpu.double().numpy().reshape(-1)
    fin = xd[np.isfinite(xd)]
    if isinstance(bins, str):
        bins = kernels.tensorflow_edges().numpy()
    try:
        return np.histogram(fin, bins=bins, range=range_)
    except ValueError:
        # numpy refuses int bins narrower than float64's spacing (one int64 near 2^52, widened
        # by +-0.5); tbprobe keeps those edges. Same edges and rule, given explicitly:
        lo, hi = range_ or ((fin.min(), fin.max()) if fin.size else (0.0, 1.0))
        lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
        return np.histogram(fin, bins=np.linspace(lo, hi, bins + 1))


def assert_histogram(h, x_cpu, bins, range_=None) -> None:
    counts, edges = histogram_reference(x_cpu, bins, range_)
    got_e = h.edges.cpu().numpy()
    if got_e.shape != edges.shape or not np.array_equal(got_e, edges):
        raise AssertionError(f"edges differ: got {got_e[:4]}.., want {edges[:4]}..")
    got_c = h.counts.cpu().numpy()
    if h.counts.dtype != torch.int64 or not np.array_equal(got_c, counts):
        i = np.flatnonzero(got_c != counts)[:5] if got_c.shape == counts.shape else []
        raise AssertionError(
            f"counts differ ({h.counts.dtype}, total {got_c.sum()} vs {counts.sum()}) "
            f"at bins {list(i)}: got {got_c[i].tolist()}, want {counts[i].tolist()}"
        )
    assert_stats(h.stats.cpu().numpy(), *stats_reference(x_cpu))


def thumbnail_oracle(x_cpu, kind="auto", max_tiles=64, tile=None, max_size=512, sample=0):
    """The thumbnail spec (``tbprobe/kernels/thumbnail.py``'s docstring) in float64 numpy:
    window sums from integral images, so large maps stay fast."""
    a = x_cpu.double().numpy()
    kind = {2: "heatmap", 3: "sequence", 4: "conv"}[a.ndim] if kind == "auto" else kind
    maps = {"heatmap": lambda: a[None], "sequence": lambda: a[sample][None]}.get(
        kind, lambda: a[sample, :max_tiles]
    )()
    n, h, w = maps.shape
    cols = math.isqrt(n - 1) + 1
    rows = -(-n // cols)
    cap_h, cap_w = (max_size - (rows - 1)) // rows, (max_size - (cols - 1)) // cols
    if tile:
        cap_h, cap_w = min(cap_h, tile), min(cap_w, tile)
    if kind in ("conv", "attention") and (h > cap_h or w > cap_w):  # keep the aspect ratio
        if h * cap_w >= w * cap_h:  # the height binds
            th, tw = cap_h, max(1, w * cap_h // h)
        else:
            th, tw = max(1, h * cap_w // w), cap_w
    else:
        th, tw = min(h, cap_h), min(w, cap_w)
    fin = np.isfinite(maps)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lo = np.where(fin, maps, np.inf).min(axis=(1, 2))[:, None, None]
        hi = np.where(fin, maps, -np.inf).max(axis=(1, 2))[:, None, None]
        s = np.zeros((n, h + 1, w + 1))
        c = np.zeros((n, h + 1, w + 1), dtype=np.int64)
        s[:, 1:, 1:] = np.where(fin, maps, 0.0).cumsum(1).cumsum(2)
        c[:, 1:, 1:] = fin.cumsum(1).cumsum(2)
        y0, y1 = np.arange(th) * h // th, -(-(np.arange(th) + 1) * h // th)
        x0, x1 = np.arange(tw) * w // tw, -(-(np.arange(tw) + 1) * w // tw)

        def window(t):
            return t[:, y1][:, :, x1] - t[:, y0][:, :, x1] - t[:, y1][:, :, x0] + t[:, y0][:, :, x0]

        cnt = window(c)
        mean = window(s) / cnt
        q = np.clip(np.floor((mean - lo) * (255.0 / (hi - lo)) + 0.5), 0, 255)
    q = np.where(hi == lo, 128.0, q)
    q = np.where(cnt > 0, q, 0.0).astype(np.uint8)
    img = np.full((rows * th + rows - 1, cols * tw + cols - 1), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        img[r * (th + 1) : r * (th + 1) + th, col * (tw + 1) : col * (tw + 1) + tw] = q[i]
    return img


# ----------------------------------------------------------------------------- sections


@contextlib.contextmanager
def kernels_backend(value):
    """``TBPROBE_KERNELS=value`` (read at each call) for the block; None: default dispatch."""
    old = os.environ.pop("TBPROBE_KERNELS", None)
    if value is not None:
        os.environ["TBPROBE_KERNELS"] = value
    try:
        yield
    finally:
        os.environ.pop("TBPROBE_KERNELS", None)
        if old is not None:
            os.environ["TBPROBE_KERNELS"] = old


def check_stats(mode: Mode, rep: Report) -> None:
    for label, backend, tiny in mode.backends:
        cases = kernel_cases(mode, tiny)
        with kernels_backend(backend):
            xs = [c.on(mode.device) for c in cases]
            for case, x in zip(cases, xs, strict=True):
                with rep.check("stats", f"{label}/{case.id}"):
                    rows = kernels.tensor_stats([x])
                    assert rows.shape == (1, len(STAT)) and rows.dtype == torch.float64
                    assert rows.device == x.device, f"result on {rows.device}"
                    assert_stats(rows[0].cpu().numpy(), *stats_reference(case.cpu()))
            with rep.check("stats", f"{label}/one call over all {len(xs)} tensors"):
                rows = kernels.tensor_stats(xs).cpu().numpy()
                for i, case in enumerate(cases):
                    try:
                        assert_stats(rows[i], *stats_reference(case.cpu()))
                    except AssertionError as e:
                        raise AssertionError(f"{case.id}: {e}") from None


def _bin_modes(tiny):
    modes = [("tensorflow", "tensorflow", None), ("bins64", 64, None)]
    if not tiny:
        modes += [("bins7-range", 7, (-1.5, 2.5)), ("edges", EDGES, None)]
    return modes


def check_histogram(mode: Mode, rep: Report) -> None:
    for label, backend, tiny in mode.backends:
        cases = kernel_cases(mode, tiny)
        with kernels_backend(backend):
            for case in cases:
                x = case.on(mode.device)
                for name, bins, range_ in _bin_modes(tiny):
                    with rep.check("histogram", f"{label}/{case.id}/{name}"):
                        h = kernels.histogram(x, bins, range_)
                        assert h.counts.device == x.device, f"counts on {h.counts.device}"
                        assert_histogram(h, case.cpu(), bins, range_)


def check_histogram_many(mode: Mode, rep: Report) -> None:
    for label, backend, tiny in mode.backends:
        cases = kernel_cases(mode, tiny)
        with kernels_backend(backend):
            xs = [c.on(mode.device) for c in cases]
            for name, bins, range_ in _bin_modes(tiny):
                with rep.check("histogram_many", f"{label}/{len(xs)} tensors/{name}"):
                    hs = kernels.histogram_many(xs, bins, range_)
                    assert len(hs) == len(xs)
                    for case, h in zip(cases, hs, strict=True):
                        try:
                            assert_histogram(h, case.cpu(), bins, range_)
                        except AssertionError as e:
                            raise AssertionError(f"{case.id}: {e}") from None


THUMB_CASES = [  # (shape, kwargs): the kernel tests' layouts plus model-sized maps
    ((2, 5, 13, 11), {}),
    ((1, 1, 7, 7), {}),
    ((3, 17, 9, 8), {"sample": -1}),
    ((2, 6, 37, 29), {"tile": 8}),
    ((1, 3, 64, 64), {"max_size": 40}),
    ((2, 100, 4, 4), {}),
    ((2, 40, 23), {}),
    ((1, 300, 50), {"max_size": 64}),
    ((2, 4, 12, 12), {"kind": "attention", "tile": 5}),
    ((31, 17), {}),
    ((2, 256, 56, 56), {}),  # a ResNet stage: 8x8 tiles of 56
    ((1, 12, 197, 197), {"kind": "attention"}),  # ViT heads, downsampled
    ((1, 1024, 768), {}),  # a transformer's (B, T, D), downsampled
]


def _thumb_nonfinite(dtype):
    """(1, 4, 40, 40) maps: all NaN, constant, a NaN block covering whole windows, ±Inf."""
    x = sample((1, 4, 40, 40), torch.float64, seed=5, nonfinite="none")
    x[0, 1] = 2.5
    if dtype.is_floating_point:
        x[0, 0] = math.nan
        x[0, 2, :20, :12] = math.nan
        x[0, 3, 3, 4], x[0, 3, 30, 31] = math.inf, -math.inf
    return x.to(dtype) if dtype.is_floating_point else (x * 10).to(dtype)


def check_thumbnail(mode: Mode, rep: Report) -> None:
    cat = _catalogue()
    for label, backend, tiny in mode.backends:
        if tiny:
            dtypes, cases = [torch.float32, torch.bfloat16, torch.int8], THUMB_CASES[:2]
        elif mode.quick:
            dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
            dtypes += [torch.int64, torch.bool]
            cases = THUMB_CASES
        else:
            dtypes, cases = cat.DTYPES, THUMB_CASES
        with kernels_backend(backend):
            mine = mode.mine(dtypes)
            for k, dtype in enumerate(dtypes):
                if dtype not in mine:
                    continue
                inputs = [(s, kw, sample(s, dtype, seed=k, int_bits=3)) for s, kw in cases]
                inputs.append(((1, 4, 40, 40), {"tile": 10}, _thumb_nonfinite(dtype)))
                strided = sample((2, 6, 29, 37), dtype, seed=k, int_bits=3).transpose(2, 3)
                inputs.append(("(2, 6, 29, 37).transpose(2, 3)", {"tile": 9}, strided))
                for shape, kw, x in inputs:
                    with rep.check("thumbnail", f"{label}/{_dname(dtype)}{shape}{kw}"):
                        got = kernels.thumbnail(x.to(mode.device), **kw)
                        assert got.dtype == torch.uint8 and got.device.type == mode.device
                        got = got.cpu().numpy().astype(int)
                        want = thumbnail_oracle(x, **kw).astype(int)
                        assert got.shape == want.shape, f"shape {got.shape} vs {want.shape}"
                        diff = np.abs(got - want)
                        assert diff.max() <= 1, (
                            f"{int((diff > 1).sum())} pixels more than 1 level off "
                            f"(max {int(diff.max())})"
                        )


def check_big(mode: Mode, rep: Report) -> None:
    """More than 2^31 elements: offsets must be int64 everywhere. The int8 pattern
    ``x[i] = i % 251 - 125`` (then 17 times -128) has counts, sums and histograms known in
    closed form. In a dry run the same code checks 4096 + 17 elements, so CI tests it."""
    n_main = 4096 if mode.dry_run else BIG_N
    n = n_main + TAIL
    name = f"int8[{n}]" + (" (dry-run stand-in for 2^31+17)" if mode.dry_run else "")
    x = torch.empty(n, dtype=torch.int8, device=mode.device)  # 2 GiB on the GPU
    chunk = 1 << 27
    for s in range(0, n_main, chunk):
        i = torch.arange(s, min(s + chunk, n_main), dtype=torch.int64, device=mode.device)
        x[s : s + i.numel()] = (i % PATTERN_MOD - 125).to(torch.int8)
        del i
    x[n_main:] = -128
    values = np.arange(PATTERN_MOD, dtype=np.int64) - 125
    reps = np.full(PATTERN_MOD, n_main // PATTERN_MOD, dtype=np.int64)
    reps[: n_main % PATTERN_MOD] += 1
    values, reps = np.append(values, -128), np.append(reps, TAIL)
    total, total_sq = int((values * reps).sum()), int((values * values * reps).sum())
    want = np.array(
        [n, total, total_sq, -128, 125, 128, 0, 0, 0, int(reps[values == 0][0])], np.float64
    )
    abs_sum = float((np.abs(values) * reps).sum())
    for label, backend, _tiny in mode.backends:
        with kernels_backend(backend):
            with rep.check("big", f"{label}/{name}/tensor_stats"):
                assert_stats(kernels.tensor_stats([x])[0].cpu().numpy(), want, abs_sum)
            for bins in ("tensorflow", 255):
                with rep.check("big", f"{label}/{name}/histogram {bins}"):
                    h = kernels.histogram(x, bins)
                    ref_bins = kernels.tensorflow_edges().numpy() if bins == "tensorflow" else bins
                    counts, edges = np.histogram(values.astype(np.float64), ref_bins, weights=reps)
                    assert np.array_equal(h.edges.cpu().numpy(), edges), "edges differ"
                    got = h.counts.cpu().numpy()
                    diff = np.flatnonzero(got != counts.astype(np.int64))
                    assert diff.size == 0, f"{diff.size} bins differ, first {diff[:5].tolist()}"
                    assert_stats(h.stats.cpu().numpy(), want, abs_sum)
    del x
    if mode.device == "cuda":
        torch.cuda.empty_cache()


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
    xs = [sample((4113,), d, seed=i).to(dev) for i, d in enumerate(_catalogue().DTYPES)]
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


# ----------------------------------------------------------------------------- driver


@dataclass
class Section:
    name: str
    run: object
    sharded: bool = False  # split by dtype into --shards processes
    gpu_only: bool = False  # skipped in a dry run


SECTIONS = [  # append new sections here. Units start in this order: the cheap, most important
    # checks first, so a run cut short by its timeout still has them.
    Section("nosync_kernels", check_nosync_kernels, gpu_only=True),
    Section("writer", check_writer),
    Section("big", check_big),
    Section("histogram", check_histogram, sharded=True),
    Section("stats", check_stats, sharded=True),
    Section("histogram_many", check_histogram_many, sharded=True),
    Section("thumbnail", check_thumbnail, sharded=True),
]
BY_NAME = {s.name: s for s in SECTIONS}


def environment(mode: Mode) -> dict:
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_available": torch.cuda.is_available(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
    }
    if mode.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    return env


def run_unit(unit: str, mode: Mode, rep: Report) -> None:
    """Run one unit, ``SECTION:k/n`` (shard ``k`` of ``n`` of the section's dtypes), in-process."""
    name, shard = unit.split(":")
    k, n = (int(v) for v in shard.split("/"))
    section = BY_NAME[name]
    first, t0 = len(rep.checks), time.perf_counter()
    if section.gpu_only and mode.dry_run:
        rep.add(name, "all", "skip", "needs a CUDA device")
    else:
        try:
            section.run(replace(mode, shard=(k, n)), rep)
        except Exception:  # a crashed unit is one failure; the next unit still runs
            rep.add(name, f"{unit} crashed", "fail", traceback.format_exc()[-600:])
    mine = rep.checks[first:]
    c = {s: sum(x["status"] == s for x in mine) for s in ("pass", "fail", "skip")}
    rep.sections.append(dict(name=unit, seconds=round(time.perf_counter() - t0, 2), **c))
    rep.save()


def run_unit_process(unit: str, args, tmp: str) -> tuple[list, list, str]:
    """One unit in a child process (a CUDA fault there cannot poison the others)."""
    part = os.path.join(tmp, unit.replace(":", "_").replace("/", "of") + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--unit", unit, "--json", part]
    cmd += ["--dry-run"] * args.dry_run + ["--quick"] * args.quick
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=args.unit_timeout
        )
        output, rc = out.stdout, str(out.returncode)
    except subprocess.TimeoutExpired as e:  # killed; the checks it saved so far still count
        output, rc = e.stdout or b"", f"killed after {args.unit_timeout:g} s"
    output = output.decode(errors="replace")
    try:
        with open(part) as f:
            doc = json.load(f)
        checks, sections = doc["checks"], doc["sections"]
    except (OSError, ValueError, KeyError):
        checks, sections = [], []
    if not sections:  # died or killed before the end: the output says why
        name, secs = unit.split(":")[0], round(time.perf_counter() - t0, 2)
        detail = f"exit {rc}: {output[-600:]}"
        checks.append(dict(section=name, name=f"{unit} died", status="fail", detail=detail))
        c = {s: sum(x["status"] == s for x in checks) for s in ("pass", "fail", "skip")}
        sections.append(dict(name=unit, seconds=secs, **c))
    return checks, sections, output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU tensors; no GPU needed")
    p.add_argument("--quick", action="store_true", help="a smaller catalogue")
    p.add_argument("--json", metavar="PATH", help="write every result here")
    p.add_argument("--only", action="append", choices=list(BY_NAME), help="these sections")
    p.add_argument("--shards", type=int, help="processes per sharded section (GPU 6, dry run 2)")
    p.add_argument("--jobs", type=int, help="units at a time; 1: all in this process")
    p.add_argument("--unit-timeout", type=float, default=200, help="seconds per unit process")
    p.add_argument("--unit", help=argparse.SUPPRESS)  # SECTION:k/n, run by the parent
    args = p.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit module is imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_checks: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 1
    mode = Mode("cpu" if args.dry_run else "cuda", args.dry_run, args.quick)
    meta = {"mode": {"device": mode.device, "dry_run": mode.dry_run, "quick": mode.quick}}
    rep = Report(args.json, meta)
    if args.unit:
        run_unit(args.unit, mode, rep)
        return 1 if rep.counts()["fail"] else 0

    meta["environment"] = environment(mode)
    shards = args.shards or (2 if mode.dry_run else 6)
    # A dry run stays in one process (CI time); on the GPU each unit gets its own process:
    # Triton compiles in parallel and a CUDA fault in one unit cannot poison the rest.
    jobs = args.jobs or (1 if mode.dry_run else min(12, os.cpu_count() or 1))
    units = [
        f"{s.name}:{k}/{shards if s.sharded else 1}"
        for s in SECTIONS
        if not args.only or s.name in args.only
        for k in range(shards if s.sharded else 1)
    ]
    print(f"gpu_checks: {meta['mode']} {meta['environment']}", flush=True)
    print(f"gpu_checks: {len(units)} units, {jobs} at a time", flush=True)
    started = time.perf_counter()

    def report(sections):
        for u in sections:
            print(
                f"gpu_checks: {u['name']:18s} {u['pass']:5d} passed {u['fail']:4d} failed "
                f"{u['skip']:3d} skipped  {u['seconds']:6.1f} s",
                flush=True,
            )

    if jobs <= 1:
        for unit in units:
            run_unit(unit, mode, rep)
            report(rep.sections[-1:])
    else:
        with (
            tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp,
            ThreadPoolExecutor(jobs) as pool,
        ):
            futures = [pool.submit(run_unit_process, u, args, tmp) for u in units]
            for fut in as_completed(futures):
                checks, sections, output = fut.result()
                rep.checks += checks
                rep.sections += sections
                rep.save()
                print("".join(f"  | {line}\n" for line in output.splitlines()[-20:]), end="")
                report(sections)
    c = rep.counts()
    print(
        f"gpu_checks: {c['pass']} passed, {c['fail']} failed, {c['skip']} skipped "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return 1 if c["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
