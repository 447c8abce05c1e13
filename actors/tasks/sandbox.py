"""Run an untrusted Python program on one input, contained, and say how it ended.

Each `Sandbox.run` starts `sandbox_init.py` (the launcher) as root in a new session; the launcher
builds the jail and execs the candidate as an unprivileged uid of its own (see that module for
what the candidate can and cannot see). This side enforces what needs a clock or a byte count:
the wall-clock limit and the cap on captured output. When either is hit, or the run ends, the
whole tree is killed: the launcher's process group, and with it the candidate (parent-death
signal) and, in a pid namespace, everything the candidate started; without namespaces every
process of the run's uid.

Verdicts: ok, runtime_error, syntax_error, time_limit (CPU or wall clock), memory_limit,
process_limit, output_limit. A failure of the jail itself raises SandboxError: a broken sandbox
must stop the judge loudly, never score every sample 0.
"""
import ast
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from loguru import logger

from actors.tasks.sandbox_init import UID_BASE
from conf.schema import SandboxConfig

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
STDERR_TAIL_CHARS = 2000
REAP_TIMEOUT_S = 10.0
_ERROR_VERDICTS = {"SyntaxError": "syntax_error", "IndentationError": "syntax_error", "TabError": "syntax_error",
                   "MemoryError": "memory_limit", "BlockingIOError": "process_limit"}


class SandboxError(RuntimeError):
    """The jail could not be built or the launcher misbehaved (not the candidate's fault)."""


@dataclass
class RunResult:
    verdict: str  # ok | runtime_error | syntax_error | time_limit | memory_limit | process_limit | output_limit
    stdout: str = ""
    stderr: str = ""  # the last STDERR_TAIL_CHARS characters
    exit_code: int | None = None
    signal: int | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    uid: int = 0  # the run's own uid (every process it started ran as this uid)
    detail: str = ""  # one line saying why, for the judge's record


@dataclass
class _Capture:
    """What the select loop read from the launcher's pipes, and why it stopped early (if it did)."""

    chunks: dict
    cut: str | None = None


def probe_namespaces() -> bool:
    """True if the launcher may create mount, pid and network namespaces here."""
    return subprocess.run([sys.executable, "-I", "-S", LAUNCHER, "--probe"], env={}, timeout=30).returncode == 0


def python_interpreter(namespaces: bool) -> tuple[str, str]:
    """(interpreter binary, its prefix) for candidates: the judge's own, bound into the jail.

    Without namespaces nothing can be bound, so the candidate's uid must reach the binary through
    the host's directories; the judge's interpreter may sit in a private home (/root/.pyenv).
    """
    own = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    if namespaces or _reachable_by_anyone(own[0]):
        return own
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _reachable_by_anyone(os.path.realpath(candidate)):
            binary = os.path.realpath(candidate)
            return binary, os.path.dirname(os.path.dirname(binary))
    raise SandboxError(f"no Python interpreter an unprivileged uid can run ({own[0]} is not reachable)")


def _reachable_by_anyone(path: str) -> bool:
    """Every directory on the way is searchable by others and the file is executable by others."""
    parts = path.split(os.sep)
    directories = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    return all(os.stat(d).st_mode & 0o001 for d in directories) and bool(os.stat(path).st_mode & 0o001)


class Sandbox:
    def __init__(self, cfg: SandboxConfig, namespaces: bool | None = None):
        if os.geteuid() != 0:
            raise SandboxError("the code sandbox runs each candidate as an unprivileged uid of its own "
                               f"and must start as root (euid is {os.geteuid()})")
        self.cfg = cfg
        self.namespaces = probe_namespaces() if namespaces is None else namespaces
        self.python, self.python_prefix = python_interpreter(self.namespaces)
        if not self.namespaces:
            logger.warning("sandbox: no namespaces here (needs CAP_SYS_ADMIN): candidates run as their own uid, "
                           "sockets refused by seccomp, but world-writable directories stay writable")

    def run(self, program: str, stdin: str, wall_s: float | None = None) -> RunResult:
        """Run `program` with `stdin`; `wall_s` (default cfg.wall_s) caps the wall clock of this run."""
        wall_s = self.cfg.wall_s if wall_s is None else min(wall_s, self.cfg.wall_s)
        host_dir = tempfile.mkdtemp(prefix="ringrl-sandbox-")
        try:
            return self._run_in(host_dir, program, stdin, wall_s)
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)

    def _config(self, host_dir: str, status_fd: int, wall_s: float) -> dict:
        limits = {"cpu_s": self.cfg.cpu_s, "wall_s": wall_s, "memory_mb": self.cfg.memory_mb,
                  "max_procs": self.cfg.max_procs, "file_mb": self.cfg.disk_mb}
        return {"namespaces": self.namespaces, "status_fd": status_fd, "limits": limits,
                "python": self.python, "python_prefix": self.python_prefix, "disk_mb": self.cfg.disk_mb,
                "root": os.path.join(host_dir, "root"), "work": os.path.join(host_dir, "work"),
                "program": os.path.join(host_dir, "work", "solution.py")}

    def _run_in(self, host_dir: str, program: str, stdin: str, wall_s: float) -> RunResult:
        os.chmod(host_dir, 0o711)  # without namespaces the candidate must reach work/ through it
        for name in ("root", "work"):
            os.mkdir(os.path.join(host_dir, name))
        with open(os.path.join(host_dir, "work", "solution.py"), "w") as f:
            f.write(program)
        with open(os.path.join(host_dir, "stdin.txt"), "w") as f:
            f.write(stdin)
        status_read, status_write = os.pipe()
        config = self._config(host_dir, status_write, wall_s)
        start = time.monotonic()
        with open(os.path.join(host_dir, "stdin.txt"), "rb") as stdin_file:
            launcher = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, marshal.dumps(config).hex()], env={},
                                        stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        pass_fds=(status_write,), start_new_session=True)
        os.close(status_write)
        capture = _Capture(chunks={name: bytearray() for name in ("stdout", "stderr", "status")})
        try:
            self._capture(launcher, status_read, start + wall_s, capture)
        finally:
            self._kill_tree(launcher, capture)
            os.close(status_read)
        result = self._result(capture, launcher.returncode, time.monotonic() - start)
        result.uid = UID_BASE + launcher.pid
        return result

    def _capture(self, launcher: subprocess.Popen, status_fd: int, deadline: float, capture: _Capture) -> None:
        """Read stdout, stderr and status until the candidate has ended and what it wrote is read,
        the deadline passes, or the output overflows.

        The run ends with the candidate, not with the pipes: without a pid namespace a process it
        left behind may hold them open (it is killed with the rest).
        """
        selector = selectors.DefaultSelector()
        streams = {launcher.stdout.fileno(): "stdout", launcher.stderr.fileno(): "stderr", status_fd: "status"}
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        cap, ended = self.cfg.output_kb << 10, False
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not ended:
                capture.cut = "time_limit"
                break
            events = selector.select(timeout=0 if ended else remaining)
            if ended and not events:
                break  # the candidate is gone and nothing more is waiting in the pipes
            for key, _ in events:
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                capture.chunks[streams[key.fd]] += data
            if len(capture.chunks["stdout"]) + len(capture.chunks["stderr"]) > cap:
                capture.cut = "output_limit"
                break
            ended = "exit_code" in _status_lines(capture.chunks["status"])
        selector.close()

    def _kill_tree(self, launcher: subprocess.Popen, capture: _Capture) -> None:
        """End the run and everything it started before returning.

        A run cut short loses its candidate first: pid 1 of its namespace, whose pid stays
        reserved until the launcher reaps it, which the kernel allows only once the namespace
        is empty. The launcher then exits (its alarm bounds the wait); waiting with WNOWAIT
        keeps its pid, the process group id, reserved while the group is killed. Without a pid
        namespace every process of the run's uid is killed last. (Killing by pid is safe: the
        launcher reaps the candidate only when it has ended, and writes that down at once.)
        """
        status = _status_lines(capture.chunks["status"])
        if "exit_code" not in status:
            _kill(status["pid"] if "pid" in status else -launcher.pid)  # not forked yet: the whole group
        os.waitid(os.P_PID, launcher.pid, os.WEXITED | os.WNOWAIT)
        _kill(-launcher.pid)
        launcher.wait()
        launcher.stdout.close()
        launcher.stderr.close()
        if not self.namespaces:
            uid = str(UID_BASE + launcher.pid)
            subprocess.run([sys.executable, "-I", "-S", LAUNCHER, "--kill-uid", uid], env={},
                           timeout=REAP_TIMEOUT_S)

    def _result(self, capture: _Capture, launcher_code: int, wall_s: float) -> RunResult:
        status = _status_lines(capture.chunks["status"])
        if "setup_error" in status:
            raise SandboxError(f"sandbox set-up failed: {status['setup_error']}")
        stdout = capture.chunks["stdout"].decode("utf-8", errors="replace")
        stderr = capture.chunks["stderr"].decode("utf-8", errors="replace")[-STDERR_TAIL_CHARS:]
        result = RunResult(verdict="ok", stdout=stdout, stderr=stderr, exit_code=status.get("exit_code"),
                           signal=status.get("signal"), cpu_s=status.get("cpu_s", 0.0), wall_s=wall_s)
        if capture.cut is None and "exit_code" not in status:
            if launcher_code != -signal.SIGALRM:
                raise SandboxError(f"the launcher ended ({launcher_code}) without a status "
                                   f"(stderr: {stderr[-300:]!r})")
            capture.cut = "time_limit"  # its own wall-clock backstop fired before this side's deadline
        result.verdict, result.detail = self._verdict(capture.cut, result)
        return result

    def _verdict(self, cut: str | None, result: RunResult) -> tuple[str, str]:
        if cut == "output_limit":
            return cut, f"more than {self.cfg.output_kb} KiB of output"
        if cut == "time_limit":
            return cut, f"wall clock past {result.wall_s:.1f}s"
        if result.signal is not None:
            if result.cpu_s >= self.cfg.cpu_s - 0.05:
                return "time_limit", f"CPU time {result.cpu_s:.2f}s (limit {self.cfg.cpu_s}s)"
            return "runtime_error", f"killed by {signal.Signals(result.signal).name}"
        if result.exit_code == 0:
            return "ok", ""
        last_line = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
        error_name = last_line.split(":", 1)[0].strip()
        return _ERROR_VERDICTS.get(error_name, "runtime_error"), last_line[:200] or f"exit code {result.exit_code}"


def _kill(pid: int) -> None:
    """SIGKILL a process (pid > 0) or a process group (pid < 0) that may already be gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _status_lines(data: bytes) -> dict:
    """The launcher's status messages merged into one dict; a line still being written is skipped."""
    status = {}
    for line in data.split(b"\n")[:-1]:
        status.update(ast.literal_eval(line.decode()))
    return status
