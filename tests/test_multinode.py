"""A real Ray cluster of two nodes on this machine, each at its own address.

The head runs at 127.0.0.2 and the second node at 127.0.0.3 (`ray start --node-ip-address`),
each started with `--block` in a process group of its own, so that stopping a node stops exactly
its processes (raylet, workers), whether the test passes or fails. On one host any process can
reach any 127.x address, so a wrong address would still work there; the network-namespace
variant puts the second node in a namespace of its own joined to the host by a veth pair, where
each node reaches the other only at its own address (and the channels leave loopback: CURVE).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from bench.faults import step_records
from tests.test_end_to_end import assert_every_sample_accounted_for

pytestmark = pytest.mark.slow

NODE_CPUS = 4  # a generator, a judge, the learner, and the replacements of a lost node's actors
SLOTS = {"generator_slot": 1, "judge_slot": 1}  # one generator and one judge per node
PINNED = ["generator.num=2", "judge.num=2", "+generator.resources.generator_slot=1", "+judge.resources.judge_slot=1"]
ON_HEAD = "+learner.resources.head=1"  # only the head has it
START_S = 90


class RayNode:
    """One `ray start --block` process and everything it starts, in a process group of its own."""

    def __init__(self, args: list[str], log: Path, resources: dict, prefix: tuple = ()):
        """`prefix`: the command the node runs under (a network namespace, a mount of its own)."""
        self.log = log
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                                      f"--num-cpus={NODE_CPUS}", f"--resources={json.dumps(resources)}",
                                      "--disable-usage-stats",
                                      *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "RAY_AUTH_MODE": "token"}, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)  # whatever of the group is left
        self.proc.wait()


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def alive_nodes(address: str, env: dict) -> int:
    probe = "import ray; ray.init(address='{}', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", probe.format(address)], capture_output=True, text=True, env=env,
                         timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


@contextmanager
def two_node_cluster(tmp_path: Path, head_ip: str, node_ip: str, prefix: tuple = ()):
    """(address, driver env, the second node) of a cluster that is stopped, every process of it, on exit.
    The second node runs under `prefix` and has the resource `second`."""
    port = free_port(head_ip)
    address = f"{head_ip}:{port}"
    # the driver runs on the head's node; `ray start` turned token authentication on
    env = {**os.environ, "RAY_NODE_IP_ADDRESS": head_ip, "RAY_AUTH_MODE": "token"}
    nodes = [RayNode(["--head", f"--node-ip-address={head_ip}", f"--port={port}", "--include-dashboard=false"],
                     tmp_path / "head.log", {**SLOTS, "head": 1})]
    try:
        nodes.append(RayNode([f"--address={address}", f"--node-ip-address={node_ip}"], tmp_path / "node.log",
                             {**SLOTS, "second": 1}, prefix))
        deadline = time.monotonic() + START_S
        while alive_nodes(address, env) < 2:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:] + \
                (tmp_path / "node.log").read_text()[-2000:]
            assert all(node.proc.poll() is None for node in nodes), "a Ray node exited"
            time.sleep(1)
        yield address, env, nodes[1]
    finally:
        for node in reversed(nodes):
            node.stop()


def run_on(address: str, env: dict, tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """The driver, its output in tmp_path/driver.log (a pipe nobody reads while the test waits could fill)."""
    args = [sys.executable, "run.py", f"ray.address={address}", f"run.out_dir={tmp_path}", "run.name=cluster",
            "run.progress=false", "comm.host=node", *overrides]
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT,
                            env=env)


def finished(proc: subprocess.Popen, tmp_path: Path, timeout_s: float = 900) -> str:
    """The driver's output once it exited."""
    proc.wait(timeout=timeout_s)
    return (tmp_path / "driver.log").read_text()


def endpoints_in(output: str) -> set[str]:
    """The hosts of every tcp:// endpoint the run logged."""
    hosts = set()
    for word in output.replace(",", " ").split():
        if word.startswith("tcp://"):
            hosts.add(word.removeprefix("tcp://").rsplit(":", 1)[0])
    return hosts


def assert_learned_on_both_nodes(tmp_path: Path, output: str, head_ip: str, node_ip: str) -> None:
    summary = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    assert summary["status"] == "finished", output[-3000:]
    evaluations = summary["evaluations"]
    assert evaluations["after_rl"]["accuracy"] >= evaluations["after_warmup"]["accuracy"] + 0.25, evaluations
    assert_every_sample_accounted_for(summary)
    where = json.loads((tmp_path / "cluster" / "actors.json").read_text())
    for role in ("generator", "judge"):
        assert {where[f"{role}-{i}"]["node"] for i in range(2)} == {head_ip, node_ip}, where
    assert endpoints_in(output) and endpoints_in(output) <= {head_ip, node_ip}, endpoints_in(output)


@contextmanager
def network_namespace(name: str, host_ip: str, inner_ip: str):
    """A network namespace joined to this one by a veth pair: each side reaches the other only at
    its own address. Deleting the namespace takes the pair with it."""
    veth = name[-11:]  # interface names have at most 15 characters
    commands = [f"ip netns add {name}", f"ip link add h-{veth} type veth peer name n-{veth}",
                f"ip link set n-{veth} netns {name}", f"ip addr add {host_ip}/24 dev h-{veth}",
                f"ip link set h-{veth} up", f"ip netns exec {name} ip addr add {inner_ip}/24 dev n-{veth}",
                f"ip netns exec {name} ip link set n-{veth} up", f"ip netns exec {name} ip link set lo up"]
    try:
        for command in commands:
            subprocess.run(command.split(), check=True, capture_output=True)
        yield ("ip", "netns", "exec", name)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def can_make_namespaces() -> bool:
    """Root with iproute2 (network and mount namespaces of the tests' own)."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["ip", "netns", "add", "ringrl-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "ringrl-probe"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def loopback_cluster(tmp_path):
    with two_node_cluster(tmp_path, "127.0.0.2", "127.0.0.3") as cluster:
        yield cluster


def test_run_over_two_nodes_binds_each_endpoint_on_its_node(tmp_path, loopback_cluster):
    address, env, _ = loopback_cluster
    proc = run_on(address, env, tmp_path, *PINNED, "run.steps=40")
    output = finished(proc, tmp_path)
    assert proc.returncode == 0, output[-3000:]
    assert_learned_on_both_nodes(tmp_path, output, "127.0.0.2", "127.0.0.3")
    assert "trajectory channels on node: plain TCP (loopback)" in output


def test_a_run_the_cluster_cannot_hold_stops_at_once(tmp_path, loopback_cluster):
    address, env, _ = loopback_cluster
    start = time.monotonic()
    proc = run_on(address, env, tmp_path, "generator.num=8")
    output = finished(proc, tmp_path, timeout_s=120)
    assert proc.returncode == 2 and time.monotonic() - start < 30, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("config error: the Ray cluster cannot place generator-")
    assert "needs CPU 1" in output


def test_a_node_lost_mid_run_is_survived(tmp_path, loopback_cluster):
    """Every process of the second node killed at step 5: its generator and judge are re-created on
    the head, their prompts re-issued, and the run finishes with every sample accounted for."""
    address, env, second = loopback_cluster
    proc = run_on(address, env, tmp_path, "generator.num=2", "judge.num=2", "ray.placement=spread", ON_HEAD,
                  "run.on_actor_failure=restart", "learner.warmup_steps=100", "run.steps=100000",
                  "run.time_budget_s=45")
    run_dir = tmp_path / "cluster"
    deadline = time.monotonic() + 600
    while len(step_records(run_dir)) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.2)
    lost = sorted(name for name, where in json.loads((run_dir / "actors.json").read_text()).items()
                  if where["node"] == "127.0.0.3")
    killed_at = time.time()
    second.kill()
    output = finished(proc, tmp_path)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"generator-1", "judge-1"} <= set(lost) or {"generator-0", "judge-0"} <= set(lost), lost
    assert {fault["actor"] for fault in summary["faults"]} == set(lost), summary["faults"]
    assert all(summary["actors"][name]["node"] == "127.0.0.2" for name in lost)
    assert_every_sample_accounted_for(summary)
    assert summary["samples"]["trained_twice"] == 0
    replacement = next(name for name in lost if name.startswith("generator"))
    first_new = summary["actors"][replacement]["first_group_sent_at"] - killed_at
    print(f"node lost at step 5: first trajectory from the replacement {replacement} after {first_new:.1f} s")
    assert first_new > 0


@pytest.mark.skipif(not can_make_namespaces(), reason="needs root to create network namespaces")
def test_run_with_the_second_node_in_its_own_network_namespace(tmp_path):
    """Across a veth pair a wrong address fails; the channels leave loopback, so CURVE is on."""
    head_ip, node_ip = "10.231.7.1", "10.231.7.2"
    with network_namespace(f"ringrl-{os.getpid()}", head_ip, node_ip) as prefix, \
            two_node_cluster(tmp_path, head_ip, node_ip, prefix) as (address, env, _):
        proc = run_on(address, env, tmp_path, *PINNED, "run.steps=40")
        output = finished(proc, tmp_path)
    assert proc.returncode == 0, output[-3000:]
    assert_learned_on_both_nodes(tmp_path, output, head_ip, node_ip)
    assert "trajectory channels on node: CURVE, keys made for this run" in output


@pytest.mark.skipif(not can_make_namespaces(), reason="needs root for a mount namespace of its own")
def test_learners_that_do_not_share_the_run_directory_stop_the_run(tmp_path):
    """The second node sees its own empty folder where the run directory is (a private mount)."""
    hidden = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs ringrl-probe "$0" && exec "$@"', str(tmp_path))
    with two_node_cluster(tmp_path, "127.0.0.2", "127.0.0.3", hidden) as (address, env, _):
        proc = run_on(address, env, tmp_path, "+learner.resources.second=1")
        output = finished(proc, tmp_path, timeout_s=300)
    assert proc.returncode == 1, output[-3000:]
    assert "learner-0 failed: on node 127.0.0.3 does not share the run directory" in output, output[-3000:]
