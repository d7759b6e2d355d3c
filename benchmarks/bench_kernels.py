"""tbprobe's kernels vs the plain torch ops and the tensorboardX path, side by side in one run.

One markdown table per kernel: median time, GB/s, that over the copy bandwidth measured in the
same run (``× copy``), and the baselines users have today with tbprobe's speedup over them.

- GB/s: copy = (bytes read + bytes written) / time of ``y.copy_(x)`` (1 GiB on GPU, 256 MiB on
  CPU); a kernel = bytes of its input read *once* / time (a histogram reads its input twice,
  stats then bins, and is credited once; a thumbnail is credited the maps it draws).
- Timing: GPU ``triton.testing.do_bench`` (median, L2 flushed before each run); CPU and the
  tensorboardX path ``time.perf_counter``, median of >= 5 calls after a warm-up. GPU
  ``back-to-back``: wall time per call of 20 calls in a row, host work included.
- Baselines: stats ``aminmax + sum + vector_norm + isnan().sum() + isinf().sum()`` (per tensor
  for a model, whose one read is the faster of ``_foreach_norm`` and one ``amax`` over its flat
  gradient buffer); histograms ``aminmax + histc`` (linear bins only: another result for other
  bins) and tensorboardX's ``np.histogram(x.cpu().numpy().astype(float), edges)`` (tensorflow
  bins; on GPU up to 32M elements); thumbnails ``adaptive_avg_pool2d`` of the maps drawn.
- Each timed result is checked once, untimed: stats against float64 torch; histograms' counts
  sum, exact counts vs the torch reference (whole tensor on GPU, 1M elements on CPU) and vs
  tensorboardX's; thumbnails within 1 grey level of ``thumbnail_reference``.

Usage: ``python benchmarks/bench_kernels.py [--quick] [--device cpu|cuda]
[--backend torch|triton|both] [--json PATH]`` (default: cuda with both backends if available,
else cpu with torch). Exit status: 1 if a result was wrong, 2 on a bad command line, else 0.

On the GPU two tuning sweeps follow (kernels_bench_sweeps.py): ``tensor_stats`` at every chunk
length and ``histogram`` at several programs per SM, side by side on the same inputs.

This file holds the plan and the timing; the inputs and their checks are in
kernels_bench_cases.py, the tables and the targets' verdicts in kernels_bench_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# Its helpers live next to this script: importable when it runs as a script (its directory is
# sys.path[0]) and when it is loaded from its path.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from kernels_bench_cases import (  # noqa: E402
    BINS,
    DTYPE_NAME,
    TBX_MAX_NUMEL,
    MiB,
    check_hist,
    check_stats,
    check_thumbnail,
    forced_backend,
    label,
    make,
    model_grads,
)
from kernels_bench_report import report, targets  # noqa: E402
from kernels_bench_sweeps import bench_hist_programs, bench_stats_chunks  # noqa: E402

from tbprobe import kernels  # noqa: E402
from tbprobe.kernels.dispatch import _triton_importable  # noqa: E402
from tbprobe.kernels.thumbnail import _layout  # noqa: E402


def make_plan(device: str, quick: bool) -> dict:
    """(dtype, numel) cases, histogram-only cases, (d_model, ffn, layers, vocab), thumb batch."""
    if device.startswith("cuda"):  # negative: a size in bytes
        spec = [1 << 20, -64 * MiB] if quick else [1 << 20, 1 << 24, -64 * MiB, -256 * MiB]
        model = (768, 2048, 33, 32000) if quick else (1536, 4096, 33, 32000)  # 0.28B / 1.03B
    else:
        spec = [1 << 20] if quick else [1 << 20, 10_000_000]
        model = (64, 176, 33, 2000) if quick else (128, 352, 33, 4000)  # 1.9M / 7.7M
    sizes = [(d, v if v > 0 else -v // d.itemsize) for d in DTYPE_NAME for v in spec]
    sizes = list(dict.fromkeys(sizes))  # fp32 16M elements is 64 MiB
    extra = [] if (torch.float32, 10_000_000) in sizes else [(torch.float32, 10_000_000)]
    return dict(sizes=sizes, hist_extra=extra, model=model, thumb_batch=2 if quick else 8)


@dataclass(kw_only=True)
class Env:
    device: torch.device
    backends: list[str]
    sizes: list[tuple[torch.dtype, int]]
    hist_extra: list[tuple[torch.dtype, int]]  # histogram-only: the 10M fp32 target
    model: tuple[int, int, int, int]
    thumb_batch: int
    copy_bw: float = 0.0  # bytes/s, read + written
    rows: list[dict] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time(self, fn) -> float:
        """Median seconds per call: do_bench on GPU, perf_counter on CPU."""
        if self.cuda:
            if _triton_importable():
                from triton.testing import do_bench

                return do_bench(fn, return_mode="median") * 1e-3
            return host_median(lambda: (fn(), torch.cuda.synchronize()))
        return host_median(fn)

    def back_to_back(self, fn, n: int = 20) -> float | None:
        """Wall seconds per call of ``n`` calls in a row, host work included (GPU only)."""
        if not self.cuda:
            return None
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    def add(self, kernel, case, backend, t, nbytes, check, **extra) -> None:
        gbps = nbytes / t / 1e9
        self.rows.append(
            dict(kernel=kernel, case=case, backend=backend, time_s=t, bytes=nbytes, gbps=gbps)
            | dict(x_copy=gbps * 1e9 / self.copy_bw, check=check, **extra)
        )


def host_median(fn, min_reps: int = 5, budget_s: float = 0.3) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up
    first = time.perf_counter() - t0
    samples = []
    for _ in range(max(min_reps, min(50, int(budget_s / max(first, 1e-9))))):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(env: Env) -> float:
    nbytes = (1 << 30) if env.cuda else 256 * MiB
    x = torch.empty(nbytes // 4, device=env.device).uniform_()
    y = torch.empty_like(x)
    return 2 * nbytes / env.time(lambda: y.copy_(x))


def bench_stats(env: Env) -> None:
    for dtype, n in env.sizes:
        x = make((n,), dtype, env.device)

        def plain(x=x):
            torch.aminmax(x), x.sum(), torch.linalg.vector_norm(x)
            x.isnan().sum(), x.isinf().sum()

        torch_s = env.time(plain)
        for backend in env.backends:
            with forced_backend(backend):
                check = check_stats([x], kernels.tensor_stats([x]))
                t = env.time(lambda x=x: kernels.tensor_stats([x]))
            env.add("stats", label(dtype, n), backend, t, x.nbytes, check, torch_s=torch_s)


def histc_baseline(x, n_bins):
    """``aminmax`` + ``histc``, on fp32: bf16 ``histc`` counts in bf16 (exact only to 256), and
    on CPU (torch 2.13) bf16 ``histc`` with 1548 bins of 10M values corrupts the heap."""
    return lambda: (torch.aminmax(x), torch.histc(x.float(), bins=n_bins))


def bench_histograms(env: Env) -> None:
    tf_edges = kernels.tensorflow_edges().numpy()
    for dtype, n in env.sizes + env.hist_extra:
        x = make((n,), dtype, env.device, seed=1)

        def tbx_path(x=x):  # tensorboardX raises on bf16: users must call .float() first
            values = (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()
            return np.histogram(values.astype(float), tf_edges)[0]

        for name, bins, n_bins in BINS:
            torch_s = env.time(histc_baseline(x, n_bins))
            tbx_s = tbx_counts = None
            if name == "tensorflow" and (not env.cuda or n <= TBX_MAX_NUMEL):
                tbx_counts, tbx_s = tbx_path(), host_median(tbx_path)
            for backend in env.backends:
                with forced_backend(backend):
                    h = kernels.histogram(x, bins)
                    check = check_hist(x, h, bins, full=env.cuda, tbx_counts=tbx_counts)
                    t = env.time(lambda x=x, bins=bins: kernels.histogram(x, bins))
                shown = "host" if backend == "torch" and not env.cuda else backend
                env.add(
                    "histogram", label(dtype, n), shown, t, x.nbytes, check,
                    bins=name, torch_s=torch_s, tbx_s=tbx_s, numel=n, dtype=DTYPE_NAME[dtype],
                )  # fmt: skip


def bench_model(env: Env) -> None:
    flat, grads = model_grads(env.model, env.device)

    def plain():
        for g in grads:
            torch.aminmax(g), g.sum(), torch.linalg.vector_norm(g)
            g.isnan().sum(), g.isinf().sum()

    torch_s = env.time(plain)
    foreach_s = env.time(lambda: torch._foreach_norm(grads))
    amax_s = env.time(lambda: flat.amax())
    case = f"{len(grads)} bf16 tensors, {flat.numel() / 1e6:,.1f}M elements"
    for backend in env.backends:
        with forced_backend(backend):
            check = check_stats(grads, kernels.tensor_stats(grads))
            t = env.time(lambda: kernels.tensor_stats(grads))
            wall = env.back_to_back(lambda: kernels.tensor_stats(grads))
        env.add(
            "model", case, backend, t, flat.nbytes, check, torch_s=torch_s,
            foreach_s=foreach_s, amax_s=amax_s, read_once_s=min(foreach_s, amax_s), wall_s=wall,
        )  # fmt: skip


THUMBS = [("conv", (256, 56, 56)), ("sequence", (1024, 4096)), ("attention", (16, 1024, 1024))]


def bench_thumbnails(env: Env) -> None:
    for kind, rest in THUMBS:
        shape = (env.thumb_batch, *rest)
        x = torch.zeros(shape, dtype=torch.bfloat16, device=env.device)
        x[0] = make(rest, torch.bfloat16, env.device, seed=3)  # only sample 0 is drawn
        _, n, _, _, _, _, th, tw, _, _ = _layout(shape, kind, 64, None, 512)
        maps = x[0, :n] if x.dim() == 4 else x[0][None]  # (n, h, w): what is drawn
        torch_s = env.time(lambda maps=maps, th=th, tw=tw: F.adaptive_avg_pool2d(maps, (th, tw)))
        for backend in env.backends:
            with forced_backend(backend):
                check = check_thumbnail(x, kernels.thumbnail(x, kind=kind), kind)
                t = env.time(lambda x=x, kind=kind: kernels.thumbnail(x, kind=kind))
                wall = env.back_to_back(lambda x=x, kind=kind: kernels.thumbnail(x, kind=kind))
            case = f"{kind} {shape} bf16"
            env.add("thumbnail", case, backend, t, maps.nbytes, check, torch_s=torch_s, wall_s=wall)


def machine(env: Env) -> dict:
    triton = sys.modules.get("triton") if _triton_importable() else None
    return dict(
        device=torch.cuda.get_device_name(env.device) if env.cuda else "cpu",
        cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
        triton=getattr(triton, "__version__", "not installed"),
    )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller cases")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--backend", choices=("torch", "triton", "both"), help="default: cuda both")
    p.add_argument("--json", metavar="PATH", help="write every number here")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; run with --device cpu")
    backend = args.backend or ("both" if device == "cuda" else "torch")
    if device == "cpu" and backend != "torch":
        p.error("--device cpu runs the torch backend only: the Triton interpreter is no benchmark")
    backends = ["torch", "triton"] if backend == "both" else [backend]
    if "triton" in backends and not _triton_importable():
        print("triton is not importable: benchmarking the torch backend only", file=sys.stderr)
        backends = ["torch"]
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    env = Env(device=torch.device(device), backends=backends, **make_plan(device, args.quick))
    info = machine(env)
    print(f"# bench_kernels.py: {', '.join(f'{k} {v}' for k, v in info.items())}")
    print(f"\nCommand: `{' '.join(['python', *sys.argv])}`\n")
    env.copy_bw = copy_bandwidth(env)
    print(f"Copy bandwidth (y.copy_(x), bytes read + written): {env.copy_bw / 1e9:.1f} GB/s\n")
    t0 = time.perf_counter()
    benches = (bench_stats, bench_histograms, bench_model, bench_thumbnails)
    benches += (bench_stats_chunks, bench_hist_programs)  # GPU tuning sweeps (Triton only)
    for bench in benches:
        bench(env)
        if env.cuda:
            torch.cuda.empty_cache()
    print(report(env))
    results = targets(env)
    for t in results:
        shown = "—" if t["value"] is None else f"{t['value']:.3g}"
        print(f"- {t['verdict']}: {t['target']} ({t['measure']}: {shown})")
    wrong = [r for r in env.rows if r["check"] != "ok"]
    print(f"\n{len(env.rows)} results, {len(wrong)} wrong; {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            doc = dict(machine=info, argv=sys.argv, copy_bytes_per_s=env.copy_bw)
            json.dump(doc | dict(rows=env.rows, targets=results), f, indent=1)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
