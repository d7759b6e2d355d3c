"""Snapshot request files, the watcher that consumes them, the CLI and the SIGUSR1 hook."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from tbprobe.probe import requests as rq
from tbprobe.probe.requests import (
    MAX_REQUEST_BYTES,
    RequestWatcher,
    SnapshotRequest,
    install_sigusr1,
    parse_request,
    request_snapshot,
    run_snapshot_cli,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path):
    """A run directory, as a SummaryWriter leaves it: an event file in it."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"")
    return logdir


def _reqdir(logdir):
    return logdir / ".tbprobe" / "requests"


def _drop(logdir, body, name="00000000000000000001-x.json"):
    """A hand-written request file (bypassing request_snapshot's validation)."""
    d = _reqdir(logdir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
    return path


def _poll_until(watcher, count, timeout):
    """Poll with a deadline until ``count`` requests arrived; returns them and the wait."""
    t0 = time.monotonic()
    got = []
    while len(got) < count and time.monotonic() - t0 < timeout:
        got += watcher.poll()
        time.sleep(0.005)  # a polling step, not synchronisation: the deadline decides
    return got, time.monotonic() - t0


# ---------------------------------------------------------------------------- request files


@pytest.mark.parametrize(
    ("modules", "expected"),
    [(None, None), ("layer1.*", ("layer1.*",)), (["a.*", "b?"], ("a.*", "b?"))],
)
def test_round_trip(run, modules, expected):
    """A request written by request_snapshot parses back to the same modules and steps."""
    path = request_snapshot(run, modules=modules, steps=3)
    assert path.parent == _reqdir(run) and path.suffix == ".json"
    assert parse_request(path, run) == SnapshotRequest(expected, 3, str(path))
    assert [p.name for p in _reqdir(run).iterdir()] == [path.name]  # no temporary left


def test_request_names_sort_in_creation_order(run):
    """Request file names sort in the order the requests were made."""
    paths = [request_snapshot(run, steps=s) for s in range(1, 6)]
    assert sorted(p.name for p in paths) == [p.name for p in paths]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 101}, ValueError, "steps"),
        ({"steps": True}, TypeError, "steps"),
        ({"steps": 1.0}, TypeError, "steps"),
        ({"modules": 3}, TypeError, "modules"),
        ({"modules": ""}, ValueError, "modules"),
        ({"modules": ["a", 1]}, TypeError, "modules"),
        ({"modules": []}, ValueError, "modules"),
        ({"modules": ["x" * 250] * 20}, ValueError, "modules"),  # over 4 KiB as JSON
    ],
)
def test_request_snapshot_rejects_bad_arguments(run, kwargs, error, name):
    """Bad modules/steps raise ValueError/TypeError naming the argument, and write nothing."""
    with pytest.raises(error, match=name):
        request_snapshot(run, **kwargs)
    assert not _reqdir(run).exists()


def test_request_snapshot_rejects_non_run_dirs(tmp_path):
    """A missing directory, or one without an event file, is refused naming logdir."""
    with pytest.raises(ValueError, match="logdir: .* is not a directory"):
        request_snapshot(tmp_path / "missing")
    with pytest.raises(ValueError, match="logdir: .* not a run directory"):
        request_snapshot(tmp_path)
    with pytest.raises(TypeError, match="logdir"):
        request_snapshot(3)


def test_request_snapshot_refuses_symlinked_dir_outside(run, tmp_path):
    """A .tbprobe symlink pointing out of the log dir is refused, and nothing is created there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / ".tbprobe").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the log dir"):
        request_snapshot(run)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"x" * (MAX_REQUEST_BYTES + 1), "byte limit"),
        (b"{not json", "not a UTF-8 JSON"),
        (b"\xff\xfe", "not a UTF-8 JSON"),
        (b'{"version": 1, "modules": null, "steps": NaN}', "not a UTF-8 JSON"),
        ([1, 2], "expected a JSON object"),
        ({"version": 1, "steps": 1}, "expected a JSON object with keys"),
        ({"version": 1, "modules": None, "steps": 1, "cmd": "rm"}, "keys"),
        ({"version": 2, "modules": None, "steps": 1}, "version"),
        ({"version": True, "modules": None, "steps": 1}, "version"),
        ({"version": 1, "modules": None, "steps": 0}, "steps"),
        ({"version": 1, "modules": None, "steps": 101}, "steps"),
        ({"version": 1, "modules": None, "steps": "1"}, "steps"),
        ({"version": 1, "modules": None, "steps": 1.5}, "steps"),
        ({"version": 1, "modules": "a*", "steps": 1}, "modules"),
        ({"version": 1, "modules": [], "steps": 1}, "modules"),
        ({"version": 1, "modules": [7], "steps": 1}, "modules"),
    ],
)
def test_parse_request_rejects_bad_files(run, body, reason):
    """Oversized, non-JSON and off-schema request files raise ValueError saying why."""
    path = _drop(run, body)
    with pytest.raises(ValueError, match=reason):
        parse_request(path, run)


def test_parse_request_accepts_exactly_the_limit(run):
    """A valid request padded with whitespace to exactly the size limit is accepted."""
    body = json.dumps({"version": 1, "modules": ["a"], "steps": 2}).encode()
    path = _drop(run, body + b" " * (MAX_REQUEST_BYTES - len(body)))
    assert parse_request(path, run).steps == 2


def test_parse_request_refuses_paths_outside(run, tmp_path):
    """A file outside the log dir, directly or through a symlink, is refused."""
    outside = tmp_path / "evil.json"
    outside.write_text(json.dumps({"version": 1, "modules": None, "steps": 1}))
    with pytest.raises(ValueError, match="outside the log dir"):
        parse_request(outside, run)
    link = _reqdir(run)
    link.mkdir(parents=True)
    (link / "1-link.json").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the log dir"):
        parse_request(link / "1-link.json", run)
    with pytest.raises(ValueError, match="outside the log dir"):
        parse_request(run / ".." / "evil.json", run)


def test_parse_request_refuses_fifo_without_blocking(run):
    """A FIFO planted as a request is refused at once (opened non-blocking), not read."""
    _reqdir(run).mkdir(parents=True)
    fifo = _reqdir(run) / "1-fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        parse_request(fifo, run)


# ---------------------------------------------------------------------------- CLI


def test_cli_success_and_failures(run, tmp_path, capsys):
    """The CLI prints where the request went (exit 0); a bad logdir or steps exits 2."""
    args = SimpleNamespace(logdir=str(run), modules="conv*", steps=2)
    assert run_snapshot_cli(args) == 0
    out = capsys.readouterr().out
    (path,) = list(_reqdir(run).iterdir())
    assert str(path) in out and "conv*" in out
    assert parse_request(path, run).modules == ("conv*",)
    assert run_snapshot_cli(SimpleNamespace(logdir=str(tmp_path), modules=None, steps=1)) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert run_snapshot_cli(SimpleNamespace(logdir=str(run), modules=None, steps=0)) == 2
    assert "steps" in capsys.readouterr().err


# ---------------------------------------------------------------------------- watcher


def test_watcher_consumes_each_request_once(run):
    """Two watchers on one log dir hand out every request exactly once, then delete it."""
    a, b = RequestWatcher(run), RequestWatcher(run)
    paths = [request_snapshot(run, steps=s) for s in (1, 2, 3)]
    a.scan()
    b.scan()
    got = a.poll() + b.poll()
    assert sorted(r.steps for r in got) == [1, 2, 3]
    assert [r.path for r in sorted(got, key=lambda r: r.steps)] == [str(p) for p in paths]
    assert list(_reqdir(run).iterdir()) == []
    a.scan()
    b.scan()
    assert a.poll() == [] and b.poll() == []


def test_watcher_claim_wins_against_a_concurrent_scan(run, monkeypatch):
    """A watcher scanning while another is mid-parse does not get the same request again."""
    a, b = RequestWatcher(run), RequestWatcher(run)
    for s in (1, 2, 3):
        request_snapshot(run, steps=s)
    real = rq.parse_request
    nested = []

    def parse_then_let_b_scan(path, logdir):
        if not nested:  # while `a` holds its first request, `b` scans the directory
            nested.append(1)
            b.scan()
        return real(path, logdir)

    monkeypatch.setattr(rq, "parse_request", parse_then_let_b_scan)
    a.scan()
    got_a, got_b = a.poll(), b.poll()
    assert sorted(r.steps for r in got_a + got_b) == [1, 2, 3]
    assert [r.steps for r in got_a] == [1] and [r.steps for r in got_b] == [2, 3]


def test_watcher_bad_request_warns_once_and_is_removed(run):
    """A bad request file is removed with one warning; good ones around it still arrive."""
    request_snapshot(run, steps=4)
    _drop(run, b"garbage", name="00000000000000000002-bad.json")
    w = RequestWatcher(run)
    with pytest.warns(RuntimeWarning, match="ignored snapshot request .*bad.json"):
        w.scan()
    assert [r.steps for r in w.poll()] == [4]
    assert list(_reqdir(run).iterdir()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.scan()  # nothing left to warn about


def test_watcher_lists_only_when_directory_changes(run, monkeypatch):
    """Scans of an unchanged requests dir are one stat each; a new request triggers a listing."""
    d = _reqdir(run)
    d.mkdir(parents=True)
    old = time.time() - 60
    os.utime(d, (old, old))  # not "racy": its mtime is well in the past
    listings = []
    real = os.listdir
    monkeypatch.setattr(rq.os, "listdir", lambda p: listings.append(p) or real(p))
    w = RequestWatcher(run)
    for _ in range(5):
        w.scan()
    assert len(listings) == 1
    request_snapshot(run)
    w.scan()
    assert len(listings) == 2 and len(w.poll()) == 1


def test_watcher_picks_up_cli_request_from_another_process(run):
    """A request dropped by `tbprobe snapshot` in another process is polled within 1 s."""
    with RequestWatcher(run, interval=0.5) as w:
        cmd = [sys.executable, "-m", "tbprobe.cli", "snapshot", str(run), "--modules", "fc*"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        got, waited = _poll_until(w, 1, timeout=1.0)
    assert [(r.modules, r.steps) for r in got] == [(("fc*",), 1)], f"waited {waited:.2f}s"
    assert str(_reqdir(run)) in proc.stdout


def test_cli_subprocess_bad_logdir_exits_2(tmp_path):
    """`tbprobe snapshot` on a directory with no event file exits 2 with a clear message."""
    cmd = [sys.executable, "-m", "tbprobe.cli", "snapshot", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_watcher_close_is_prompt_and_idempotent(run):
    """close() stops a watcher sleeping a 30 s interval at once; twice is fine; restart refused."""
    w = RequestWatcher(run, interval=30).start()
    thread = w._thread
    assert thread.is_alive()
    t0 = time.monotonic()
    w.close()
    assert time.monotonic() - t0 < 1.0
    assert not thread.is_alive()
    w.close()
    with pytest.raises(RuntimeError, match="after close"):
        w.start()


@pytest.mark.parametrize(
    ("interval", "error"),
    [(0, ValueError), (-1, ValueError), (float("nan"), ValueError), ("1", TypeError)],
)
def test_watcher_rejects_bad_interval(run, interval, error):
    """interval must be a positive finite number of seconds."""
    with pytest.raises(error, match="interval"):
        RequestWatcher(run, interval=interval)


def test_forked_child_gets_an_inert_watcher(run):
    """A forked child has no watcher thread and sees no requests; the parent still gets them."""
    w = RequestWatcher(run, interval=0.05).start()
    try:
        request_snapshot(run, steps=7)
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
            pid = os.fork()
        if pid == 0:  # child: report, then leave without running the parent's cleanup
            try:
                names = [t.name for t in threading.enumerate()]
                ok = w.poll() == [] and "tbprobe-requests" not in names and w._thread is None
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"1"
        os.close(read)
        os.waitpid(pid, 0)
        got, _ = _poll_until(w, 1, timeout=5.0)
        assert [r.steps for r in got] == [7]
    finally:
        w.close()


# ---------------------------------------------------------------------------- SIGUSR1


@pytest.fixture
def sigusr1():
    """Restores whatever SIGUSR1 handler the test process had."""
    before = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, before)


def _wait_for(predicate, timeout=2.0):
    t0 = time.monotonic()
    while not predicate() and time.monotonic() - t0 < timeout:
        time.sleep(0.001)  # lets the main thread run the Python-level signal handler
    return predicate()


def test_sigusr1_calls_callback_and_chains(sigusr1):
    """SIGUSR1 calls the callback and then the handler installed before; restore puts it back."""
    calls = []

    def previous(signum, frame):
        calls.append("previous")

    signal.signal(signal.SIGUSR1, previous)
    restore = install_sigusr1(lambda: calls.append("armed"))
    os.kill(os.getpid(), signal.SIGUSR1)
    assert _wait_for(lambda: len(calls) == 2)
    assert calls == ["armed", "previous"]
    restore()
    assert signal.getsignal(signal.SIGUSR1) is previous
    restore()  # idempotent
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_sigusr1_failing_callback_warns(sigusr1):
    """A callback that raises is reported as a warning, never raised into the training loop."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("boom")

    restore = install_sigusr1(boom)
    with pytest.warns(RuntimeWarning, match="SIGUSR1 callback failed"):
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_for(lambda: calls == [1])
    restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_sigusr1_restore_leaves_a_later_handler_alone(sigusr1):
    """restore() after someone replaced our handler keeps theirs and disables ours."""
    calls = []
    restore = install_sigusr1(lambda: calls.append("ours"))
    ours = signal.getsignal(signal.SIGUSR1)
    later = lambda signum, frame: calls.append("later")  # noqa: E731
    signal.signal(signal.SIGUSR1, later)
    restore()
    assert signal.getsignal(signal.SIGUSR1) is later
    ours(signal.SIGUSR1, None)  # a chain that still calls ours: now a no-op
    assert calls == []


def test_sigusr1_argument_and_thread_errors(sigusr1):
    """A non-callable is a TypeError; installing off the main thread is a RuntimeError."""
    with pytest.raises(TypeError, match="callback"):
        install_sigusr1(3)
    errors = []

    def worker():
        try:
            install_sigusr1(lambda: None)
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert len(errors) == 1 and "main thread" in errors[0]
