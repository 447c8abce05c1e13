"""Where an actor's time goes: seconds per named phase since the clock started, and the spans.

A generator's decode thread spends every moment in one of its phases (decoding, idle for
lack of prompts, loading weights, blocked on a full send queue, paused for a round, held for
a checkpoint, waiting while an evaluation has the model); a judge's scoring thread waits for
groups, scores them and sends them on; a learner is in the driver's calls (waiting for a batch, training, publishing) or between them
(`between_calls`). `seconds()` adds the time not yet inside any phase to `unaccounted`, so the
phases plus that always add up to the wall time since `start`; the metrics carry them per step,
from which the overlap of generation and training is read.

The clock also keeps each thread's phases as spans for the run's timeline (actors/timeline.py):
`take_spans()` hands over those recorded since the last call (an actor's `stats()` carries them
to the driver once per RL step). Spans are drawn at `SPAN_RESOLUTION_S` (see SpanLog), so a
thread that switches phase every few microseconds still leaves few of them.
"""
import functools
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager

SPAN_RESOLUTION_S = 0.005  # the timeline's grain: each slot of this width is drawn as one phase
MAX_SPANS = 20_000         # per thread between two take_spans(); past that the oldest go, counted
ACTOR_CALLS = "actor calls"  # the spans' thread name for every thread Ray runs an actor's calls on


class SpanLog:
    """One thread's phases as spans `[phase, start_s, end_s]` (seconds since the epoch), at a
    resolution and bounded.

    Time is cut into slots of `resolution_s`; each slot that holds any phase time is drawn as the
    phase that took most of it, and runs of slots of one phase make one span. So every span lasts
    at least the resolution, spans of one log never overlap, a thread inside phases all the
    time is covered without gaps, and a slot without any phase time stays a gap.
    The exact seconds per phase are PhaseClock.seconds()'s; the spans are their picture. At most
    `limit` spans are kept between two `take()`s: past that the oldest go, counted in `dropped`.
    """

    def __init__(self, resolution_s: float = SPAN_RESOLUTION_S, limit: int = MAX_SPANS):
        self.resolution_s, self.limit = resolution_s, limit
        self.spans: deque[list] = deque()  # [phase, first slot, end slot], closed slots only
        self.dropped = 0
        self.slot: int | None = None       # the open slot, still taking phase time
        self.drawn_until = 0               # the slot after the last one drawn
        self.slot_seconds: Counter = Counter()

    def add(self, phase: str, start: float, end: float) -> None:
        r = self.resolution_s
        # a span begun before the open slot or what is drawn (an enclosing phase's): that part stays as drawn
        start = max(start, (self.drawn_until if self.slot is None else self.slot) * r)
        if end <= start:
            return  # nothing to draw
        first, last = int(start // r), int(end // r)
        if self.slot is not None and first > self.slot:
            self._close_slot()
        self.slot = first
        if first == last:
            self.slot_seconds[phase] += end - start
            return
        self.slot_seconds[phase] += (first + 1) * r - start
        self._close_slot()
        if last > first + 1:
            self._draw(phase, first + 1, last)  # the slots in between are this phase's alone
        if end > last * r:
            self.slot = last
            self.slot_seconds[phase] += end - last * r

    def take(self, now: float) -> tuple[list[list], int]:
        """The spans drawn so far (the open slot too once `now` is past it) and how many were dropped."""
        if self.slot is not None and int(now // self.resolution_s) > self.slot:
            self._close_slot()
        r = self.resolution_s
        spans = [[phase, first * r, end * r] for phase, first, end in self.spans]
        dropped, self.dropped = self.dropped, 0
        self.spans.clear()
        return spans, dropped

    def _close_slot(self) -> None:
        if self.slot_seconds:
            phase = max(self.slot_seconds, key=self.slot_seconds.get)
            self._draw(phase, self.slot, self.slot + 1)
        self.slot, self.slot_seconds = None, Counter()

    def _draw(self, phase: str, first: int, end: int) -> None:
        self.drawn_until = end
        last = self.spans[-1] if self.spans else None
        if last is not None and last[0] == phase and last[2] == first:
            last[2] = end
            return
        if len(self.spans) == self.limit:
            self.spans.popleft()
            self.dropped += 1
        self.spans.append([phase, first, end])


class PhaseClock:
    def __init__(self, rest: str = "unaccounted"):
        self.rest = rest  # the name of time spent outside every phase
        self._lock = threading.Lock()
        self._seconds: Counter = Counter()
        self._started = time.monotonic()
        self._inside = 0.0  # seconds spent inside phases, for the rest's share
        self._spans: dict[str, SpanLog] = {}  # by thread name

    @contextmanager
    def phase(self, name: str):
        start, wall_start = time.monotonic(), time.time()
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            thread = _thread_name()
            with self._lock:
                self._seconds[name] += elapsed
                self._inside += elapsed
                self._spans.setdefault(thread, SpanLog()).add(name, wall_start, wall_start + elapsed)

    def seconds(self) -> dict[str, float]:
        """Seconds per phase since the start, plus the rest, which make up the whole wall time."""
        with self._lock:
            wall = time.monotonic() - self._started
            return {**self._seconds, self.rest: max(0.0, wall - self._inside), "wall": wall}

    def take_spans(self) -> dict:
        """The spans drawn since the last call: {"threads": {thread name: [[phase, start_s, end_s],
        ...]}, "dropped": spans dropped past MAX_SPANS}, for Timeline.add."""
        threads, dropped = {}, 0
        with self._lock:
            for thread, log in self._spans.items():
                threads[thread], thread_dropped = log.take(time.time())
                dropped += thread_dropped
        return {"threads": threads, "dropped": dropped}


def _thread_name() -> str:
    """This thread's name, but one name for the threads Ray runs an actor's calls on: the main thread,
    and for a threaded actor threads started outside Python (which `threading` calls dummies)."""
    thread = threading.current_thread()
    calls = thread is threading.main_thread() or isinstance(thread, threading._DummyThread)
    return ACTOR_CALLS if calls else thread.name


def timed(phase: str):
    """Decorate an actor method: its whole call counts as `phase` on the actor's `clock`."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with self.clock.phase(phase):
                return method(self, *args, **kwargs)
        return wrapper
    return decorate
