"""The CLI's errors: a reader that closes the pipe, a bad ``demo --scale``, a log directory that
cannot be created (one line, no traceback, no exit-time warning)."""

import os
import subprocess
import sys

import pytest

from tbprobe import SummaryWriter
from tbprobe.cli import EXIT_BROKEN_PIPE, main
from tbprobe.writer.process_hooks import _writers

PY = sys.executable
CHILD_TIMEOUT = 60  # seconds; a child that needs longer has hung


def test_closed_pipe_exits_quietly(tmp_path):
    """`tbprobe report DIR | head -1`: the reader has gone; exit 141 with nothing on stderr."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar("grad_norm/fc.weight", 1.0, 0)
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the child starts: its first write to stdout fails (EPIPE)
    try:
        child = subprocess.run(
            [PY, "-m", "tbprobe.cli", "report", str(tmp_path / "run")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=CHILD_TIMEOUT,
        )
    finally:
        os.close(write_end)
    assert child.stderr.decode() == ""
    assert child.returncode == EXIT_BROKEN_PIPE == 141


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "0", "-1", "abc"])
def test_demo_scale_must_be_finite_and_positive(scale, capsys):
    """`demo --scale` outside (0, inf) is an argparse error naming the option: exit 2."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--scale", scale])
    assert info.value.code == 2
    assert "argument --scale" in capsys.readouterr().err


def test_writer_under_a_file_is_not_registered(tmp_path):
    """A SummaryWriter whose directory cannot be created raises OSError and leaves no writer
    registered for the exit-time close (which would fail on its missing thread), even while
    the traceback keeps the half-built writer alive."""
    (tmp_path / "afile").write_text("x")
    before = set(_writers)
    with pytest.raises(OSError) as info:
        SummaryWriter(str(tmp_path / "afile" / "x"))
    assert set(_writers) <= before
    del info


def test_writer_under_a_file_no_exit_warning(tmp_path):
    """In a fresh process, the uncaught OSError is the only thing on stderr: no exit-time
    warning about closing a half-built writer."""
    (tmp_path / "afile").write_text("x")
    code = f"from tbprobe import SummaryWriter; SummaryWriter({str(tmp_path / 'afile' / 'x')!r})"
    child = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert child.returncode == 1
    assert child.stderr.rstrip().splitlines()[-1].startswith(("NotADirectoryError", "FileExists"))
    assert "at exit failed" not in child.stderr


def test_demo_logdir_that_is_a_file(tmp_path, capsys):
    """`demo --logdir FILE` is a one-line error naming --logdir, exit 2, before any training."""
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--logdir", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--logdir" in err and "not a directory" in err


def test_demo_oserror_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError later in the demo (a writer's sub-directory) is one line, exit 1."""
    import tbprobe.demo

    def fail(logdir, scale):
        raise NotADirectoryError(20, "Not a directory", os.path.join(logdir, "cnn"))

    monkeypatch.setattr(tbprobe.demo, "run_demo", fail)
    assert main(["demo", "--logdir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Not a directory" in err


def test_python_dash_m_tbprobe_is_the_command(tmp_path):
    """`python -m tbprobe report DIR` runs the same command as `tbprobe report DIR`."""
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar("grad_norm/fc.weight", 1.0, 0)
    child = subprocess.run(
        [PY, "-m", "tbprobe", "report", "--json", str(tmp_path / "run")],
        capture_output=True,
        timeout=CHILD_TIMEOUT,
    )
    assert child.returncode == 0, child.stderr.decode()
    assert child.stdout.decode().lstrip().startswith("{")
