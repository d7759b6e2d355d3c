"""The kernel correctness sections of ``gpu_checks``: ``stats``, ``histogram``,
``histogram_many``, ``thumbnail`` and ``big``, on the catalogue's cases against float64 numpy
oracles."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from gpu_checks_common import EDGES, RTOL, Mode, Report, catalogue, sample

from tbprobe import kernels  # imports no Triton module: TRITON_INTERPRET may still be set

STAT = ("count", "sum", "sum_sq", "min", "max", "abs_max", "nan", "pos_inf", "neg_inf", "zeros")
EXACT = [i for i, s in enumerate(STAT) if s not in ("sum", "sum_sq")]
BIG_N = 2**31  # elements of the pattern part of the big tensor; 17 more follow it
TAIL = 17
PATTERN_MOD = 251  # x[i] = i % 251 - 125 below BIG_N, -128 in the tail


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
    cat = catalogue()
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
    return catalogue().stats_reference(x_cpu), float(np.abs(xd[np.isfinite(xd)]).sum())


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
    cat = catalogue()
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
