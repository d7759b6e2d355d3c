"""The prepared GPU check on the CPU: ``benchmarks/gpu_check.sh --dry-run --quick`` end to end,
and ``benchmarks/gpu_checks.py`` (its correctness step) directly, including that it fails when a
kernel or the writer's device path is wrong."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import loaded_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CHECKS = ROOT / "benchmarks" / "gpu_checks.py"
FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TBPROBE_KERNELS")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _script_steps() -> list[str]:
    """The step names of gpu_check.sh's STEPS list (comments excluded)."""
    text = SCRIPT.read_text()
    body = text[text.index("STEPS=(") : text.index("\n)\n", text.index("STEPS=("))]
    return re.findall(r'^\s+"(\w+) \d+"', body, flags=re.M)


@pytest.fixture(scope="module")
def gpu_checks():
    with loaded_script(CHECKS, "gpu_checks_under_test") as mod:
        yield mod


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """The dry run passes, writes summary.md/summary.json listing every step, keeps within the
    device tool's 8 files, and prints the summary table last."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--quick"],
        cwd=ROOT,
        env=_env(OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = _script_steps()
    assert steps == [
        "wheels",
        "environment",
        "gpu_checks",
        "probe_nosync",
        "bench_kernels",
        "bench_probe",
        "bench_diagnose",
        "bench_writer",
        "profile_probe",
    ]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True
    assert [s["name"] for s in summary["steps"]] == steps
    status = {s["name"]: s["status"] for s in summary["steps"]}
    skipped = {"wheels"}  # nothing to install in a dry run
    if not (ROOT / "benchmarks" / "bench_kernels.py").exists():
        skipped.add("bench_kernels")  # the step skips itself until its script lands
    assert status == {s: "SKIP" if s in skipped else "PASS" for s in steps}
    md = (out / "summary.md").read_text()
    for name in steps:
        assert re.search(rf"^\| {name} \| (PASS|SKIP) \| [\d.]+ s \| ", md, flags=re.M), name

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(FILE_NAME.match(f) for f in files), files
    assert {"summary.md", "summary.json", "steps.log", "gpu_checks.json"} <= set(files)
    checks = json.loads((out / "gpu_checks.json").read_text())
    assert checks["summary"]["ok"] and checks["summary"]["pass"] > 500

    lines = proc.stdout.rstrip("\n").splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("| step | status |"))
    assert lines[header + 1].startswith("|---")
    tail = lines[header + 2 :]
    assert [row.split(" | ")[0].lstrip("| ") for row in tail] == steps


def test_bad_argument_is_refused():
    """An unknown option exits 2 before running anything."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


class _Parsed(Exception):
    """Raised instead of running a benchmark once its command line has parsed."""


@pytest.mark.parametrize("quick", [False, True])
def test_gpu_command_lines_parse(tmp_path, monkeypatch, quick):
    """Every Python command the check runs on a GPU machine (not only in the dry run) is
    accepted by the script it calls: gpu_check.sh runs with a stand-in interpreter that only
    records its arguments, then each benchmark script's own parser reads them."""
    log = tmp_path / "calls.txt"
    shim = tmp_path / "python"
    shim.write_text('#!/bin/sh\nprintf \'%s\\n\' "$*" >> "$CALLS"\nexit 0\n')
    shim.chmod(0o755)
    args = ["bash", str(SCRIPT)] + (["--quick"] if quick else [])
    env = _env(OUT=str(tmp_path / "out"), CALLS=str(log), TBPROBE_SITE=str(tmp_path / "site"))
    env["PYTHON"] = str(shim)
    subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    calls = [c.split() for c in log.read_text().splitlines() if c.startswith("benchmarks/")]
    scripts = {c[0] for c in calls}
    want = {f"benchmarks/{n}.py" for n in ("gpu_checks", "bench_kernels", "bench_probe")}
    others = {"benchmarks/bench_diagnose.py", "benchmarks/bench_writer.py"}
    assert want | others | {"benchmarks/profile_probe.py"} == scripts
    orig = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(orig(self, args, namespace))  # an unknown option: SystemExit(2)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for script, *argv in calls:
        name = "gpu_cmd_" + Path(script).stem
        with loaded_script(ROOT / script, name) as mod, pytest.raises(_Parsed) as parsed:
            mod.main(argv)
        ns = vars(parsed.value.args[0])
        assert ns.get("device", "cuda") == "cuda" and ns.get("dry_run") in (None, False), script
        assert ns.get("quick", quick) == quick or script.endswith(("writer.py", "diagnose.py"))


def test_scripts_are_valid_shell():
    """Both scripts parse, pass shellcheck where it is installed, and `make gpu-check` runs the
    check."""
    for script in (SCRIPT, ROOT / "benchmarks" / "fetch_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", str(script)], check=True, timeout=60)
    made = subprocess.run(
        ["make", "--no-print-directory", "-n", "gpu-check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )
    assert made.stdout.strip() == "bash benchmarks/gpu_check.sh"


def test_units_in_processes(tmp_path):
    """The GPU run's layout, one process per unit, in a dry run: every unit reports, the
    GPU-only section is skipped, the 2^31 case's stand-in and the writer pass."""
    out = tmp_path / "checks.json"
    cmd = [sys.executable, str(CHECKS), "--dry-run", "--quick", "--jobs", "2", "--json", str(out)]
    for section in ("big", "nosync_kernels", "writer", "stats"):
        cmd += ["--only", section]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    units = {s["name"] for s in doc["sections"]}
    assert units == {"big:0/1", "nosync_kernels:0/1", "writer:0/1", "stats:0/2", "stats:1/2"}
    by_section = {}
    for c in doc["checks"]:
        by_section.setdefault(c["section"], []).append(c)
    assert [c["status"] for c in by_section["nosync_kernels"]] == ["skip"]
    assert len(by_section["big"]) == 6 and all(c["status"] == "pass" for c in by_section["big"])
    writer = by_section["writer"]
    assert sum(c["name"].startswith("read back: ") for c in writer) > 30
    assert all(c["status"] == "pass" for c in writer)


def test_dead_unit_is_a_failure(gpu_checks, tmp_path):
    """A unit process that dies is recorded as a failure with its output."""
    args = argparse.Namespace(dry_run=True, quick=True, unit_timeout=120)
    checks, sections, output = gpu_checks.run_unit_process("nosuch:0/1", args, str(tmp_path))
    assert [c["status"] for c in checks] == ["fail"]
    assert "died" in checks[0]["name"] and "KeyError" in checks[0]["detail"]
    assert sections[0]["fail"] == 1


def _run_in_process(gpu_checks, monkeypatch, tmp_path, *only):
    """gpu_checks.main in this process (so patches apply); returns (exit code, failed checks)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets it; restored after the test
    out = tmp_path / "checks.json"
    argv = ["--dry-run", "--quick", "--jobs", "1", "--json", str(out)]
    for section in only:
        argv += ["--only", section]
    rc = gpu_checks.main(argv)
    failed = [c for c in json.loads(out.read_text())["checks"] if c["status"] == "fail"]
    return rc, failed


def test_wrong_stats_are_caught(gpu_checks, monkeypatch, tmp_path):
    """A tensor_stats that miscounts by one element fails every stats check."""
    real = gpu_checks.kernels.tensor_stats

    def off_by_one(tensors):
        rows = real(tensors).clone()
        rows[:, 0] += 1
        return rows

    monkeypatch.setattr(gpu_checks.kernels, "tensor_stats", off_by_one)
    rc, failed = _run_in_process(gpu_checks, monkeypatch, tmp_path, "stats")
    assert rc == 1 and len(failed) > 100
    assert all("count" in c["detail"] for c in failed)


def test_big_case_needs_every_element(gpu_checks, monkeypatch, tmp_path):
    """Reading only the first 2^k elements of the big tensor (the tail past them dropped, as a
    32-bit offset overflow would) fails the stats check."""
    real = gpu_checks.kernels.tensor_stats
    monkeypatch.setattr(gpu_checks.kernels, "tensor_stats", lambda ts: real([t[:4096] for t in ts]))
    rc, failed = _run_in_process(gpu_checks, monkeypatch, tmp_path, "big")
    assert rc == 1 and {c["name"].split("/")[-1] for c in failed} == {"tensor_stats"}


def test_wrong_histogram_is_caught(gpu_checks, monkeypatch, tmp_path):
    """One count moved to the next bin fails the histogram checks of non-empty inputs."""
    real = gpu_checks.kernels.histogram

    def shifted(x, bins="tensorflow", range=None):  # noqa: A002 - the kernel's own names
        h = real(x, bins, range)
        counts = h.counts.clone()
        nz = torch.nonzero(counts).flatten()
        if nz.numel() and nz[-1] + 1 < counts.numel():
            counts[nz[-1]] -= 1
            counts[nz[-1] + 1] += 1
        return type(h)(counts, h.edges, h.stats)

    monkeypatch.setattr(gpu_checks.kernels, "histogram", shifted)
    rc, failed = _run_in_process(gpu_checks, monkeypatch, tmp_path, "histogram")
    assert rc == 1 and len(failed) > 100
    assert all("counts differ" in c["detail"] for c in failed)


def test_wrong_thumbnail_is_caught(gpu_checks, monkeypatch, tmp_path):
    """A thumbnail two grey levels off in one pixel fails."""
    real = gpu_checks.kernels.thumbnail

    def off(x, **kw):
        img = real(x, **kw).clone()
        img[0, 0] = (int(img[0, 0]) + 2) % 256
        return img

    monkeypatch.setattr(gpu_checks.kernels, "thumbnail", off)
    rc, failed = _run_in_process(gpu_checks, monkeypatch, tmp_path, "thumbnail")
    assert rc == 1 and len(failed) > 50
    assert all("more than 1 level off" in c["detail"] for c in failed)


def test_writer_device_path_divergence_is_caught(monkeypatch, gpu_checks, tmp_path):
    """Device-path images that differ from the host path's fail the read-back comparison."""
    from tbprobe.writer import image

    real = image.scale_to_uint8_torch

    def brighter(tensor, name="img_tensor"):
        return real(tensor, name).clamp(max=254) + 1

    monkeypatch.setattr(image, "scale_to_uint8_torch", brighter)
    rc, failed = _run_in_process(gpu_checks, monkeypatch, tmp_path, "writer")
    assert rc == 1
    assert {c["name"].split(" step")[0] for c in failed} == {
        f"read back: i/{t}" for t in ("chw_fp32", "hw_u8", "hwc_bf16", "nchw_fp32", "nhwc_u8")
    }
