"""Where an actor's time goes: seconds per named phase, since the clock started.

A generator's decode thread spends every moment in one of its phases (decoding, idle for
lack of prompts, loading weights, blocked on a full send queue, paused for a round, held for
a checkpoint); a learner in the driver's calls (waiting for a batch, training, publishing) or
between them (`between_calls`). `seconds()` adds the time not yet inside any phase to
`unaccounted`, so the phases plus that always add up to the wall time since `start`; the
metrics carry them per step, from which the overlap of generation and training is read.
"""
import functools
import threading
import time
from collections import Counter
from contextlib import contextmanager


class PhaseClock:
    def __init__(self, rest: str = "unaccounted"):
        self.rest = rest  # the name of time spent outside every phase
        self._lock = threading.Lock()
        self._seconds: Counter = Counter()
        self._started = time.monotonic()
        self._inside = 0.0  # seconds spent inside phases, for the rest's share

    @contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            with self._lock:
                self._seconds[name] += elapsed
                self._inside += elapsed

    def seconds(self) -> dict[str, float]:
        """Seconds per phase since the start, plus the rest, which make up the whole wall time."""
        with self._lock:
            wall = time.monotonic() - self._started
            return {**self._seconds, self.rest: max(0.0, wall - self._inside), "wall": wall}


def timed(phase: str):
    """Decorate an actor method: its whole call counts as `phase` on the actor's `clock`."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with self.clock.phase(phase):
                return method(self, *args, **kwargs)
        return wrapper
    return decorate
