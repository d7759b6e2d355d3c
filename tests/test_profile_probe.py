"""``benchmarks/profile_probe.py``: a tiny CPU run profiles each configuration, ranks the
operators per step, lists what the probe adds, and bad arguments exit 2 naming them."""

from pathlib import Path

import pytest

from tests.scripts import loaded_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_probe.py"


@pytest.fixture(scope="module")
def prof():
    with loaded_script(SCRIPT, "profile_probe_under_test") as mod:
        yield mod


def test_tiny_run_profiles_and_compares(prof, capsys):
    argv = ["--device", "cpu", "--quick", "--steps", "1", "--configs", "none,tbprobe", "--top", "4"]
    assert prof.main(argv) == 0
    out = capsys.readouterr().out
    assert "| none | " in out and "| tbprobe | " in out
    assert "### Top operators: tbprobe" in out
    added = out.split("### What tbprobe adds per step:")[1]
    rows = [line for line in added.splitlines() if line.startswith("| ") and "ms added" not in line]
    assert 1 <= len(rows) <= 4 and all(float(r.split(" | ")[1]) > 0 for r in rows)
    assert out.rstrip().splitlines()[-1].startswith("KEY: tbprobe norms + stats: ")


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--steps", "0"], "--steps"),
        (["--top", "0"], "--top"),
        (["--configs", "wandb"], "--configs"),
    ],
)
def test_bad_arguments_exit_2_naming_them(prof, capsys, argv, name):
    with pytest.raises(SystemExit) as e:
        prof.main(["--device", "cpu", *argv])
    assert e.value.code == 2 and name in capsys.readouterr().err
