"""The overlap bound of bench/async_vs_sync.py, from a synchronous run's phase times."""
import pytest

from bench.async_vs_sync import overlap_bound


def step(admit: float, collect: float, train: float, sync: float) -> dict:
    return {"time/admit_s": admit, "time/collect_s": collect, "time/train_s": train, "time/weight_sync_s": sync}


def test_bound_is_the_sync_step_over_its_slower_half():
    # generation 3 s, training + sync 2 s: a sync step takes 5 s, an overlapped one 3 s
    assert overlap_bound([step(0.5, 2.5, 1.5, 0.5)]) == pytest.approx(5 / 3)
    # averaged over steps: generation (1 + 3) / 2 = 2, training + sync (2 + 2) / 2 = 2 -> 2x at most
    assert overlap_bound([step(0, 1, 1.5, 0.5), step(0, 3, 1.5, 0.5)]) == pytest.approx(2.0)
