"""A helper process for scoring work that may hang, killed when a request overruns its timeout.

A thread cannot be stopped from outside, and sympy can spend hours on a hostile answer such as
`9^{9^{9}}`; a process can be killed. `KillableWorker` runs `python -m <module>` in its own
session and exchanges one JSON object per line with it over pipes: the module reads requests
on stdin and writes one reply per request on stdout (see `serve`). A request that gets no reply
within its timeout kills the whole session (SIGKILL to the group) and raises WorkerTimeout; a
worker that dies mid-request raises WorkerDied. Either way the next request starts a fresh
worker, and the clock of a request starts only once its worker is ready, so start-up time
(imports) never counts against a sample.
"""
import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY = {"ready": True}
PR_SET_PDEATHSIG = 1


class WorkerFailure(RuntimeError):
    """A request the worker did not answer; `reason` is what the judge counts."""

    reason: str


class WorkerTimeout(WorkerFailure):
    reason = "judge_timeout"


class WorkerDied(WorkerFailure):
    reason = "scorer_died"


def serve(handle) -> None:
    """The worker's side: announce readiness, then answer each JSON request line with handle(request).

    The worker asks the kernel to kill it when the thread that started it ends, so a worker busy
    on a hung request never outlives its judge.
    """
    _check_prctl(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    _write(READY)
    for line in sys.stdin:
        _write(handle(json.loads(line)))


def _check_prctl(result: int) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _write(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class KillableWorker:
    """One worker process at a time; thread-safe (requests are serialised)."""

    def __init__(self, module: str, startup_timeout_s: float = 120.0):
        self.module = module
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.buffer = b""
        self.starts = 0  # more than 1: the worker was killed or died and was replaced

    def request(self, message: dict, timeout_s: float) -> dict:
        """The worker's reply to `message`; WorkerTimeout after `timeout_s`, WorkerDied if it died."""
        with self.lock:
            self._ensure_started()
            try:
                self.process.stdin.write((json.dumps(message) + "\n").encode())
                self.process.stdin.flush()
            except BrokenPipeError:
                self._kill()
                raise WorkerDied(f"{self.module} exited before the request") from None
            return self._read_reply(time.monotonic() + timeout_s)

    def close(self) -> None:
        with self.lock:
            self._kill()

    def _ensure_started(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self._kill()  # reap one that died between requests
        self.starts += 1
        python_path = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path}  # the worker imports this package wherever it runs
        self.process = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.buffer = b""
        try:  # a worker that cannot start is broken, not a sample's failure: raise past the judge
            ready = self._read_reply(time.monotonic() + self.startup_timeout_s)
        except WorkerFailure as failure:
            raise RuntimeError(f"{self.module} failed to start: {failure}") from None
        if ready != READY:
            raise RuntimeError(f"{self.module} did not announce itself ready")

    def _read_reply(self, deadline: float) -> dict:
        """One reply line from the worker; on timeout or death the worker is killed and an error raised."""
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._kill()
                    raise WorkerTimeout(f"{self.module}: no reply within the timeout")
                if selector.select(timeout=remaining):
                    data = os.read(fd, 1 << 16)
                    if not data:
                        self._kill()
                        raise WorkerDied(f"{self.module} exited")
                    self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def _kill(self) -> None:
        """SIGKILL the worker's whole session, then reap it; the next request starts a new one."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()
        self.process = None
