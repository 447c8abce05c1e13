"""Admission control and the lag histogram."""
from collections import deque

import numpy as np
import pytest
import torch

from learner.staleness import AdmissionController, lag_histogram

BATCH_SIZE = 8
GROUP_SIZE = 4


@pytest.mark.parametrize("eta", [0, 1, 2, 4])
def test_random_schedule_never_exceeds_bound(eta):
    rng = np.random.default_rng(eta)
    bound = (eta + 1) * BATCH_SIZE   # eta 0 -> 8, 1 -> 16, 2 -> 24, 4 -> 40
    control = AdmissionController(BATCH_SIZE, eta)
    assert control.capacity() == bound
    for _ in range(2000):
        if rng.random() < 0.5:
            control.admit(int(rng.integers(0, control.capacity() + 1)))
        else:
            control.consume(int(rng.integers(0, control.in_flight + 1)))
        assert 0 <= control.in_flight <= bound
        assert control.capacity() == bound - control.in_flight
        assert control.in_flight == control.admitted - control.consumed
        assert control.admissible_groups(GROUP_SIZE) == control.capacity() // GROUP_SIZE
        before = (control.admitted, control.consumed)
        with pytest.raises(ValueError, match="in flight"):
            control.admit(control.capacity() + 1)
        assert (control.admitted, control.consumed) == before


@pytest.mark.parametrize("eta", [0, 1, 2, 4])
def test_lag_of_fifo_batches_is_at_most_eta(eta):
    """Generator admits whole groups stamped with the learner's version; learner trains whole
    batches in admission order and publishes after each: no sample is older than eta."""
    rng = np.random.default_rng(100 + eta)
    control = AdmissionController(BATCH_SIZE, eta)
    queue = deque()    # policy version each admitted sample was generated with
    lags = []
    for _ in range(2000):
        version = control.consumed // BATCH_SIZE
        if rng.random() < 0.5:
            groups = int(rng.integers(0, control.admissible_groups(GROUP_SIZE) + 1))
            control.admit(groups * GROUP_SIZE)
            queue.extend([version] * (groups * GROUP_SIZE))
        elif control.in_flight >= BATCH_SIZE:
            control.consume(BATCH_SIZE)
            lags.extend(version - queue.popleft() for _ in range(BATCH_SIZE))
    assert lags and max(lags) <= eta


@pytest.mark.parametrize("eta", [0, 1, 2, 4])
def test_greedy_generator_reaches_lag_eta(eta):
    # Admitting everything allowed fills (eta + 1) batches at version 0; the last of them
    # is trained at version eta, so the bound is tight (eta = 0 is on-policy).
    control = AdmissionController(BATCH_SIZE, eta)
    queue = deque()
    lags = []
    for _ in range(3 * (eta + 1)):
        version = control.consumed // BATCH_SIZE
        admitted = control.admissible_groups(GROUP_SIZE) * GROUP_SIZE
        control.admit(admitted)
        queue.extend([version] * admitted)
        control.consume(BATCH_SIZE)
        lags.extend(version - queue.popleft() for _ in range(BATCH_SIZE))
    assert max(lags) == eta


def test_admissible_groups_rounds_down():
    # bound (1 + 1) * 10 = 20; after admitting 7, capacity 13 -> 13 // 4 = 3 groups of 4
    control = AdmissionController(batch_size=10, max_staleness=1)
    control.admit(7)
    assert control.capacity() == 13
    assert control.admissible_groups(4) == 3
    with pytest.raises(ValueError, match="group_size"):
        control.admissible_groups(0)


def test_rejects_invalid_counts():
    with pytest.raises(ValueError, match="batch_size"):
        AdmissionController(batch_size=0, max_staleness=1)
    with pytest.raises(ValueError, match="max_staleness"):
        AdmissionController(batch_size=4, max_staleness=-1)
    control = AdmissionController(batch_size=4, max_staleness=0)
    with pytest.raises(ValueError, match="over"):
        control.admit(5)
    control.admit(3)
    with pytest.raises(ValueError, match="only 3"):
        control.consume(4)
    with pytest.raises(ValueError, match="negative"):
        control.admit(-1)
    with pytest.raises(ValueError, match="negative"):
        control.consume(-1)
    assert (control.admitted, control.consumed, control.in_flight) == (3, 0, 3)


def test_lag_histogram_counts_real_tokens():
    lags = torch.tensor([[0, 1, 1, 3], [2, 0, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # real tokens: 0, 1, 1, 3, 2, 0 -> {0: 2, 1: 2, 2: 1, 3: 1}; the 9s are padding
    assert lag_histogram(lags, mask) == {0: 2, 1: 2, 2: 1, 3: 1}
    # numpy input, no mask: the two 9s count too
    assert lag_histogram(lags.numpy()) == {0: 2, 1: 2, 2: 1, 3: 1, 9: 2}
    assert list(lag_histogram(lags)) == [0, 1, 2, 3, 9]
    assert lag_histogram(torch.zeros(0, dtype=torch.long)) == {}
    with pytest.raises(ValueError, match="mask shape"):
        lag_histogram(lags, mask[:, :2])
