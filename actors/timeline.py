"""timeline.json: every actor's phases over the run as a Chrome trace (Perfetto, chrome://tracing).

One trace process per actor (the driver first, then learners, judges, generators) and in it one
track per thread of the actor that entered phases (a generator's decode thread, the thread its
evaluations run on); one complete ("X") event per span, named by its phase, timestamps in
microseconds since the first span (whose wall-clock time is `otherData.epoch_s`). Actors' spans
arrive with their stats once per RL step (PhaseClock.take_spans), the driver's from its loop's
timers (Recorder.timer). Each node's clock is taken as it is: on a cluster, spans of two nodes
line up as well as the nodes' clocks do.

Bounded on long runs: actors draw their spans at a resolution (actors/phases.py,
SPAN_RESOLUTION_S: a span lasts at least that, and phases that alternate faster make one span of
the phase that took most of the time); here a span that continues its thread's previous one in
the same phase extends it; and each thread keeps its newest `max_spans` spans, the older ones
dropped and counted per actor in `otherData.dropped_spans`. An event takes about 100 bytes of
JSON, so the file stays under about 2 MB per thread (at the default 20,000) however long the run.
"""
import json
import os
from collections import Counter, deque
from pathlib import Path

from actors.phases import SPAN_RESOLUTION_S

MAX_SPANS_PER_THREAD = 20_000
ROLE_ORDER = ("driver", "learner", "judge", "generator")  # top to bottom in the viewer
CONTIGUOUS_S = 1e-6  # a span starting this close to its thread's previous end continues it


class Timeline:
    def __init__(self, max_spans: int = MAX_SPANS_PER_THREAD):
        self.max_spans = max_spans
        self.threads: dict[tuple[str, str], deque[list]] = {}  # (actor, thread) -> [phase, start_s, end_s]
        self.dropped: Counter = Counter()  # actor -> spans dropped, here or at the actor

    def add(self, actor: str, taken: dict) -> None:
        """An actor's spans, as its PhaseClock.take_spans() returned them."""
        self.dropped[actor] += taken["dropped"]
        for thread, spans in taken["threads"].items():
            for phase, start, end in spans:
                self.span(actor, thread, phase, start, end)

    def span(self, actor: str, thread: str, phase: str, start: float, end: float) -> None:
        """One span of `actor`'s `thread` in `phase`, from `start` to `end` (seconds since the epoch)."""
        spans = self.threads.setdefault((actor, thread), deque())
        if spans and spans[-1][0] == phase and abs(start - spans[-1][2]) <= CONTIGUOUS_S:
            spans[-1][2] = max(end, spans[-1][2])
            return
        if len(spans) == self.max_spans:
            spans.popleft()
            self.dropped[actor] += 1
        spans.append([phase, start, end])

    def trace(self) -> dict:
        """The Chrome trace (JSON object format) of every span kept."""
        starts = [spans[0][1] for spans in self.threads.values() if spans]
        epoch_s = min(starts, default=0.0)
        actors = sorted({actor for actor, _ in self.threads}, key=_viewer_order)
        pids = {actor: pid for pid, actor in enumerate(actors, 1)}
        events = []
        for actor, pid in pids.items():
            events += [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": actor}},
                       {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
        tids: Counter = Counter()
        for (actor, thread), spans in sorted(self.threads.items(), key=lambda item: _viewer_order(item[0][0])):
            pid = pids[actor]
            tids[pid] += 1
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[pid], "args": {"name": thread}})
            events += [{"ph": "X", "name": phase, "pid": pid, "tid": tids[pid], "ts": round((start - epoch_s) * 1e6, 1),
                        "dur": round((end - start) * 1e6, 1)} for phase, start, end in spans]
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"epoch_s": epoch_s, "resolution_s": SPAN_RESOLUTION_S,
                              "max_spans_per_thread": self.max_spans, "dropped_spans": dict(self.dropped)}}

    def write(self, path: Path) -> None:
        """Write the trace to `path` whole (through a temporary file, so a reader never sees half)."""
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.trace(), separators=(",", ":")))
        os.replace(partial, path)


def _viewer_order(actor: str) -> tuple:
    role, _, rank = actor.partition("-")
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), role,
            int(rank) if rank.isdigit() else 0, actor)
