"""Session fixtures: one probe run on disk, and the real TensorBoard serving it.

The run is a real ``tbprobe demo`` run (its CNN run, with the probe's tags, snapshots and the
anomaly report of the fine-tune explosion): ``build_run`` runs the demo into a log dir and
returns the :class:`RunSpec` of what the CNN run holds (``spec_from_events``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.probe_run import RunSpec, spec_from_events
from tests.e2e.tb_server import TensorBoard

RUN = "cnn"  # the demo's CNN run; the demo also writes "transformer"
RUNS = ["cnn", "transformer"]
READERS = {"rust": "true", "python": "false"}  # reader -> --load_fast (true: fail, no fallback)


def build_run(logdir: Path) -> RunSpec:
    """Run ``tbprobe demo`` into ``logdir``; return the spec of its run ``RUN``."""
    from tbprobe.demo import run_demo

    assert run_demo(str(logdir)) == 0
    return spec_from_events(logdir / RUN)


@pytest.fixture(scope="session")
def probe_run(tmp_path_factory) -> tuple[Path, RunSpec]:
    """``(logdir, spec)``: a demo's logdir (runs ``RUNS``), and what its run ``RUN`` holds."""
    logdir = tmp_path_factory.mktemp("e2e") / "logs"
    spec = build_run(logdir)
    return logdir, spec


def _served_steps(tb: TensorBoard, plugin: str, tag: str) -> list[int]:
    """The steps ``plugin`` serves for ``tag`` (each plugin's data route is named after it)."""
    served = tb.get_json(f"/data/plugin/{plugin}/{plugin}", run=RUN, tag=tag)
    if plugin in ("scalars", "histograms"):
        return [step for _, step, _ in served]
    return [entry["step"] for entry in served]


def _run_loaded(tb: TensorBoard, spec: RunSpec) -> bool:
    """True once every tag of ``spec`` is listed and serves its last step.

    A reader makes tags visible while it is still reading a file, so a listed tag is not yet a
    loaded one; the last step of every tag is.
    """
    wanted = {
        "scalars": spec.scalars,
        "histograms": spec.histograms,
        "images": spec.images,
        "text": spec.texts,
    }
    for plugin, series_by_tag in wanted.items():
        listed = tb.get_json(f"/data/plugin/{plugin}/tags").get(RUN, ())
        for tag, series in series_by_tag.items():
            if tag not in listed or series[-1][0] not in _served_steps(tb, plugin, tag):
                return False
    return True


@pytest.fixture(scope="session", params=sorted(READERS))
def tensorboard(request, probe_run, tmp_path_factory):
    """A ready ``TensorBoard`` serving ``probe_run`` with each reader: Rust and Python."""
    logdir, spec = probe_run
    log_path = tmp_path_factory.mktemp("tb") / f"tensorboard-{request.param}.log"
    with TensorBoard(logdir, log_path, load_fast=READERS[request.param]) as tb:
        tb.reader = request.param
        tb.wait_for(lambda: _run_loaded(tb, spec), "the last step of every tag of the run")
        yield tb


@pytest.fixture(scope="session")
def tensorboard_default(probe_run, tmp_path_factory):
    """A ready ``TensorBoard`` with its default reader (what users get), for screenshots."""
    logdir, spec = probe_run
    log_path = tmp_path_factory.mktemp("tb") / "tensorboard-default.log"
    with TensorBoard(logdir, log_path, load_fast="auto") as tb:
        tb.wait_for(lambda: _run_loaded(tb, spec), "the last step of every tag of the run")
        yield tb
