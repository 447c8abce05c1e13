"""Staleness control by admission, not by discard-and-requeue.

With at most (eta + 1) * B samples admitted ahead of what the learner has consumed,
and the learner consuming whole batches of B in admission order, a sample admitted
while the learner is at version v is trained on at version v + eta at the latest:
its lag is at most eta. eta = 0 is synchronous on-policy RL. Samples that finish out
of order can wait longer, which is why every token's lag is still measured.
"""
import numpy as np
import torch


class AdmissionController:
    """No more than (eta + 1) * B samples may be admitted ahead of what the learner has consumed.

    Counts are in samples and cumulative: `admitted` and `consumed` only grow.
    """

    def __init__(self, batch_size: int, max_staleness: int):
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        if max_staleness < 0:
            raise ValueError(f"max_staleness ({max_staleness}) must be >= 0")
        self.batch_size = batch_size
        self.max_staleness = max_staleness
        self.max_in_flight = (max_staleness + 1) * batch_size
        self.admitted = 0
        self.consumed = 0

    @property
    def in_flight(self) -> int:
        """Samples admitted but not yet consumed by the learner."""
        return self.admitted - self.consumed

    def capacity(self) -> int:
        """How many more samples may be admitted now."""
        return self.max_in_flight - self.in_flight

    def admissible_groups(self, group_size: int) -> int:
        """How many whole groups of group_size samples may be admitted now."""
        if group_size < 1:
            raise ValueError(f"group_size ({group_size}) must be >= 1")
        return self.capacity() // group_size

    def admit(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot admit a negative count ({n})")
        if n > self.capacity():
            raise ValueError(
                f"admitting {n} samples would put {self.in_flight + n} in flight, "
                f"over (max_staleness + 1) * batch_size = {self.max_in_flight}")
        self.admitted += n

    def consume(self, n: int) -> None:
        """The learner consumed n samples."""
        if n < 0:
            raise ValueError(f"cannot consume a negative count ({n})")
        if n > self.in_flight:
            raise ValueError(f"consuming {n} samples but only {self.in_flight} are in flight")
        self.consumed += n


def lag_histogram(lags: torch.Tensor | np.ndarray,
                  mask: torch.Tensor | np.ndarray | None = None) -> dict[int, int]:
    """Token count per policy lag (learner version - token's policy version), lags ascending.

    mask, of the same shape, selects the real tokens (padding excluded).
    """
    lags = _to_numpy(lags)
    if mask is not None:
        mask = _to_numpy(mask).astype(bool)
        if mask.shape != lags.shape:
            raise ValueError(f"mask shape {mask.shape} != lags shape {lags.shape}")
        lags = lags[mask]
    values, counts = np.unique(lags, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _to_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
