"""GPU tuning sweeps of bench_kernels.py: the same Triton kernel timed at several launch
shapes, side by side on the same inputs, so that a GPU session sees which one to keep.

- ``stats_chunks``: ``tensor_stats`` at each chunk length (loop steps of 2048 elements a
  program reads) and at the one ``chunk_blocks_for`` picks ("auto").
- ``hist_programs``: ``histogram`` with ``PROGRAMS_PER_SM`` programs per SM (the grid; the
  default marked), on the 10M fp32 TensorBoard-bins case and the largest fp32 64-bin one.

Both need the Triton backend (on CPU only under the interpreter, in the tests); each result
is checked once, at the default launch shape.
"""

from __future__ import annotations

import torch
from kernels_bench_cases import (
    BINS,
    MiB,
    check_hist,
    check_stats,
    forced_backend,
    label,
    make,
    model_grads,
)

from tbprobe import kernels

CHUNK_SWEEP = (16, 32, 64, 128, 256, 512)  # loop steps of 2048 elements per program
PROGRAM_SWEEP = (2, 4, 8, 16, 32)  # programs per SM of a histogram launch


def bench_stats_chunks(env, cases=None) -> None:
    """``stats_chunks`` rows on the largest stats case of each dtype and the model's
    gradients (``cases``: ``[(label, tensors, bytes)]`` instead)."""
    if "triton" not in env.backends:
        return
    from tbprobe.kernels import triton_stats

    if cases is None:
        largest = dict(sorted(env.sizes, key=lambda dn: dn[1]))  # dtype -> its largest size
        big = [(d, n) for d, n in largest.items() if n * d.itemsize >= 64 * MiB]
        cases = [(label(d, n), [x := make((n,), d, env.device)], x.nbytes) for d, n in big]
        flat, grads = model_grads(env.model, env.device)
        cases.append(
            (f"{len(grads)} bf16 gradients, {flat.numel() / 1e6:,.1f}M", grads, flat.nbytes)
        )
    for case, tensors, nbytes in cases:
        total = sum(t.numel() for t in tensors)
        auto = triton_stats.chunk_blocks_for(total, triton_stats.sm_count(tensors[0].device))
        check = check_stats(tensors, triton_stats._tensor_stats(tensors))
        for cb in (*CHUNK_SWEEP, None):
            t = env.time(lambda ts=tensors, cb=cb: triton_stats._tensor_stats(ts, chunk_blocks=cb))
            chunk = f"auto ({auto})" if cb is None else str(cb)
            env.add("stats_chunks", case, "triton", t, nbytes, check, chunk=chunk)


def bench_hist_programs(env, cases=None) -> None:
    """``hist_programs`` rows (``cases``: ``[(label, tensor, bins name)]`` instead)."""
    if "triton" not in env.backends:
        return
    from tbprobe.kernels import triton_histogram as th

    if cases is None:
        fp32 = max(n for d, n in env.sizes if d == torch.float32)
        cases = [(label(torch.float32, n), make((n,), torch.float32, env.device, seed=1), b)
                 for n, b in ((10_000_000, "tensorflow"), (fp32, "64"))]  # fmt: skip
    default = th.PROGRAMS_PER_SM
    for case, x, name in cases:
        bins = next(b for n, b, _ in BINS if n == name)
        with forced_backend("triton"):
            check = check_hist(x, kernels.histogram(x, bins), bins, full=env.cuda)
            for per_sm in PROGRAM_SWEEP:
                th.PROGRAMS_PER_SM = per_sm
                try:
                    t = env.time(lambda x=x, bins=bins: kernels.histogram(x, bins))
                finally:
                    th.PROGRAMS_PER_SM = default
                shown = f"{per_sm} (default)" if per_sm == default else str(per_sm)
                env.add("hist_programs", case, "triton", t, x.nbytes, check, bins=name,
                        programs=shown)  # fmt: skip
