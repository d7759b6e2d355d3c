"""``benchmarks/bench_kernels.py``'s chunk-length sweep: every length and the one
``chunk_blocks_for`` picks are timed on the same tensors, checked, and shown in one table.

On the GPU the sweep runs on the largest cases; here the Triton kernel runs under the
interpreter on small tensors, so the sweep's code is exercised before a GPU session needs it.
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


def test_chunk_sweep_times_every_length_and_the_chosen_one(bench, monkeypatch):
    monkeypatch.setattr(bench, "CHUNK_SWEEP", (1, 2))
    monkeypatch.setattr(bench, "host_median", lambda fn, **kw: (fn(), 1e-3)[1])
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


def test_chunk_sweep_needs_the_triton_backend(bench):
    env = _env(bench, ["torch"])
    bench.bench_stats_chunks(env, [("x", [torch.randn(10)], 40)])
    assert env.rows == []
