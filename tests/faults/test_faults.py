"""Fault injection on real Ray actors: SIGKILL a generator, a judge, a learner or the driver mid-run.

Each run must finish (after `run.resume` where the learner or the driver died) with every
generated sample trained or dropped with a reason, and none trained twice. Actor process ids
come from the run's actors.json, which the driver rewrites every step.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import bench.faults as drills
from bench.faults import finish, pid_of, resume, step_records, summary_of, wait_for_step

pytestmark = pytest.mark.slow

QUICK = ("learner.warmup_steps=100",)


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return drills.start(run_dir, *QUICK, *overrides)


def steps_done(run_dir: Path) -> int:
    return len(step_records(run_dir))


def assert_finished_and_accounted(run_dir: Path, steps: int) -> dict:
    summary = summary_of(run_dir)
    assert summary["status"] == "finished" and summary["steps"] == steps
    samples = summary["samples"]
    assert samples["in_flight_at_end"] == 0, samples
    assert samples["generated"] == samples["trained"] + sum(samples["dropped"].values()), samples
    assert samples["trained_twice"] == 0, samples
    learners = [a for name, a in summary["actors"].items() if name.startswith("learner")]
    assert samples["trained"] == sum(a["trained_samples"] for a in learners), samples
    return summary


def test_killed_generator_and_judge_are_replaced_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "kill"
    proc = start(run_dir, "generator.num=2", "run.steps=12")
    wait_for_step(run_dir, 3, proc)
    generator = pid_of(run_dir, "generator-1")
    os.kill(generator, signal.SIGKILL)
    wait_for_step(run_dir, 7, proc)
    judge = pid_of(run_dir, "judge-0")
    os.kill(judge, signal.SIGKILL)
    finish(proc)
    summary = assert_finished_and_accounted(run_dir, 12)
    faults = {fault["actor"]: fault for fault in summary["faults"]}
    assert faults.keys() == {"generator-1", "judge-0"}
    assert all(f["cause"] == "died" and f["recovered_s"] > 0 for f in faults.values())
    assert pid_of(run_dir, "generator-1") != generator and pid_of(run_dir, "judge-0") != judge


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_generator_killed_during_a_broadcast_is_reported_within_the_timeout(tmp_path, policy):
    timeout_s = 10
    run_dir = tmp_path / "broadcast"
    # tiny buckets: a broadcast takes long enough to be caught in the middle of it
    proc = start(run_dir, "generator.num=2", "run.steps=8", "comm.bucket_mb=0.0005",
                 f"comm.collective_timeout_s={timeout_s}", f"run.on_actor_failure={policy}")
    wait_for_step(run_dir, 2, proc)
    learner, generator = pid_of(run_dir, "learner-0"), pid_of(run_dir, "generator-1")
    while "Learner.publish" not in Path(f"/proc/{learner}/cmdline").read_text():
        time.sleep(0.002)
    os.kill(generator, signal.SIGKILL)
    killed_at = time.time()
    output = finish(proc, returncode=0 if policy == "continue" else 1)
    summary = summary_of(run_dir)
    [fault] = summary["faults"]
    assert fault["actor"] == "generator-1" and fault["seen_at"] - killed_at < 2 * timeout_s
    if policy == "stop":
        assert summary["status"] == "failed"
        assert "generator-1 failed: died at step" in output
        return
    assert_finished_and_accounted(run_dir, 8)
    assert "weight broadcast" in fault["learner_report"] and "rank 0 (learner)" in fault["learner_report"]
    assert "generator-1" not in summary["actors"]


def test_killed_learner_resumes_from_the_last_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "learner"
    proc = start(run_dir, "run.steps=12", "run.checkpoint_every=3")
    wait_for_step(run_dir, 7, proc)  # checkpoints after steps 3 and 6
    os.kill(pid_of(run_dir, "learner-0"), signal.SIGKILL)
    output = finish(proc, returncode=1)
    assert "learner-0 failed" in output
    newest = max((run_dir / "checkpoints").glob("step-*"))
    shard = next((newest / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # and the newest checkpoint is truncated
    output = finish(resume(run_dir))
    refused = [line for line in output.splitlines() if "falling back" in line]
    assert len(refused) == 1 and shard.name in refused[0], output[-3000:]
    assert "resumed" in output and "step-000003 at step 3" in output
    assert_finished_and_accounted(run_dir, 12)


def final_weights(run_dir: Path, steps: int) -> dict:
    out = run_dir / "final.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{steps:06d}" / "model", out)
    return torch.load(out, weights_only=False)["model"]


def test_sync_run_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    # a longer warm-up: more groups carry a learning signal, so more of the 8 steps change the weights
    common = ("algo.mode=sync", "run.steps=8", "run.checkpoint_every=2", "learner.warmup_steps=300")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(start(whole, *common))
    proc = start(killed, *common)
    wait_for_step(killed, 5, proc)
    proc.kill()  # the driver
    proc.wait()
    finish(resume(killed))
    assert_finished_and_accounted(killed, 8)
    expected, resumed = final_weights(whole, 8), final_weights(killed, 8)
    assert expected.keys() == resumed.keys()
    diff = max((expected[name] - resumed[name]).abs().max().item() for name in expected)
    assert diff <= 1e-6, diff
