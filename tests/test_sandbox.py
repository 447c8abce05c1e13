"""The code sandbox against hostile programs: real launcher, real namespaces, real limits.

Each case checks the verdict and, where it can, the evidence from outside: the file that must
not exist, the listener that must not have been reached, the secret that must not be printed,
the processes that must be gone.
"""
import os
import re
import socket
import time
import uuid

import pytest

from actors.tasks.dataset import SHIPPED
from actors.tasks.sandbox import Sandbox, SandboxError
from actors.tasks.sandbox_init import UID_BASE
from conf.schema import SandboxConfig

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox drops each run to its own uid: needs root")]

LIMITS = SandboxConfig(cpu_s=1, wall_s=3.0, memory_mb=256, max_procs=8, output_kb=16, disk_mb=4)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    jail = Sandbox(LIMITS)
    if not jail.namespaces:
        pytest.skip("this kernel refuses mount/pid/network namespaces; see the fallback tests")
    return jail


@pytest.fixture(scope="module")
def fallback() -> Sandbox:
    """The jail used where namespaces are refused: own uid, seccomp-refused sockets, rlimits."""
    return Sandbox(LIMITS, namespaces=False)


def live_processes_of(uid: int) -> list[int]:
    """Pids of processes, not yet reaped zombies, running as `uid`."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{entry}/status").read()
        except OSError:
            continue
        real_uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        if real_uid == uid and re.search(r"^State:\s+(\w)", status, re.M).group(1) != "Z":
            pids.append(int(entry))
    return pids


def test_correct_program_reads_stdin_and_prints(sandbox):
    result = sandbox.run("a, b = map(int, input().split())\nprint(a + b)", "2 40\n")
    assert (result.verdict, result.stdout, result.exit_code) == ("ok", "42\n", 0)


def test_infinite_loop_stops_at_the_cpu_limit(sandbox):
    start = time.monotonic()
    result = sandbox.run("while True:\n    pass", "")
    assert result.verdict == "time_limit" and "CPU" in result.detail
    assert time.monotonic() - start < LIMITS.wall_s + 1


def test_sleeping_program_stops_at_the_wall_clock_limit(sandbox):
    start = time.monotonic()
    result = sandbox.run("import time\ntime.sleep(60)", "")
    assert result.verdict == "time_limit" and "wall clock" in result.detail
    assert time.monotonic() - start < LIMITS.wall_s + 1
    assert result.uid >= UID_BASE and live_processes_of(result.uid) == []


def test_fork_bomb_is_capped_and_leaves_nothing_behind(sandbox):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = sandbox.run(bomb, "")
    assert result.verdict == "time_limit"
    assert live_processes_of(result.uid) == []


def test_memory_bomb_hits_the_memory_limit(sandbox):
    result = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", "")
    assert result.verdict == "memory_limit"


def test_huge_output_is_cut_at_the_cap(sandbox):
    result = sandbox.run("while True:\n    print('x' * 1000)", "")
    assert result.verdict == "output_limit"
    assert len(result.stdout) <= (LIMITS.output_kb << 10) + (1 << 16)


def test_writes_outside_its_tmp_are_refused(sandbox):
    host_tmp = f"/tmp/ringrl-escape-{uuid.uuid4().hex}"
    targets = [host_tmp, "/etc/ringrl-escape", "/ringrl-escape", "/usr/ringrl-escape", "/dev/shm/ringrl-escape",
               os.path.abspath(__file__) + ".escape"]
    program = f"""
wrote = []
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("x")
        wrote.append(path)
    except OSError:
        pass
with open("/tmp/inside.txt", "w") as f:  # its own /tmp is writable
    f.write("ok")
print(wrote, open("/tmp/inside.txt").read())
"""
    result = sandbox.run(program, "")
    # inside the jail /tmp is its own tmpfs: a write to the host's /tmp path lands there, nowhere else
    assert (result.verdict, result.stdout) == ("ok", f"[{host_tmp!r}] ok\n")
    assert not any(os.path.exists(path) for path in targets)


def test_expected_outputs_and_host_tmp_are_invisible(sandbox):
    """A policy must not learn to read the tests it is judged by, nor reach Ray's sockets in /tmp."""
    paths = [str(SHIPPED / "code" / "train.jsonl"), os.path.dirname(os.path.abspath(__file__)), "/tmp/ray"]
    result = sandbox.run(f"import os\nprint([os.path.exists(p) for p in {paths!r}], os.listdir('/tmp'))", "")
    assert (result.verdict, result.stdout) == ("ok", "[False, False, False] ['solution.py']\n")


def test_filling_its_tmp_is_capped(sandbox):
    result = sandbox.run("f = open('/tmp/big', 'wb')\nwhile True:\n    f.write(b'x' * 65536)", "")
    assert result.verdict == "runtime_error"
    assert "No space left" in result.detail or "File too large" in result.detail


def test_socket_connect_cannot_reach_a_loopback_listener(sandbox):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('escaped')"
        result = sandbox.run(program, "")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
    assert result.verdict == "runtime_error" and "unreachable" in result.detail
    assert "escaped" not in result.stdout


def test_judge_environment_is_invisible(sandbox, monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RINGRL_JUDGE_SECRET", secret)
    program = f"""
import os
seen = [str(dict(os.environ))]
for pid in ["self", "1", {os.getpid()!r}]:
    try:
        seen.append(open(f"/proc/{{pid}}/environ").read())
    except OSError as err:
        seen.append(type(err).__name__)
print(seen)
"""
    result = sandbox.run(program, "")
    assert result.verdict == "ok"
    assert secret not in result.stdout and "RINGRL" not in result.stdout


def test_signalling_the_judge_is_refused(sandbox):
    program = f"""
import os, signal
for pid in ({os.getpid()}, os.getppid(), -1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as err:
        print(pid, type(err).__name__)
print("still here")
"""
    result = sandbox.run(program, "")
    assert result.verdict == "ok" and result.stdout.endswith("still here\n")
    assert os.getpid() > 0  # this test process (the judge's place) is still alive to assert


def test_process_that_leaves_its_group_is_killed(sandbox):
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    result = sandbox.run(program, "")
    assert (result.verdict, result.stdout) == ("ok", "parent done\n")
    assert live_processes_of(result.uid) == []


def test_fallback_refuses_sockets_and_root_owned_writes_and_kills_stragglers(fallback):
    program = """
import os, socket, time
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    print("inet allowed")
except PermissionError:
    print("inet refused")
socket.socketpair()  # AF_UNIX stays allowed
try:
    open("/etc/ringrl-escape", "w")
except PermissionError:
    print("write refused")
if os.fork() == 0:
    os.setsid()
    time.sleep(60)
"""
    result = fallback.run(program, "")
    assert result.stdout == "inet refused\nwrite refused\n"
    assert not os.path.exists("/etc/ringrl-escape")
    assert live_processes_of(result.uid) == []


def test_broken_jail_raises_instead_of_scoring_zero(sandbox, monkeypatch):
    monkeypatch.setattr(sandbox, "python_prefix", "/nonexistent/prefix")  # the interpreter is not bound in
    with pytest.raises(SandboxError, match="set-up failed"):
        sandbox.run("print(1)", "")

