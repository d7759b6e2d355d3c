"""Durability of the event writer (DESIGN.md "Failure policy"): latency to the OS, exits and
signals, SIGKILL, fork and spawn, write failures, barriers and back-pressure, path safety, and
the reader's reports of damaged files.

Anything that kills, signals or forks runs in a child interpreter with a timeout. No sleep is
used to synchronise: waits poll an observable condition with a deadline.
"""

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from tbprobe import SummaryWriter
from tbprobe.writer import EventFileError, event_file, read_events
from tbprobe.writer.reader import event_files
from tbprobe.writer.record import FOOTER_SIZE, HEADER_SIZE, scalar_event, scalar_head

from .conftest import accumulate

PY = sys.executable
CHILD_TIMEOUT = 30  # seconds; a child that needs longer has hung
LATENCY_BOUND = 0.1  # seconds from add_* to the OS (DESIGN.md)
# SIGKILL loses at most ~LATENCY_BOUND of events; the slack absorbs scheduler noise on a loaded
# 2-CPU box (two busy threads in the child, plus this process).
KILL_LOSS_BOUND = LATENCY_BOUND + 0.1


# ---------------------------------------------------------------------------------- helpers
def _steps(path, tag, errors="raise"):
    """Steps of ``tag``'s events in a file or run directory, in file order."""
    return [
        ev.step for ev in read_events(path, errors=errors) for v in ev.summary.value if v.tag == tag
    ]


def _tags(path):
    return {v.tag for ev in read_events(path, errors="raise") for v in ev.summary.value}


def _wait_until(cond, timeout=5.0, what="condition"):
    """Poll ``cond`` every 2 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def _run(script, *args, timeout=CHILD_TIMEOUT):
    return subprocess.run(
        [PY, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _popen(script, *args, **kw):
    return subprocess.Popen([PY, "-c", textwrap.dedent(script), *map(str, args)], **kw)


def _reap(p):
    if p.poll() is None:
        p.kill()
        p.wait(CHILD_TIMEOUT)


def _fill_disk(w):
    """Point the writer's main file descriptor at /dev/full: every write fails with ENOSPC."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, w._writer._files[None].fd)
    finally:
        os.close(full)


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


# ---------------------------------------------------------------------------------- latency
def test_record_reaches_os_within_100ms_without_flush(logdir):
    """A scalar is readable from the file within 100 ms of add_scalar, without flush."""
    rng = random.Random(0)
    w = SummaryWriter(logdir)
    try:
        path = w._writer.path
        for step in range(1, 6):
            time.sleep(rng.uniform(0, 0.05))  # land at different phases of the writer's tick
            size = os.path.getsize(path)
            t0 = time.monotonic()
            w.add_scalar("x", float(step), step)
            while os.path.getsize(path) == size or step not in _steps(path, "x", "ignore"):
                assert time.monotonic() - t0 < 0.5, f"step {step} not in the file after 0.5 s"
                time.sleep(0.001)
            latency = time.monotonic() - t0
            assert latency < LATENCY_BOUND, f"step {step} took {latency * 1e3:.0f} ms"
    finally:
        w.close()


# ---------------------------------------------------------------------------------- exits
EXIT_CHILD = """
import sys
from tbprobe import SummaryWriter
logdir, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
w = SummaryWriter(logdir)
for i in range(n):
    w.add_scalar("x", float(i), i)
print(n, flush=True)
if how == "raise":
    raise RuntimeError("uncaught")
"""


@pytest.mark.parametrize("how", ["return", "raise"])
def test_exit_loses_nothing(logdir, how):
    """A normal exit or an uncaught exception, with no flush/close, keeps every logged event."""
    r = _run(EXIT_CHILD, logdir, 20000, how)
    assert r.returncode == (0 if how == "return" else 1), r.stderr
    if how == "raise":
        assert "RuntimeError: uncaught" in r.stderr
    n = int(r.stdout)
    assert _steps(logdir, "x") == list(range(n))


SIGTERM_CHILD = """
import os, signal, sys
from tbprobe import SummaryWriter
logdir, marker = sys.argv[1], sys.argv[2]
n = 0
if marker != "-":  # a handler the program installed before the writer existed
    def on_term(signum, frame):
        with open(marker, "w") as f:
            f.write(str(n))
        os._exit(7)  # no atexit: only the writer's SIGTERM flush can have saved the events
    signal.signal(signal.SIGTERM, on_term)
w = SummaryWriter(logdir)
while True:
    w.add_scalar("x", float(n), n)
    n += 1
    print(n, flush=True)
"""


@pytest.mark.parametrize("chained", [False, True], ids=["default-handler", "own-handler"])
def test_sigterm_loses_nothing_and_chains(tmp_path, chained):
    """SIGTERM flushes every logged event, then runs the previous handler or dies by SIGTERM."""
    logdir = str(tmp_path / "run")
    marker = str(tmp_path / "marker") if chained else "-"
    p = _popen(
        SIGTERM_CHILD, logdir, marker, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        last = 0
        deadline = time.monotonic() + CHILD_TIMEOUT
        while last < 3000:  # the child is logging in its loop
            line = p.stdout.readline()
            assert line, f"child ended early: {p.stderr.read()}"
            last = int(line)
            assert time.monotonic() < deadline, "child too slow"
        p.send_signal(signal.SIGTERM)
        out = p.stdout.read()  # to EOF, including what readline() buffered
        err = p.stderr.read()
        p.wait(CHILD_TIMEOUT)
    finally:
        _reap(p)
    logged = max([last, *map(int, out.split())])  # the child printed each count once logged
    steps = _steps(logdir, "x")
    assert steps == list(range(len(steps)))
    # everything logged is there; at most the one add_scalar the signal interrupted is extra
    assert logged <= len(steps) <= logged + 1
    if chained:
        assert p.returncode == 7, err
        with open(marker) as f:
            assert int(f.read()) <= len(steps)
    else:
        assert p.returncode == -signal.SIGTERM, err


# ---------------------------------------------------------------------------------- SIGKILL
def _tail_copy(path, directory, keep):
    """Copy the last ``keep`` whole records of ``path`` and any cut record after them into a new
    event file in ``directory``; returns the directory and how many scalar records it holds."""
    with open(path, "rb") as f:
        data = f.read()
    starts, off = [], 0
    while off + HEADER_SIZE <= len(data):
        (length,) = struct.unpack_from("<Q", data, off)
        if off + HEADER_SIZE + length + FOOTER_SIZE > len(data):
            break
        starts.append(off)
        off += HEADER_SIZE + length + FOOTER_SIZE
    k = max(0, len(starts) - keep)
    directory.mkdir()
    (directory / os.path.basename(path)).write_bytes(data[starts[k] if starts else 0 :])
    n_scalars = len(starts) - k - (k == 0 and len(starts) > 0)  # record 0: file_version
    return str(directory), n_scalars


KILL_CHILD = """
import sys, time
from tbprobe import SummaryWriter
logdir, paced, marks_path = sys.argv[1], sys.argv[2] == "paced", sys.argv[3]
w = SummaryWriter(logdir)
marks = open(marks_path, "w")
every = 16 if paced else 1024  # a mark's write releases the GIL: rarely when tight
i = 0
while True:
    w.add_scalar("x", float(i), i)
    i += 1
    if i % every == 0:  # "by wall time t, i events had been logged"
        marks.write(f"{time.time()!r} {i}\\n")
        marks.flush()
        if paced:  # a training step waiting on its device, GIL released: ~20k events/s
            time.sleep(0.0005)
"""


KILL_TRIES = 3  # kills per case before a loss above the bound fails it (see below)


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_leaves_a_readable_file_and_loses_at_most_100ms(tmp_path, seed):
    """After SIGKILL both readers read every whole record (only a truncated tail may follow) and
    at most ~100 ms of events are missing.

    The loss is a timing property: a VM that stalls the child for a few hundred ms right before
    the kill (seen once in a few full CI runs, never alone or under CPU or disk load) exceeds
    it without any fault of the writer. So a case is killed again, at a new random point, when
    the loss alone is above the bound, up to KILL_TRIES times; a writer that cannot keep the
    bound fails every try. The file checks hold on every try."""
    rng = random.Random(seed)
    tight = seed % 3 == 2  # a producer that never pauses, the writer thread's worst case
    losses = []
    for attempt in range(KILL_TRIES):
        loss = _kill_once(tmp_path / f"try{attempt}", tight, rng.uniform(0.05, 0.5))
        if loss is None:
            return
        losses.append(loss)
    bound = f"{KILL_LOSS_BOUND * 1e3:.0f} ms"
    pytest.fail(f"over the {bound} bound on all {KILL_TRIES} kills: {losses}")


def _kill_once(tmp_path, tight: bool, delay: float) -> str | None:
    """Start a logging child, SIGKILL it after ``delay`` s, check its file (asserts); None if
    at most KILL_LOSS_BOUND of events were lost, else what was lost."""
    tmp_path.mkdir()
    logdir, marks_path = str(tmp_path / "run"), str(tmp_path / "marks")
    mode = "tight" if tight else "paced"
    p = _popen(KILL_CHILD, logdir, mode, marks_path, stderr=subprocess.PIPE)
    try:
        _wait_until(
            lambda: (
                p.poll() is not None
                or (os.path.exists(marks_path) and os.path.getsize(marks_path) > 0)
            ),
            CHILD_TIMEOUT,
            "the child to start logging",
        )
        assert p.poll() is None, p.stderr.read()
        time.sleep(delay)  # the random kill point
        t_kill = time.time()
        p.kill()
        p.wait(CHILD_TIMEOUT)
    finally:
        _reap(p)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()

    (path,) = event_files(logdir)
    steps = []
    try:
        for ev in read_events(path, errors="raise"):
            steps += [ev.step for v in ev.summary.value if v.tag == "x"]
    except EventFileError as e:  # a kill mid-write may cut the last record; nothing else
        assert "truncated" in e.reason, e
        assert e.path == path
    assert steps == list(range(len(steps)))

    # TensorBoard reads the same whole records. Its pure-Python CRC costs ~30 us a record, so a
    # long file is checked through a copy of its tail (records are self-delimiting; ours read
    # the whole file strictly above).
    ea_dir, tail = _tail_copy(path, tmp_path / "tail", keep=20000)
    ea = accumulate(ea_dir)
    ea_steps = [s.step for s in ea.Scalars("x")] if "x" in ea.Tags()["scalars"] else []
    assert ea_steps == steps[len(steps) - tail :]

    with open(marks_path) as f:
        marks = [tuple(map(float, line.split())) for line in f if line.endswith("\n")]
    must_have = max((n for t, n in marks if t <= t_kill - KILL_LOSS_BOUND), default=0)
    lost_window = t_kill - max((t for t, n in marks if n <= len(steps)), default=marks[0][0])
    if len(steps) >= must_have:
        return None
    return (
        f"{len(steps)} events in the file, but {int(must_have)} were logged more than "
        f"{KILL_LOSS_BOUND * 1e3:.0f} ms before the kill (lost ~{lost_window * 1e3:.0f} ms)"
    )


# ---------------------------------------------------------------------------------- fork
FORK_CHILD = """
import json, os, sys, threading, time
from tbprobe import SummaryWriter
logdir, mode, n_child = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = SummaryWriter(logdir)
parent_path = w._writer.path
stop = threading.Event()
parent_n = [0]

def parent_logging():  # the parent keeps logging while the child lives
    i = 0
    while not stop.is_set():
        w.add_scalar("parent", float(i), i)
        i += 1
        parent_n[0] = i

def child_work():
    for i in range(n_child):
        w.add_scalar("child", float(i), i)
    # no flush or close: os.fork's child leaves through atexit, a multiprocessing child
    # through os._exit after its finalizers

t = threading.Thread(target=parent_logging)
t.start()
deadline = time.monotonic() + 20
while parent_n[0] < 2000 and time.monotonic() < deadline:
    time.sleep(0.001)
if mode == "os.fork":
    pid = os.fork()
    if pid == 0:
        child_work()
        sys.exit(0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            sys.exit("the forked child hung")
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
else:
    import multiprocessing as mp
    proc = mp.get_context("fork").Process(target=child_work)
    proc.start()
    proc.join(20)
    if proc.is_alive():
        proc.kill()
        proc.join()
        sys.exit("the forked child hung")
    pid, code = proc.pid, proc.exitcode
stop.set()
t.join()
for i in range(parent_n[0], parent_n[0] + 500):  # and goes on after the child is gone
    w.add_scalar("parent", float(i), i)
w.close()
print(json.dumps({"parent_path": parent_path, "child_pid": pid, "code": code,
                  "parent_n": parent_n[0] + 500}))
"""


@pytest.mark.parametrize("mode", ["os.fork", "mp-fork"])
def test_fork_child_writes_its_own_file(logdir, mode):
    """A forked child logging through an inherited writer writes a new file of its own (its pid
    in the name), does not hang, and leaves the concurrently written parent file intact."""
    n_child = 3000
    r = _run(FORK_CHILD, logdir, mode, n_child)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["code"] == 0
    parent_path, pid = info["parent_path"], info["child_pid"]
    files = event_files(logdir)
    child_files = [f for f in files if re.search(rf"\.{pid}\.\d+$", os.path.basename(f))]
    assert len(child_files) == 1, files
    (child_path,) = child_files
    assert child_path != parent_path and sorted(files) == sorted([parent_path, child_path])
    assert _steps(parent_path, "parent") == list(range(info["parent_n"]))
    assert _tags(parent_path) == {"parent"}
    assert _steps(child_path, "child") == list(range(n_child))
    assert _tags(child_path) == {"child"}


FORK_POOL_OWN_WRITERS = """
import json, multiprocessing as mp, os, sys
from tbprobe import SummaryWriter
W = None

def task(i):
    global W
    if W is None:  # each worker's own writer, in a run of its own; never closed by hand
        W = SummaryWriter(os.path.join(sys.argv[1], f"worker{os.getpid()}"))
        W.add_text("notes", "a worker", 0)
    for s in range(250):
        W.add_scalar("x", float(s), i * 1000 + s)
    return os.getpid()

if __name__ == "__main__":
    parent = SummaryWriter(os.path.join(sys.argv[1], "parent"))  # hooks predate the fork
    parent.add_text("notes", "the parent", 0)
    with mp.get_context("fork").Pool(2) as pool:
        pids = sorted(set(pool.map(task, range(8))))
        pool.close()
        pool.join()
    parent.close()
    print(json.dumps(pids))
"""


def test_fork_pool_workers_with_writers_of_their_own_lose_nothing(tmp_path):
    """Pool workers started by fork (the parent has a writer) each make their own writer and
    leave through the pool's normal end, without close(): their exit closes it, every scalar
    is there and each text keeps its plugin metadata. They used to lose everything (only
    the file header was written): no exit close was registered in a forked child."""
    r = _run(FORK_POOL_OWN_WRITERS, tmp_path, timeout=CHILD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    pids = json.loads(r.stdout)
    steps, plugins = [], set()
    for pid in pids:
        for ev in read_events(str(tmp_path / f"worker{pid}")):
            for v in ev.summary.value:
                if v.tag == "x":
                    steps.append(ev.step)
                else:
                    plugins.add((pid, v.tag, v.metadata.plugin_data.plugin_name))
    assert sorted(steps) == sorted(i * 1000 + s for i in range(8) for s in range(250))
    assert plugins == {(pid, "notes/text_summary", "text") for pid in pids}


THREAD_WRITER_SIGTERM = """
import sys, threading
from tbprobe import SummaryWriter
logdir = sys.argv[1]
box = []
t = threading.Thread(target=lambda: box.append(SummaryWriter(logdir)))  # made off the main thread
t.start()
t.join()
w, n = box[0], 0
while True:
    w.add_scalar("x", float(n), n)
    n += 1
    print(n, flush=True)
"""


def test_sigterm_flushes_a_writer_made_off_the_main_thread(tmp_path):
    """The first writer made in another thread cannot install the SIGTERM flush (signal
    handlers are the main thread's); the main thread's first write does. SIGTERM then loses
    nothing; it used to lose every event."""
    logdir = str(tmp_path / "run")
    p = _popen(
        THREAD_WRITER_SIGTERM, logdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        last, deadline = 0, time.monotonic() + CHILD_TIMEOUT
        while last < 2000:
            line = p.stdout.readline()
            assert line, f"child ended early: {p.stderr.read()}"
            last = int(line)
            assert time.monotonic() < deadline, "child too slow"
        p.send_signal(signal.SIGTERM)
        out = p.stdout.read()
        p.wait(CHILD_TIMEOUT)
    finally:
        _reap(p)
    assert p.returncode == -signal.SIGTERM
    logged = max([last, *map(int, out.split())])
    assert logged <= len(_steps(logdir, "x")) <= logged + 1


def test_metadata_goes_out_again_after_the_run_directory_is_deleted(tmp_path):
    """A run directory deleted while logging: the writer reopens a new file there, and the
    plugin metadata of tags it had already described goes into it again (TensorBoard keeps
    a tag's plugin from its metadata: without it the Text tab was empty)."""
    logdir = tmp_path / "run"
    w = SummaryWriter(str(logdir))
    w.add_text("notes", "before", 0)
    w.flush()
    shutil.rmtree(logdir)
    w.add_scalar("s", 1.0, 1)
    w.flush()  # the writer finds its file unlinked and opens a new one
    w.add_text("notes", "after", 2)
    w.close()
    got = [
        (ev.step, v.metadata.plugin_data.plugin_name)
        for ev in read_events(str(logdir))
        for v in ev.summary.value
        if v.tag == "notes/text_summary"
    ]
    assert got == [(2, "text")]


def test_an_unwritable_directory_counts_what_it_drops(tmp_path):
    """on_error="warn" with a log directory that cannot be made: a warning once, then every
    event logged is counted in dropped_events (it stayed 0)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        w = SummaryWriter(str(blocker / "run"), on_error="warn")
    w.add_scalar("x", 1.0, 0)
    w.add_text("t", "y", 0)
    assert w.dropped_events == 2
    w.close()


SPAWN_MAIN = """
import json, multiprocessing as mp, sys

def work(logdir, rank, n, barrier):
    from tbprobe import SummaryWriter
    barrier.wait(20)  # create the writers together: same second, same host
    w = SummaryWriter(logdir)
    for i in range(n):
        w.add_scalar(f"rank{rank}", float(i), i)
    # no close: the process's exit handlers close it

if __name__ == "__main__":
    logdir, n, procs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    ps = [ctx.Process(target=work, args=(logdir, r, n, barrier)) for r in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(25)
    print(json.dumps([[p.pid, p.exitcode] for p in ps]))
"""


def test_spawned_writers_do_not_collide(tmp_path):
    """Writers created at the same moment in spawned processes write separate, complete files."""
    # spawn re-imports the main module, so this script is a file rather than "-c"
    script = tmp_path / "spawn_main.py"
    script.write_text(textwrap.dedent(SPAWN_MAIN))
    logdir, n, procs = str(tmp_path / "run"), 2000, 3
    r = subprocess.run(
        [PY, str(script), logdir, str(n), str(procs)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    children = json.loads(r.stdout)
    assert [code for _, code in children] == [0] * procs, r.stderr
    files = event_files(logdir)
    assert len(files) == procs
    for rank, (pid, _) in enumerate(children):
        (path,) = [f for f in files if re.search(rf"\.{pid}\.\d+$", f)]
        assert _tags(path) == {f"rank{rank}"}
        assert _steps(path, f"rank{rank}") == list(range(n))


# ---------------------------------------------------------------------------------- failures
@needs_dev_full
@pytest.mark.parametrize("surface", ["add", "flush", "close"])
def test_full_disk_raises_enospc(logdir, surface):
    """With on_error="raise" a full disk never blocks add_scalar and surfaces the original
    ENOSPC OSError on the next add_*/flush/close."""
    w = SummaryWriter(logdir, on_error="raise", max_queue_bytes=1 << 16)
    _fill_disk(w)
    t0 = time.monotonic()
    for i in range(100):
        w.add_scalar("x", float(i), i)
    assert time.monotonic() - t0 < 1.0
    try:
        with pytest.raises(OSError) as info:
            if surface == "add":
                _wait_until(lambda: w._writer._error is not None, 5, "the write error")
                w.add_scalar("x", 0.0, 100)
            elif surface == "flush":
                w.flush()
            else:
                w.close()
        assert info.value.errno == errno.ENOSPC
    finally:
        with contextlib.suppress(OSError):  # fsync on /dev/full fails too
            w.close()


@needs_dev_full
def test_full_disk_warns_once_and_counts_dropped(logdir):
    """With on_error="warn" a full disk warns once, never blocks logging and counts every
    dropped event."""
    w = SummaryWriter(logdir, on_error="warn", max_queue_bytes=1 << 16)
    _fill_disk(w)
    n = 30000  # ~1 MB: well past max_queue_bytes, so back-pressure meets the failing writes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        for i in range(n):
            w.add_scalar("x", float(i), i)
        w.flush()
        for i in range(n, n + 100):
            w.add_scalar("x", float(i), i)
        w.flush()
        assert time.monotonic() - t0 < 5.0
        assert w.dropped_events == n + 100
        w.close()
    ours = [c for c in caught if "tbprobe" in str(c.message)]
    assert len(ours) == 1, [str(c.message) for c in ours]
    assert issubclass(ours[0].category, RuntimeWarning)
    assert os.strerror(errno.ENOSPC) in str(ours[0].message)
    assert w.dropped_events >= n + 100


@needs_dev_full
def test_dropped_events_counts_the_final_drain(logdir):
    """Events still queued at close() and dropped by its final drain count in dropped_events."""
    w = SummaryWriter(logdir, on_error="warn")
    _fill_disk(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(100):
            w.add_scalar("x", float(i), i)
        w.close()  # no flush before: the 100 events are dropped by close's own drain
    assert w.dropped_events == 100


def test_deleted_run_directory_starts_a_new_file(logdir):
    """Deleting the run directory while logging makes the writer start a new file: no event
    logged after the deletion is lost."""
    w = SummaryWriter(logdir)
    for i in range(1000):
        w.add_scalar("x", float(i), i)
    w.flush()
    removed = threading.Event()

    def remove():
        shutil.rmtree(logdir, ignore_errors=True)  # races the writer re-creating it
        removed.set()

    t = threading.Thread(target=remove)
    i, first_after = 1000, None
    t.start()
    while first_after is None or i < first_after + 3000:
        if first_after is None and removed.is_set():
            first_after = i
        w.add_scalar("x", float(i), i)
        i += 1
        assert i < 50_000_000, "rmtree never finished"
    t.join()
    w.close()
    steps = set(_steps(logdir, "x"))
    assert not [s for s in range(first_after, i) if s not in steps]


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_unwritable_logdir(tmp_path, on_error):
    """A log_dir that cannot be created raises OSError from the constructor ("raise") or warns
    and drops events ("warn")."""
    blocker = tmp_path / "file"  # tests run as root: a path under a regular file is unwritable
    blocker.write_text("")
    logdir = str(blocker / "sub")
    if on_error == "raise":
        with pytest.raises(NotADirectoryError):
            SummaryWriter(logdir, on_error="raise")
    else:
        with pytest.warns(RuntimeWarning, match="cannot write"):
            w = SummaryWriter(logdir, on_error="warn")
        w.add_scalar("x", 1.0, 1)
        w.flush()
        w.close()
    assert os.listdir(tmp_path) == ["file"]


# ---------------------------------------------------------------------------------- barriers
def test_flush_is_a_barrier(logdir):
    """After flush() returns, read_events sees every event added before it, and nothing torn."""
    rng = random.Random(1)
    with SummaryWriter(logdir) as w:
        n = 0
        for _ in range(20):
            for _ in range(rng.randrange(1, 1000)):
                w.add_scalar("x", float(n), n)
                n += 1
            w.flush()
            assert _steps(w._writer.path, "x") == list(range(n))


def test_close_is_idempotent_and_add_after_close_opens_a_new_file(logdir):
    """close() twice is harmless; an add_* after close() writes to a new, complete file."""
    w = SummaryWriter(logdir)
    w.add_scalar("x", 0.0, 1)
    first = w._writer.path
    w.close()
    w.close()
    w.flush()
    w.add_scalar("x", 1.0, 2)
    second = w._writer.path
    w.close()
    w.close()
    assert first != second
    assert event_files(logdir) == sorted([first, second])
    assert _steps(first, "x") == [1]
    assert _steps(second, "x") == [2]
    assert next(read_events(second, errors="raise")).file_version == "brain.Event:2"


def test_backpressure_waits_instead_of_dropping(logdir, monkeypatch):
    """With a slow disk and max_queue_bytes=65536 the producer waits rather than drops, and the
    queue never holds more than the bound plus one event."""
    bound, n = 1 << 16, 20000
    one_event = len(scalar_event(scalar_head("x"), 0.0, time.time(), n))
    w = SummaryWriter(logdir, max_queue_bytes=bound)
    aw = w._writer
    seen_by_writer = []
    real_write = os.write

    def slow_write(fd, data):
        time.sleep(0.001)
        seen_by_writer.append(aw._bytes_in - aw._bytes_out)
        return real_write(fd, data)

    waits = []
    real_wait = aw._wait_for_space

    def counting_wait():
        waits.append(aw._bytes_in - aw._bytes_out)
        return real_wait()

    monkeypatch.setattr(event_file.os, "write", slow_write)
    monkeypatch.setattr(aw, "_wait_for_space", counting_wait)
    seen_by_producer = 0
    for i in range(n):
        w.add_scalar("x", float(i), i)
        seen_by_producer = max(seen_by_producer, aw._bytes_in - aw._bytes_out)
    w.close()
    assert waits, "the producer never waited"
    assert max(waits) <= bound + one_event
    assert seen_by_producer <= bound + one_event
    assert max(seen_by_writer) <= bound + one_event
    assert w.dropped_events == 0
    assert _steps(logdir, "x") == list(range(n))


def test_blocked_disk_does_not_slow_the_producer(logdir, monkeypatch):
    """A writer blocked in os.write (a hung disk) costs the producer at most one tick of waiting
    below max_queue_bytes, and everything is written once the disk comes back."""
    n = 50000  # ~2 MB: far below the default bound, far above the producer's lag check
    w = SummaryWriter(logdir)
    gate = threading.Event()
    real_write = os.write

    def blocked_write(fd, data):
        gate.wait(CHILD_TIMEOUT)
        return real_write(fd, data)

    monkeypatch.setattr(event_file.os, "write", blocked_write)
    try:
        t0 = time.monotonic()
        for i in range(n):
            w.add_scalar("x", float(i), i)
        elapsed = time.monotonic() - t0
    finally:
        gate.set()
    w.close()
    assert elapsed < 0.5 + n * 5e-6, f"{n} add_scalar calls took {elapsed:.2f} s"
    assert _steps(logdir, "x") == list(range(n))


# ---------------------------------------------------------------------------------- paths
ESCAPES = [
    "../escape",
    "../../escape",
    "../../../escape",
    "..\\..\\escape",
    "{abs}",
    "/tmp/../{abs}",
    "a\x00b/../../c",
    "..",
    ".",
    "\x00",
]


def _escape_name(template, tmp_path):
    return template.format(abs=str(tmp_path / "abs_escape"))


@pytest.mark.parametrize("name", ESCAPES, ids=repr)
@pytest.mark.parametrize(
    "method",
    [
        "add_scalar",
        "add_scalars-main_tag",
        "add_scalars-sub_tag",
        "add_hparams",
    ],
)
def test_nothing_written_outside_logdir(tmp_path, method, name):
    """No tag, add_scalars main/sub tag or add_hparams run name leads a file outside log_dir."""
    name = _escape_name(name, tmp_path)
    logdir = tmp_path / "a" / "b" / "run"
    with SummaryWriter(str(logdir)) as w:
        if method == "add_scalar":
            w.add_scalar(name, 1.0, 1)
        elif method == "add_scalars-main_tag":
            w.add_scalars(name, {"x": 1.0, "y": 2.0}, 1)
        elif method == "add_scalars-sub_tag":
            w.add_scalars("loss", {name: 1.0, "y": 2.0}, 1)
        else:
            w.add_hparams({"lr": 0.1}, {"hp/acc": 0.5}, name=name)
    written = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files]
    assert written
    outside = [f for f in written if os.path.commonpath([f, str(logdir)]) != str(logdir)]
    assert not outside
    # the values were written (inside log_dir), and every file is a clean event file
    assert any(ev.summary.value for f in written for ev in read_events(f, errors="raise"))


def test_symlink_out_of_logdir_is_refused(tmp_path):
    """A sub-run whose path would leave log_dir through a symlink is refused, writing nothing."""
    logdir, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    with SummaryWriter(str(logdir)) as w:
        (logdir / "link").symlink_to(outside, target_is_directory=True)
        with pytest.raises(ValueError, match="outside log_dir"):
            w.add_scalars("link", {"x": 1.0}, 1)
    assert os.listdir(outside) == []


# ---------------------------------------------------------------------------------- reader
def _damaged_file(tmp_path, n=5):
    """An event file of ``n`` scalars; returns its path, bytes and record offsets."""
    logdir = str(tmp_path / "src")
    with SummaryWriter(logdir) as w:
        for i in range(n):
            w.add_scalar("x", float(i), i + 1)
    (path,) = event_files(logdir)
    with open(path, "rb") as f:
        data = f.read()
    offsets, off = [], 0
    while off < len(data):
        offsets.append(off)
        (length,) = struct.unpack_from("<Q", data, off)
        off += HEADER_SIZE + length + FOOTER_SIZE
    assert off == len(data) and len(offsets) == n + 1  # the file_version record, then n
    return path, data, offsets


def _write_damaged(tmp_path, data):
    out = tmp_path / "damaged" / "events.out.tfevents.0000000000.host.1.0"
    out.parent.mkdir()
    out.write_bytes(bytes(data))
    return str(out)


def _collect_steps(path, errors, into):
    """Append each event's step to ``into`` as it is read (kept if the reader then raises)."""
    for ev in read_events(path, errors=errors):
        into.append(ev.step)


@pytest.mark.parametrize(
    "where, reason",
    [
        ("data", "record data CRC mismatch"),
        ("data_crc", "record data CRC mismatch"),
        ("length", "record length CRC mismatch"),
        ("length_crc", "record length CRC mismatch"),
    ],
)
@pytest.mark.parametrize("errors", ["raise", "warn", "ignore"])
def test_reader_reports_crc_failure_with_path_and_offset(tmp_path, where, reason, errors):
    """A flipped byte is an EventFileError with the file and the bad record's offset ("raise"),
    a warning ("warn") or silence ("ignore"); the records before it are still read."""
    _, data, offsets = _damaged_file(tmp_path)
    bad = 3
    off = offsets[bad]
    (length,) = struct.unpack_from("<Q", data, off)
    pos = {
        "data": off + HEADER_SIZE + length // 2,
        "data_crc": off + HEADER_SIZE + length + 1,
        "length": off,
        "length_crc": off + 9,
    }[where]
    data = bytearray(data)
    data[pos] ^= 0x20
    path = _write_damaged(tmp_path, data)
    got = []
    if errors == "raise":
        with pytest.raises(EventFileError) as info:
            _collect_steps(path, "raise", got)
        assert (info.value.path, info.value.offset, info.value.reason) == (path, off, reason)
        assert f"offset {off}" in str(info.value) and path in str(info.value)
    elif errors == "warn":
        with pytest.warns(RuntimeWarning, match=re.escape(f"{reason} at byte offset {off}")):
            _collect_steps(path, "warn", got)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _collect_steps(path, "ignore", got)
    assert got == [0, 1, 2]  # the file_version record (step 0), then steps 1 and 2


@pytest.mark.parametrize("cut", ["in-header", "in-data", "in-footer"])
@pytest.mark.parametrize("errors", ["raise", "warn"])
def test_reader_reports_truncated_tail(tmp_path, cut, errors):
    """A cut last record is reported as truncation at its offset; TensorBoard's reader reads the
    same whole records."""
    _, data, offsets = _damaged_file(tmp_path)
    last = offsets[-1]
    end = {"in-header": last + 5, "in-data": last + HEADER_SIZE + 3, "in-footer": len(data) - 1}[
        cut
    ]
    path = _write_damaged(tmp_path, data[:end])
    reason = "truncated record header" if cut == "in-header" else "truncated record"
    got = []
    if errors == "raise":
        with pytest.raises(EventFileError) as info:
            _collect_steps(path, "raise", got)
        assert (info.value.path, info.value.offset, info.value.reason) == (path, last, reason)
    else:
        with pytest.warns(RuntimeWarning, match=re.escape(f"{reason} at byte offset {last}")):
            _collect_steps(path, "warn", got)
    assert got == [0, 1, 2, 3, 4]
    ea = accumulate(os.path.dirname(path))
    assert [s.step for s in ea.Scalars("x")] == [1, 2, 3, 4]
