"""Run the venv's real ``tensorboard`` on 127.0.0.1 and query its HTTP data API.

No fixed sleeps: the server is started with ``--port 0``, its URL is read from its log, and
readiness is polled against a deadline. The process is always terminated (then killed) on exit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

START_DEADLINE_S = 120.0  # generous: a 2-core machine shared with other jobs
_URL_RE = re.compile(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+)/")


def tensorboard_bin() -> str:
    """The ``tensorboard`` script beside the running interpreter (the venv's)."""
    path = Path(sys.executable).parent / "tensorboard"
    if not path.is_file():
        raise FileNotFoundError(f"no tensorboard beside {sys.executable}: pip install tensorboard")
    return str(path)


class TensorBoard:
    """A ``tensorboard --logdir`` process; use as a context manager.

    Example::

        with TensorBoard(logdir, log_path) as tb:
            tb.get_json("/data/runs")
    """

    def __init__(self, logdir: str | Path, log_path: str | Path, load_fast: str = "true"):
        self.logdir = str(logdir)
        self.log_path = Path(log_path)
        self.load_fast = load_fast
        self.url: str | None = None
        self.reader: str | None = None  # "rust" or "python" where the caller knows which
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> TensorBoard:
        cmd = [
            tensorboard_bin(),
            "--logdir", self.logdir,
            "--host", "127.0.0.1",
            "--port", "0",
            f"--load_fast={self.load_fast}",
        ]  # fmt: skip
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            self.url = self._wait_for_url(time.monotonic() + START_DEADLINE_S)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log(self) -> str:
        """Everything the server printed so far (for failure messages)."""
        return self.log_path.read_text(errors="replace")

    def _wait_for_url(self, deadline: float) -> str:
        while True:
            match = _URL_RE.search(self.log())
            if match:
                return match.group(1)
            if self._proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited ({self._proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensorboard printed no URL in time:\n{self.log()}")
            time.sleep(0.05)  # a poll interval, not synchronisation: the loop checks the log

    def get(self, path: str, **params) -> bytes:
        """GET ``path`` with query ``params``; the body (raises on a non-200 status)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as resp:
            return resp.read()

    def get_json(self, path: str, **params):
        """GET ``path`` and decode its JSON body."""
        return json.loads(self.get(path, **params))

    def wait_for(self, predicate, what: str, deadline_s: float = START_DEADLINE_S):
        """Poll ``predicate()`` until it returns a truthy value; return it, or fail at the deadline.

        The server loads the logdir in the background after it starts listening, so data
        appears some time after the first answer.
        """
        deadline = time.monotonic() + deadline_s
        last_error = None
        while True:
            try:
                result = predicate()
                if result:
                    return result
            except OSError as e:  # not listening yet, or a 5xx while loading
                last_error = e
            if self._proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited while waiting for {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not served in {deadline_s:.0f} s ({last_error})")
            time.sleep(0.1)  # a poll interval, not synchronisation
