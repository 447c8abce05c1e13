"""End-to-end runs of `run.py` on real Ray: the policy learns; an existing cluster is reused."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_timeline import read_scalars

pytestmark = pytest.mark.slow


def run_ringrl(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "run.py", f"run.out_dir={tmp_path}", "run.name=e2e", "run.progress=false",
            "ray.dashboard=false", *overrides]
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def read_run(tmp_path: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in lines if "step" in r]


def test_short_run_learns(tmp_path):
    proc = run_ringrl(tmp_path, "learner.warmup_steps=700", "run.steps=40")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    summary, steps = read_run(tmp_path)
    assert summary["status"] == "finished" and len(steps) == 40
    first = sum(r["reward"] for r in steps[:10]) / 10
    last = sum(r["reward"] for r in steps[-10:]) / 10
    assert last > first + 0.1, (first, last)
    evals = summary["evaluations"]
    assert evals["after_rl"]["accuracy"] > evals["after_warmup"]["accuracy"]
    assert_every_sample_accounted_for(summary)
    learner = summary["actors"]["learner-0"]
    assert learner["version"] == 40
    assert learner["consumed_samples"] == learner["trained_samples"] + learner["dropped_uninformative"]
    assert summary["actors"]["generator-0"]["generated_samples"] >= learner["consumed_samples"]
    assert all(0 <= r["masked_below_alpha_frac"] <= 1 and r["weight_sync_s"] > 0 for r in steps if "loss" in r)
    # the learner computed its batches in micro-batches of learner.stream_groups while they arrived
    assert max(r.get("micro_batches", 0) for r in steps) > 1
    assert_figures_of_the_run(summary, steps)
    assert_run_can_be_watched(tmp_path / "e2e", summary, steps)
    for name in ("learning_curve.png", "checkpoints/step-000040/model/.metadata", "checkpoints/step-000040/driver.json",
                 "checkpoints/step-000040/MANIFEST.json", "config.json", "actors.json"):
        assert (tmp_path / "e2e" / name).exists(), name


def assert_figures_of_the_run(summary: dict, steps: list[dict]) -> None:
    """Devices, MFU and the actors' timelines are reported; a generator's phases cover its wall time."""
    assert summary["weight_path"] == "gloo" and summary["actors"]["generator-0"]["device"].startswith("cpu")
    if len(os.sched_getaffinity(0)) > 1:  # ray.bind_cores: a core of its own for the decode thread, the rest shared
        cores = summary["cores"]
        decode = cores.pop("generator-0 decode thread")
        assert len(decode) == 1 and summary["actors"]["generator-0"]["decode_cores"] == decode
        rest = sorted(os.sched_getaffinity(0) - set(decode))
        assert cores == {name: rest for name in ("generator-0", "judge-0", "learner-0", "driver")}, cores
    assert 0 < summary["mfu"]["mfu/run"] < 1 and all(0 < r["mfu/learner"] < 1 for r in steps)
    phases = summary["actors"]["generator-0"]["phases"]
    assert phases["unaccounted"] <= 0.02 * phases["wall"], phases
    assert phases["decoding"] > 0 and summary["actors"]["learner-0"]["phases"]["training"] > 0
    for role in ("generator", "learner"):  # each step's shares of a role's time add up to one
        shares = [sum(v for k, v in r.items() if k.startswith(f"share/{role}/")) for r in steps[1:]]
        assert all(abs(total - 1) <= 0.02 for total in shares), shares


def assert_run_can_be_watched(run_dir: Path, summary: dict, steps: list[dict]) -> None:
    """TensorBoard holds the steps and rewards of metrics.jsonl; timeline.json has spans of every actor,
    and a generator's cover its wall time; the spans went to neither metrics.jsonl nor summary.json."""
    rewards = read_scalars(run_dir)["reward"]
    assert [step for step, _ in rewards] == [r["step"] for r in steps]
    assert [value for _, value in rewards] == pytest.approx([r["reward"] for r in steps], rel=1e-6)  # float32
    trace = json.loads((run_dir / "timeline.json").read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    spans: dict[str, list] = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            spans.setdefault(names[event["pid"]], []).append((event["ts"], event["ts"] + event["dur"]))
    assert {"driver", "learner-0", "judge-0", "generator-0"} <= set(spans), set(spans)
    covered_s = union_length(spans["generator-0"]) / 1e6
    wall_s = summary["actors"]["generator-0"]["phases"]["wall"]
    assert abs(covered_s - wall_s) <= 0.02 * wall_s, (covered_s, wall_s, trace["otherData"])
    assert all("spans" not in actor for actor in summary["actors"].values())
    assert not any("spans" in key for r in steps for key in r)


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, reached = 0.0, -math.inf
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def assert_every_sample_accounted_for(summary: dict) -> None:
    samples = summary["samples"]
    assert samples["in_flight_at_end"] == 0, samples
    assert samples["generated"] == samples["trained"] + sum(samples["dropped"].values()), samples


@pytest.mark.parametrize("mode, warmup", [("algo.max_staleness=0", 100), ("algo.mode=sync", 0)])
def test_synchronous_mode_has_zero_lag(tmp_path, mode, warmup):
    """Also: RL straight from the initial policy (no warm-up) runs; sync mode binds no cores."""
    proc = run_ringrl(tmp_path, mode, f"learner.warmup_steps={warmup}", "run.steps=8")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    summary, steps = read_run(tmp_path)
    lags = {int(lag) for r in steps for lag in r.get("lag_histogram", {})}
    # from the initial policy every reward may be 0: all groups uninformative, nothing trained
    assert lags == {0} if warmup else lags <= {0}
    if mode == "algo.mode=sync":  # ray.bind_cores binds async runs only: sync's roles take turns on every core
        assert summary["cores"] == {}, summary["cores"]
    assert_every_sample_accounted_for(summary)


def test_off_loopback_channels_are_curve_authenticated(tmp_path):
    proc = run_ringrl(tmp_path, "comm.host=0.0.0.0", "learner.warmup_steps=50", "run.steps=3")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "trajectory channels on 0.0.0.0: CURVE, keys made for this run" in output
    summary, steps = read_run(tmp_path)
    assert summary["status"] == "finished" and len(steps) == 3
    assert_every_sample_accounted_for(summary)


@pytest.mark.parametrize("kv", ["keep", "recompute"])  # cut in place, or evicted and prefilled again
def test_c3po_rounds_purge_and_account_for_every_sample(tmp_path, kv):
    proc = run_ringrl(tmp_path, "algo.round_token_budget=600", "algo.max_pauses=0", "run.on_actor_failure=stop",
                      "learner.warmup_steps=20", "run.steps=6", f"generator.kv_on_update={kv}")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    summary, steps = read_run(tmp_path)
    generator = summary["actors"]["generator-0"]
    assert generator["rounds"] >= 6 and generator["paused_rollouts"] > 0
    assert summary["samples"]["dropped"]["purged"] == generator["dropped_purged"] > 0
    assert_every_sample_accounted_for(summary)
    # the learner waits for each round to close inside its own call (its `waiting`, not `between_calls`):
    # between the first step's stats and the last one's, it waited for most of the driver's waits for
    # those steps' rounds (not all: the calls' round trips; before, it waited for none of them)
    waited = steps[-1]["phases/learner/waiting"] - steps[0]["phases/learner/waiting"]
    round_s = sum(s["time/round_s"] for s in steps[1:])
    assert waited >= 0.5 * round_s > 0, (waited, round_s)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_status(address: str, env: dict) -> int:
    return subprocess.run(["ray", "status", f"--address={address}"], capture_output=True, env=env).returncode


def alive_actor_names(dashboard: str, env: dict) -> set:
    """Names of the live actors, as `ray list actors` shows them."""
    listing = subprocess.run(["ray", "list", "actors", f"--address={dashboard}", "--format=json",
                              "--filter", "state=ALIVE"], capture_output=True, text=True, env=env)
    if listing.returncode or not listing.stdout.lstrip().startswith("["):
        return set()  # the cluster answers "No resource in the cluster" before the actors exist
    return {actor["name"] for actor in json.loads(listing.stdout) if actor.get("name")}


@pytest.fixture
def ray_head():
    """A separate `ray start --head --block` cluster on loopback, torn down with its process group.

    `ray start` turns token authentication on; a client given an explicit address
    must then be told so (RAY_AUTH_MODE=token), while `ray.address=auto` finds out itself.
    """
    port, dashboard_port = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=6", f"--dashboard-port={dashboard_port}", "--include-dashboard=true"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while ray_status(address, env):
        assert time.monotonic() < deadline, "ray head did not come up"
        time.sleep(1)
    yield address, f"http://127.0.0.1:{dashboard_port}", env
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)


def test_attaches_to_existing_cluster_with_named_actors(tmp_path, ray_head):
    address, dashboard, env = ray_head
    proc = run_ringrl(tmp_path, f"ray.address={address}", "generator.num=2", "judge.num=2",
                      "learner.warmup_steps=300", "run.steps=20", env=env)
    wanted = {"generator-0", "generator-1", "judge-0", "judge-1", "learner-0"}
    seen: set = set()
    while proc.poll() is None and seen != wanted:
        seen = alive_actor_names(dashboard, env)
        time.sleep(1)
    output, _ = proc.communicate(timeout=600)
    assert seen == wanted, output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    assert "Started a local Ray instance" not in output
    assert "Pushing file package" in output  # the code reached the workers via runtime_env
    assert ray_status(address, env) == 0  # the cluster outlives the run


def _with_ctrl_c() -> None:
    """A terminal's Ctrl-C reaches a run with SIGINT's default action, even where this test runs
    in the background of a shell, whose children inherit SIGINT ignored (and Python then never
    raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_actors_and_writes_summary(tmp_path):
    proc = subprocess.Popen([sys.executable, "run.py", f"run.out_dir={tmp_path}", "run.name=e2e",
                             "run.progress=false", "ray.dashboard=false", "learner.warmup_steps=20",
                             "run.steps=100000"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_with_ctrl_c)
    try:
        metrics = tmp_path / "e2e" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count('"step"') >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        output, _ = proc.communicate(timeout=120)
    finally:  # a run left behind by a failure would train for hours
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert proc.returncode == 1, output[-3000:]
    assert summary["status"] == "interrupted"
    assert summary["steps"] >= 3
    assert set(summary["actors"]) == {"learner-0", "judge-0", "generator-0"}
