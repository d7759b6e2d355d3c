"""``benchmarks/bench_kernels.py``'s GPU tuning sweeps (kernels_bench_sweeps.py): every
launch shape is timed on the same inputs, checked, and shown in one table.

On the GPU the sweeps run on the largest cases; here the Triton kernels run under the
interpreter on small tensors, so the sweeps' code is exercised before a GPU session needs it.
"""

from pathlib import Path

import pytest
import torch

from tests.scripts import loaded_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"

pytestmark = pytest.mark.interpreter


@pytest.fixture(scope="module")
def bench():
    with loaded_script(SCRIPT, "bench_kernels_under_test") as mod:
        yield mod


def _env(bench, backends):
    env = bench.Env(device=torch.device("cpu"), backends=backends, **bench.make_plan("cpu", True))
    env.copy_bw = 1e10
    return env


@pytest.fixture
def sweeps(bench, monkeypatch):
    import kernels_bench_sweeps  # next to the script, on sys.path once it is loaded

    monkeypatch.setattr(bench, "host_median", lambda fn, **kw: (fn(), 1e-3)[1])
    return kernels_bench_sweeps


def test_chunk_sweep_times_every_length_and_the_chosen_one(bench, sweeps, monkeypatch):
    monkeypatch.setattr(sweeps, "CHUNK_SWEEP", (1, 2))
    env = _env(bench, ["triton"])
    grads = [torch.randn(300), torch.randn(7, 9).to(torch.bfloat16)]
    cases = [("one fp32", [torch.randn(5000)], 20000), ("grads", grads, 1326)]
    bench.bench_stats_chunks(env, cases)
    rows = [r for r in env.rows if r["kernel"] == "stats_chunks"]
    assert [(r["case"], r["chunk"]) for r in rows] == [
        (case, chunk) for case, _, _ in cases for chunk in ("1", "2", "auto (16)")
    ]
    assert all(r["check"] == "ok" and r["backend"] == "triton" for r in rows)
    table = bench.report(env)
    assert "### tensor_stats by chunk length" in table
    assert "| one fp32 | auto (16) | triton |" in table


def test_histogram_sweep_times_every_grid_and_restores_the_default(bench, sweeps, monkeypatch):
    from tbprobe.kernels import triton_histogram

    monkeypatch.setattr(sweeps, "PROGRAM_SWEEP", (1, 4))
    default = triton_histogram.PROGRAMS_PER_SM
    grids = []
    launch = triton_histogram._programs

    def spy(*args):
        grids.append(triton_histogram.PROGRAMS_PER_SM)
        return launch(*args)

    monkeypatch.setattr(triton_histogram, "_programs", spy)
    env = _env(bench, ["triton"])
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    bench.bench_hist_programs(env, [("x", x, "tensorflow"), ("x", x, "64")])
    rows = [r for r in env.rows if r["kernel"] == "hist_programs"]
    shown = [f"{default} (default)" if p == default else str(p) for p in (1, 4)]
    assert [(r["bins"], r["programs"]) for r in rows] == [
        (b, p) for b in ("tensorflow", "64") for p in shown
    ]
    assert all(r["check"] == "ok" for r in rows)
    assert {1, 4} <= set(grids) and default == triton_histogram.PROGRAMS_PER_SM
    assert "### histogram by programs per SM" in bench.report(env)


def test_sweeps_need_the_triton_backend(bench):
    env = _env(bench, ["torch"])
    bench.bench_stats_chunks(env, [("x", [torch.randn(10)], 40)])
    bench.bench_hist_programs(env, [("x", torch.randn(10), "64")])
    assert env.rows == []
