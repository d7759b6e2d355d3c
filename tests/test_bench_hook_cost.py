"""``benchmarks/bench_hook_cost.py``: a tiny run prints one line per schedule, and bad
arguments exit 2 naming the argument."""

from pathlib import Path

import pytest

from tests.scripts import loaded_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_hook_cost.py"


@pytest.fixture(scope="module")
def bench():
    with loaded_script(SCRIPT, "bench_hook_cost_under_test") as mod:
        yield mod


def test_tiny_run_prints_every_schedule(bench, capsys):
    assert bench.main(["--layers", "2", "--steps", "5", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in bench.SCHEDULES:
        row = next(line for line in lines if line.startswith(name))
        assert row.rstrip().endswith("µs"), row


def test_probe_failures_are_not_timed_as_free(bench, monkeypatch):
    """A probe whose hooks failed would look cheap: measure refuses it."""

    class Broken:
        errors = [("forward", "0", RuntimeError("boom"))]

        def __init__(self, *a, **k):
            pass

        def detach(self):
            pass

    monkeypatch.setattr(bench, "Probe", Broken)
    with pytest.raises(RuntimeError, match="probe failed"):
        bench.measure(1, 5, dict(every=1))


@pytest.mark.parametrize("arg", ["--layers", "--steps", "--rounds"])
def test_bad_arguments_exit_2(bench, arg, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([arg, "0"])
    assert e.value.code == 2
    assert arg in capsys.readouterr().err
