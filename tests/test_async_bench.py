"""bench/async_vs_sync.py's arithmetic: the overlap bound from a synchronous run's phase times, the
accuracy curve on the grid of RL seconds, the time to a target accuracy, the mismatch by lag."""
import numpy as np
import pytest

from bench.async_vs_sync import accuracy_curve, ladder, lag_figures, machine_bound, overlap_bound, time_to


def step(admit: float, collect: float, train: float, sync: float) -> dict:
    return {"time/admit_s": admit, "time/collect_s": collect, "time/train_s": train, "time/weight_sync_s": sync}


def test_bound_is_the_sync_step_over_its_slower_half():
    # generation 3 s, training + sync 2 s: a sync step takes 5 s, an overlapped one 3 s
    assert overlap_bound([step(0.5, 2.5, 1.5, 0.5)]) == pytest.approx(5 / 3)
    # averaged over steps: generation (1 + 3) / 2 = 2, training + sync (2 + 2) / 2 = 2 -> 2x at most
    assert overlap_bound([step(0, 1, 1.5, 0.5), step(0, 3, 1.5, 0.5)]) == pytest.approx(2.0)



def summary(after_warmup: float, evaluations: list[tuple[float, float]], end_s: float, after_rl: float) -> dict:
    return {"evaluations": {"after_warmup": {"accuracy": after_warmup}, "after_rl": {"accuracy": after_rl}},
            "steps_records": [{"rl_s": t, "eval_accuracy": acc} for t, acc in evaluations] + [{"rl_s": 25.0}],
            "rl_wall_s": end_s}


def test_accuracy_curve_reads_every_evaluation_on_the_grid():
    run = summary(0.2, [(11.0, 0.4), (19.0, 0.6)], end_s=31.0, after_rl=0.8)
    # 10 s lies between the warm-up (0 s: 0.2) and 11 s (0.4); 20 and 30 s between 19 s (0.6) and the end (31 s: 0.8)
    expected = [0.2, 0.2 + 0.2 * 10 / 11, 0.6 + 0.2 * 1 / 12, 0.6 + 0.2 * 11 / 12]
    assert accuracy_curve(run, np.array([0.0, 10.0, 20.0, 30.0])) == pytest.approx(expected)


def test_time_to_target_between_grid_points():
    grid_s = np.array([0.0, 10.0, 20.0])
    assert time_to(grid_s, np.array([0.2, 0.4, 0.8]), 0.6) == pytest.approx(15.0)
    assert time_to(grid_s, np.array([0.7, 0.4, 0.8]), 0.6) == 0.0
    assert time_to(grid_s, np.array([0.2, 0.6, 0.5]), 0.6) == pytest.approx(10.0)
    assert time_to(grid_s, np.array([0.2, 0.4, 0.5]), 0.6) is None


def test_ladder_times_each_mode_to_accuracies_from_halfway_up_to_the_target():
    grid_s = np.array([0.0, 10.0, 20.0, 30.0])
    means = {"sync": np.array([0.2, 0.4, 0.6, 0.8]), "async": np.array([0.2, 0.6, 0.7, 0.8])}
    rungs = ladder(grid_s, means, "sync", target=0.8)
    assert [level for level, _ in rungs] == pytest.approx(np.linspace(0.5, 0.8, len(rungs)))
    first, last = rungs[0][1], rungs[-1][1]
    assert (first["sync"], first["async"]) == pytest.approx((15.0, 7.5))  # 0.5: halfway from 0.2 to 0.8
    assert (last["sync"], last["async"]) == pytest.approx((30.0, 30.0))


def test_lag_figures_weigh_steps_by_their_tokens_at_each_lag():
    steps = [{"lag_histogram": {"0": 10, "1": 30}, "lag/0/tokens": 10.0, "lag/0/masked_frac": 0.0,
              "lag/0/mean_abs_log_k": 0.01, "lag/1/tokens": 30.0, "lag/1/masked_frac": 0.1,
              "lag/1/mean_abs_log_k": 0.2},
             {"lag_histogram": {"1": 10}, "lag/1/tokens": 10.0, "lag/1/masked_frac": 0.3,
              "lag/1/mean_abs_log_k": 0.4}]
    figures = lag_figures(steps)
    assert figures["max lag"] == 1
    assert figures["lag 1 masked"] == pytest.approx((30 * 0.1 + 10 * 0.3) / 40)
    assert figures["lag 1 mean |log k|"] == pytest.approx((30 * 0.2 + 10 * 0.4) / 40)
    assert figures["lag 0 masked"] == 0.0


def test_machine_bound_slows_each_half_by_its_role_speed():
    sync = {"generator tokens per busy second": 100.0, "learner tokens per training second": 50.0}
    # generation 3 s, training + sync 2 s; overlapped, the generator decodes at 3/4 of its speed alone
    # (3 s -> 4 s) and the learner at 1/2 (2 s -> 4 s): a step takes 4 s against 5 s
    overlapped = {"generator tokens per busy second": 75.0, "learner tokens per training second": 25.0}
    assert machine_bound([step(0.5, 2.5, 1.5, 0.5)], sync, overlapped) == pytest.approx(5 / 4)
    # at the speeds they had alone it is the overlap bound
    assert machine_bound([step(0.5, 2.5, 1.5, 0.5)], sync, sync) == pytest.approx(overlap_bound([step(0.5, 2.5, 1.5, 0.5)]))
