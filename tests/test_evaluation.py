"""Evaluation of a checkpoint (run.mode=eval): the pass@k estimator against hand-computed values, the
eval config, and a trained run evaluated end to end."""
import json
from math import comb
from pathlib import Path

import pytest

from actors.evaluation import pass_at_k, pass_at_k_figures, pass_at_k_points, with_evaluated_run_overrides
from conf.load import ConfigError, load_config
from tests.test_end_to_end import read_run, run_ringrl


@pytest.mark.parametrize("n, c, k, expected", [
    (8, 0, 1, 0.0),
    (8, 1, 1, 1 / 8),         # pass@1 is c/n
    (8, 3, 1, 3 / 8),
    (4, 2, 2, 5 / 6),         # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (5, 2, 2, 7 / 10),        # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (8, 1, 8, 1.0),           # one correct among all 8 drawn
    (8, 2, 4, 11 / 14),       # 1 - C(6,4)/C(8,4) = 1 - 15/70
    (10, 3, 8, 1.0),          # n - c < k: every subset holds a correct one
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_many_samples():
    """The product form agrees with exact binomials where these are huge (n = 1000)."""
    assert pass_at_k(1000, 5, 100) == pytest.approx(1 - comb(995, 100) / comb(1000, 100), rel=1e-12)


def test_pass_at_k_figures_average_over_prompts():
    figures = pass_at_k_figures([0, 1, 8], 8)
    assert list(figures) == ["pass@1", "pass@2", "pass@4", "pass@8"]
    assert figures["pass@1"] == pytest.approx((0 + 1 / 8 + 1) / 3)
    assert figures["pass@2"] == pytest.approx((0 + 1 / 4 + 1) / 3)  # 1 - C(7,2)/C(8,2) = 1/4
    assert figures["pass@8"] == pytest.approx(2 / 3)
    assert pass_at_k_points(10) == [1, 2, 4, 8, 10] and pass_at_k_points(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(8, 9, 1)


def test_eval_config_is_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.mode=eval needs run\.init_from"):
        load_config(["run.mode=eval"])
    with pytest.raises(ConfigError, match=r"eval\.k \(0\) must be at least 1"):
        load_config(["eval.k=0"])
    with pytest.raises(ConfigError, match=r"eval\.temperature \(0\.0\) must be > 0"):
        load_config(["eval.temperature=0"])
    (tmp_path / "trained" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"is the evaluated run"):
        load_config(["run.mode=eval", f"run.init_from={tmp_path / 'trained'}", f"run.out_dir={tmp_path}",
                     "run.name=trained"])


def test_evaluation_takes_the_trained_runs_model_and_task(tmp_path):
    """The evaluated run's overrides come first, without where and how it ran (run.*, ray.*)."""
    (tmp_path / "overrides.json").write_text(json.dumps(["model=small", "run.name=e2e", "ray.num_cpus=2",
                                                         "generator.num=2", "+run.steps=5"]))
    argv = ["run.mode=eval", f"run.init_from={tmp_path}", "generator.num=1"]
    assert with_evaluated_run_overrides(argv, "overrides.json") == ["model=small", "generator.num=2", *argv]
    assert with_evaluated_run_overrides(["run.steps=3"], "overrides.json") == ["run.steps=3"]


@pytest.mark.slow
def test_eval_mode_reproduces_the_runs_greedy_accuracy(tmp_path):
    proc = run_ringrl(tmp_path, "learner.warmup_steps=300", "run.steps=5")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    summary, _ = read_run(tmp_path)
    trained = tmp_path / "e2e"
    before = {path: path.stat().st_mtime_ns for path in trained.rglob("*")}

    proc = run_ringrl(tmp_path, "run.mode=eval", f"run.init_from={trained}", "run.name=eval")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["greedy_accuracy"] == summary["evaluations"]["after_rl"]["accuracy"]
    assert result["version"] == 5 and Path(result["checkpoint"]) == trained / "checkpoints" / "step-000005"
    assert result["k"] == 8 and 0 < result["pass@1"] <= result["pass@8"] <= 1, result
    lines = [json.loads(line) for line in (tmp_path / "eval" / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(lines) == result["prompts"] == 256
    assert all(len(line["sample_rewards"]) == 8 for line in lines)
    assert sum(line["greedy_reward"] for line in lines) / len(lines) == result["greedy_accuracy"]
    assert sum(line["correct"] for line in lines) / (8 * len(lines)) == pytest.approx(result["pass@1"])
    assert {path: path.stat().st_mtime_ns for path in trained.rglob("*")} == before  # the run is left alone
