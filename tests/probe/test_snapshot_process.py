"""Snapshots of a running training process, asked for from outside: the CLI and SIGUSR1."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tbprobe.kernels.thumbnail import thumbnail_shape
from tbprobe.probe.render import render_snapshot
from tests.probe.util import read_run

REPO = Path(__file__).resolve().parents[2]
STEP_SECONDS = 0.6  # a step at least as long as the watcher's 0.5 s interval, like real jobs
STEPS = 9

TRAINER = f"""
import os, sys, time, torch
import tbprobe
torch.manual_seed(0)
logdir, signal_opt = sys.argv[1], sys.argv[2] == "signal"
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3, padding=1),
    torch.nn.Flatten(), torch.nn.Linear(6 * 16 * 16, 2),
)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
writer = tbprobe.SummaryWriter(logdir)
probe = tbprobe.Probe(model, writer, opt, every=1000, snapshot_signal=signal_opt)
for step in range({STEPS}):
    t0 = time.perf_counter()
    x = torch.randn(4, 3, 16, 16)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    with open(os.path.join(logdir, "step.txt.tmp"), "w") as f:
        f.write(str(step))
    os.replace(os.path.join(logdir, "step.txt.tmp"), os.path.join(logdir, "step.txt"))
    time.sleep(max(0.0, {STEP_SECONDS} - (time.perf_counter() - t0)))  # the job's own pace
probe.detach()
writer.close()
"""


def _start(logdir: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", TRAINER, str(logdir), mode], env=env)


def _wait_for_step(logdir: Path, at_least: int, proc, deadline_s: float = 60) -> int:
    deadline = time.monotonic() + deadline_s
    path = logdir / "step.txt"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the training process ended early"
        if path.exists() and int(path.read_text() or -1) >= at_least:
            return int(path.read_text())
        time.sleep(0.05)  # polling the child's progress, with a deadline
    raise AssertionError(f"the training process did not reach step {at_least}")


def _snapshot_steps(logdir: Path) -> dict[str, list[int]]:
    return {tag: sorted(series) for tag, series in read_run(str(logdir))["images"].items()}


def test_cli_request_to_a_running_process_writes_images_within_two_steps(tmp_path):
    """A training process runs; `tbprobe snapshot LOGDIR --modules 0` makes it write a decodable
    snapshot/0 image of the expected grid size within 2 steps of the request."""
    proc = _start(tmp_path, "files")
    try:
        _wait_for_step(tmp_path, 2, proc)
        cli = [sys.executable, "-m", "tbprobe.cli", "snapshot", str(tmp_path), "--modules", "0"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run(cli, check=True, env=env, timeout=60, capture_output=True)
        asked = int((tmp_path / "step.txt").read_text())  # the step running when it landed
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    images = read_run(str(tmp_path))["images"]
    assert set(images) == {"snapshot/0"}, set(images)
    ((step, proto),) = images["snapshot/0"].items()
    assert asked < step <= asked + 2, (asked, step)
    img = np.asarray(Image.open(io.BytesIO(proto.encoded_image_string)))
    shape = (4, 8, 16, 16)  # conv 0's output: a 3x3 grid of its 8 channels
    expected = render_snapshot(
        np.zeros(thumbnail_shape(shape, max_size=256), np.uint8),
        shape=shape,
        kind="conv",
        title="0",
        max_size=256,
    )
    assert img.shape == expected.shape and img.dtype == np.uint8


def test_sigusr1_snapshots_the_next_step_when_opted_in(tmp_path):
    """With snapshot_signal=True, SIGUSR1 to the training process snapshots every hooked
    module at the next step."""
    proc = _start(tmp_path, "signal")
    try:
        _wait_for_step(tmp_path, 2, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        asked = int((tmp_path / "step.txt").read_text())
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    steps = _snapshot_steps(tmp_path)
    assert set(steps) == {"snapshot/0", "snapshot/2", "snapshot/4"}, steps
    for tag, got in steps.items():
        assert len(got) == 1 and asked < got[0] <= asked + 2, (tag, asked, got)
