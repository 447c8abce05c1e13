"""Watching a run: phase spans at a resolution, the Chrome trace and its bound, TensorBoard event files."""
import json
import threading
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from actors.phases import ACTOR_CALLS, SPAN_RESOLUTION_S, PhaseClock, SpanLog
from actors.record import Recorder
from actors.timeline import Timeline
from conf.load import load_config


def test_each_slot_is_drawn_as_the_phase_that_took_most_of_it():
    log = SpanLog(resolution_s=1.0)
    log.add("decoding", 0.0, 3.2)
    log.add("sending", 3.2, 3.3)   # slot 3: decoding 0.3 s, sending 0.1 s, idle 0.2 s, decoding again 0.1 s
    log.add("idle", 3.3, 3.5)
    log.add("decoding", 3.5, 3.6)
    log.add("idle", 4.0, 7.5)
    log.add("decoding", 9.2, 9.4)  # slot 8 holds no phase: a gap
    assert log.take(now=12.0) == ([["decoding", 0.0, 4.0], ["idle", 4.0, 8.0], ["decoding", 9.0, 10.0]], 0)
    assert log.take(now=13.0) == ([], 0)


def test_the_open_slot_waits_until_its_time_is_past():
    log = SpanLog(resolution_s=1.0)
    log.add("training", 2.0, 2.5)
    assert log.take(now=2.7) == ([], 0)  # slot 2 may still take time
    log.add("training", 2.7, 2.9)
    assert log.take(now=3.1) == ([["training", 2.0, 3.0]], 0)


def test_an_enclosing_phase_keeps_what_is_drawn():
    log = SpanLog(resolution_s=1.0)
    log.add("inner", 0.0, 2.0)
    log.add("outer", 0.0, 3.5)  # ends after the inner one and began before it: drawn from 2.0 on
    assert log.take(now=5.0) == ([["inner", 0.0, 2.0], ["outer", 2.0, 4.0]], 0)


def test_span_log_keeps_the_newest_spans_and_counts_the_rest():
    log = SpanLog(resolution_s=1.0, limit=3)
    for slot, phase in enumerate("abab"):
        log.add(phase, slot, slot + 1.0)
    assert log.take(now=10.0) == ([["b", 1.0, 2.0], ["a", 2.0, 3.0], ["b", 3.0, 4.0]], 1)


def test_phase_clock_hands_over_each_threads_spans_once():
    clock = PhaseClock()
    before = time.time()
    with clock.phase("decoding"):
        time.sleep(0.05)
    after = time.time()

    def evaluate():
        with clock.phase("evaluating"):
            time.sleep(0.03)

    thread = threading.Thread(target=evaluate, name="eval-thread")
    thread.start()
    thread.join()
    time.sleep(0.01)  # past the last open slot
    taken = clock.take_spans()
    assert set(taken["threads"]) == {ACTOR_CALLS, "eval-thread"} and taken["dropped"] == 0  # pytest's main thread
    [[phase, start, end]] = taken["threads"][ACTOR_CALLS]
    assert phase == "decoding" and before - SPAN_RESOLUTION_S < start and end < after + SPAN_RESOLUTION_S
    assert end - start >= 0.05  # the slots the phase touched, whole
    assert [span[0] for span in taken["threads"]["eval-thread"]] == ["evaluating"]
    assert clock.take_spans() == {"threads": {ACTOR_CALLS: [], "eval-thread": []}, "dropped": 0}


def test_trace_has_a_named_track_per_actor_thread_in_microseconds(tmp_path):
    timeline = Timeline()
    timeline.add("generator-0", {"threads": {"decode": [["decoding", 100.0, 101.0], ["idle", 101.0, 101.5]]},
                                 "dropped": 2})
    timeline.add("generator-0", {"threads": {"decode": [["idle", 101.5, 102.0]]}, "dropped": 0})  # continues
    timeline.add("learner-0", {"threads": {"MainThread": [["training", 100.5, 100.75]]}, "dropped": 0})
    timeline.span("driver", "loop", "train", 100.4, 100.8)
    timeline.write(tmp_path / "timeline.json")
    trace = json.loads((tmp_path / "timeline.json").read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {1: "driver", 2: "learner-0", 3: "generator-0"}
    spans = [(names[e["pid"]], e["name"], e["ts"], e["dur"]) for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans == [("driver", "train", 400_000.0, 400_000.0), ("learner-0", "training", 500_000.0, 250_000.0),
                     ("generator-0", "decoding", 0.0, 1_000_000.0), ("generator-0", "idle", 1_000_000.0, 1_000_000.0)]
    threads = {(names[e["pid"]], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert threads == {("driver", 1): "loop", ("learner-0", 1): "MainThread", ("generator-0", 1): "decode"}
    assert trace["otherData"]["epoch_s"] == 100.0 and trace["otherData"]["dropped_spans"]["generator-0"] == 2


def test_trace_keeps_the_newest_spans_per_thread():
    timeline = Timeline(max_spans=2)
    for second, phase in enumerate(["decoding", "idle", "decoding", "sending"]):
        timeline.span("generator-0", "decode", phase, float(second), second + 0.5)
    trace = timeline.trace()
    assert [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"] == ["decoding", "sending"]
    assert trace["otherData"]["dropped_spans"] == {"generator-0": 2}


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's TensorBoard event files, as TensorBoard itself reads them."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def step_record(step: int, reward: float, **figures) -> dict:
    """A step's record with the pool's totals the recorder's rates need."""
    totals = {"generated_tokens": 0, "generator_flops": 0, "learner_flops": 0, "generator_peak_flops": 0,
              "learner_peak_flops": 0, "rl_s": step + 1.0}
    return {"step": step, "reward": reward, **totals, **figures}


def test_tensorboard_has_the_figures_of_metrics_jsonl(tmp_path):
    recorder = Recorder(tmp_path, load_config([]))
    recorder.evaluation("after_warmup", {"accuracy": 0.25, "examples": ["1+1=002"]})
    for step, reward in enumerate([0.5, 0.625, 0.75]):
        recorder.step(step_record(step, reward, lag_histogram={"0": 6, "1": step}, fates={"a": "x"}))
    recorder.evaluation("after_rl", {"accuracy": 0.5})
    recorder.finish("finished", {})
    scalars = read_scalars(tmp_path)
    assert scalars["reward"] == [(0, 0.5), (1, 0.625), (2, 0.75)]
    assert scalars["lag_histogram/1"] == [(0, 0), (1, 1), (2, 2)]
    assert scalars["evaluation/after_warmup/accuracy"] == [(0, 0.25)]
    assert scalars["evaluation/after_rl/accuracy"] == [(3, 0.5)]
    assert not any(tag.startswith(("fates", "wall", "step")) for tag in scalars)


def test_a_resumed_run_replaces_the_lost_steps_in_tensorboard(tmp_path):
    recorder = Recorder(tmp_path, load_config([]))
    for step in range(3):
        recorder.step(step_record(step, 0.5))
    recorder.finish("failed", {})
    resumed = Recorder(tmp_path, load_config([]))
    resumed.resume(2)  # the checkpoint after step 1: step 2 runs again
    resumed.step(step_record(2, 0.875))
    resumed.finish("finished", {})
    assert read_scalars(tmp_path)["reward"] == [(0, 0.5), (1, 0.5), (2, 0.875)]
    assert (tmp_path / "timeline-before-resume-at-step-000002.json").exists()
