"""Headless Chromium renders TensorBoard's scalars, histograms and images dashboards of a run.

Needs Debian's ``chromium`` on PATH (``bash scripts/install_chromium.sh``). The screenshots go
to the test's tmp dir; with ``TBPROBE_UPDATE_DOCS=1`` they are also copied to ``docs/``
(``docs/tensorboard-<page>.png``), which is how the README's pictures are refreshed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 1400, 1000
CHROMIUM_TIMEOUT_S = 180  # generous: a 2-core machine shared with other jobs
# Chromium's virtual time only advances while no request is pending, so the page gets this
# much page time after its data arrived, however slow the machine is.
VIRTUAL_TIME_BUDGET_MS = 15000
# The colours TensorBoard gives the demo's two runs: cnn #ff7043, transformer #0077bb.
RUN_COLOURS = np.array([[255, 112, 67], [0, 119, 187]])
# Page -> URL fragment. The scalars page is filtered to the gradient norms, where the
# explosion shows.
PAGES = {
    "scalars": "scalars&tagFilter=grad_norm",
    "histograms": "histograms",
    "images": "images",
}
# Measured on an empty logdir ("No ... data was found"): 454 distinct colours and 0 run-colour
# pixels in the main pane; with the probe run: >= 1000 colours and >= 1500 run-colour pixels
# (the images page, showing thumbnails, >= 4000 colours).
# The demo's snapshots use a 256-colour map (tbprobe.probe.render), so its images page has
# fewer distinct colours than the charts; there, at least MIN_COLORMAP_PIXELS pixels must show
# colour-map colours (the thumbnails themselves).
MIN_MAIN_COLOURS = {"scalars": 700, "histograms": 700, "images": 500}
MIN_COLORMAP_PIXELS = 20000
MIN_RUN_COLOUR_PIXELS = 300


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's ``chromium``; fails (not skips) when it is missing."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not on PATH: run `bash scripts/install_chromium.sh` (as root) first",
            pytrace=False,
        )
    return path


def _screenshot(chromium: str, url: str, out: Path, profile: Path) -> None:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
        f"--screenshot={out}",
        url,
    ]
    # its own process group, so that a timeout ends chromium's helper processes too
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"chromium took over {CHROMIUM_TIMEOUT_S} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0 and out.is_file(), (
        f"chromium failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    )


def _main_pane(png: Path) -> np.ndarray:
    """The dashboard's main pane of the screenshot (right of the sidebar, below the tag
    filter), ``(H, W, 3)`` int."""
    with Image.open(png) as im:
        assert im.size == (WIDTH, HEIGHT)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return rgb[140:, 360:]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_dashboard_renders_run(page, chromium, tensorboard_default, tmp_path):
    """Each dashboard page renders the run's charts or images, not an empty "no data" page."""
    out = tmp_path / f"tensorboard-{page}.png"
    _screenshot(chromium, f"{tensorboard_default.url}/#{PAGES[page]}", out, tmp_path / "profile")
    main = _main_pane(out)
    colours = len(np.unique(main.reshape(-1, 3), axis=0))
    near = np.abs(main[..., None, :].astype(int) - RUN_COLOURS).max(axis=-1) < 40  # (H, W, runs)
    run_pixels = int(near.any(axis=-1).sum())
    assert colours >= MIN_MAIN_COLOURS[page], (page, colours, out)
    assert run_pixels >= MIN_RUN_COLOUR_PIXELS, (page, run_pixels, out)
    if page == "images":
        from tbprobe.probe.render import colormap

        lut = colormap().astype(int)  # (256, 3)
        flat = main.reshape(-1, 3)
        dist = np.abs(flat[:, None, :] - lut[None, ::4, :]).max(axis=-1).min(axis=1)
        assert int((dist <= 6).sum()) >= MIN_COLORMAP_PIXELS, (page, out)
    if os.environ.get("TBPROBE_UPDATE_DOCS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(out, REPO / "docs" / out.name)
