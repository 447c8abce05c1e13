"""`python run.py task=math` and `task=code` run end to end on the tiny model (short runs)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

REASONS = {"correct", "wrong_answer", "no_answer", "judge_timeout", "runtime_error", "syntax_error", "time_limit",
           "memory_limit", "process_limit", "output_limit"}


def run_task(tmp_path, *overrides: str) -> dict:
    args = [sys.executable, "run.py", f"run.out_dir={tmp_path}", "run.name=e2e", "run.progress=false",
            "ray.dashboard=false", "learner.warmup_steps=20", "run.steps=3", *overrides]
    result = subprocess.run(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return json.loads((tmp_path / "e2e" / "summary.json").read_text())


def check_judged(summary: dict) -> dict:
    assert summary["status"] == "finished" and summary["steps"] == 3
    judge = summary["actors"]["judge-0"]
    reasons = {k: v for k, v in judge.items() if k in REASONS}
    assert judge["judged_samples"] > 0 and sum(reasons.values()) == judge["judged_samples"]
    assert judge["judgments_per_s"] > 0
    assert summary["actors"]["learner-0"]["consumed_samples"] > 0
    return reasons


@pytest.mark.timeout(300)
def test_math_task_runs_end_to_end(tmp_path):
    summary = run_task(tmp_path, "task=math")
    reasons = check_judged(summary)
    assert reasons.get("wrong_answer", 0) + reasons.get("correct", 0) > 0  # warm-up taught \boxed{}
    assert summary["evaluations"]["after_rl"]["total"] == 24


@pytest.mark.skipif(os.geteuid() != 0, reason="the code sandbox drops each run to its own uid: needs root")
@pytest.mark.timeout(300)
def test_code_task_runs_end_to_end(tmp_path):
    summary = run_task(tmp_path, "task=code", "learner.warmup_batch=32", "algo.prompts_per_step=4")
    check_judged(summary)
    assert summary["evaluations"]["after_rl"]["total"] == 8
