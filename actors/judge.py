"""Judge actor: scores each trajectory of a group and forwards the group to the learner.

A scoring thread owns both ZeroMQ sockets: it pulls groups from the generators, judges every
trajectory, and pushes the scored group on. Malformed messages are dropped and counted by the
receiving channel.

Judging never blocks training for long: each sample gets `judge.timeout_s`. Scoring that can
hang runs in a process the task kills when that time is up (math: a comparison worker; code:
the sandboxed program), so a timed-out sample scores 0 with reason `judge_timeout` and the
judge moves on, no thread left stuck. Every reason (correct, wrong_answer, judge_timeout, the
sandbox verdicts, ...) is counted in the actor's stats, next to the judging rate: samples per
second of scoring time, the capacity that `judge.num` scales. The scoring thread's time is on a
PhaseClock (actors/phases.py): waiting for groups, scoring, sending them on.

At stop, the group being scored is abandoned (after its current sample) and the groups still
queued are drained; both are counted as `dropped_run_end` and reported by prompt uid, so every
sample is accounted for. The judge binds on its node's address (comm.addresses). A judge that
replaces a dead one on the same node binds the same endpoint, so the generators' sockets
reconnect to it by themselves; one placed on another node binds anew, and the driver points the
generators at it.
"""
import os
import threading
import time
from collections import Counter

import ray

from actors.phases import PhaseClock, timed
from actors.telemetry import ActorMetrics
from actors.tasks import build_task, judge_completion
from comm.addresses import bind_address
from comm.auth import ChannelKeys, endpoint_host
from comm.channel import TrajectoryReceiver, TrajectorySender
from comm.logs import setup_logging
from comm.placement import BindsCores
from comm.wire import Trajectory
from conf.schema import Config

POLL_S = 0.1
DRAIN_QUIET_S = 1.0  # at stop: a second without arrivals means nothing is left on the way (as the learner)


@ray.remote
class Judge(BindsCores):
    def __init__(self, cfg: Config, rank: int, keys: ChannelKeys | None = None):
        self.cfg, self.rank, self.keys = cfg, rank, keys
        self.name = f"judge-{rank}"
        self.bind_host, self.advertised_host = bind_address(cfg.comm.host, ray.util.get_node_ip_address())
        self.log = setup_logging("judge", rank)
        self.task = build_task(cfg.task)
        self.counters: Counter = Counter()
        self.scoring_s = 0.0
        self.stopping = threading.Event()
        self.endpoint_ready = threading.Event()
        self.endpoint = ""
        self.receiver_drops: Counter = Counter()
        self.fates: dict[str, str] = {}
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.clock = PhaseClock()
        self.metrics = ActorMetrics("judge", self.name)

    def start(self, learner_endpoints: list[str], reuse: str = "") -> str:
        """Bind the inbound channel in the scoring thread; returns its endpoint.

        A judge replacing a dead one binds the dead one's endpoint (`reuse`) when it is on this
        node, so the generators' connections to it come back by themselves; elsewhere any port.
        """
        port = int(reuse.rsplit(":", 1)[1]) if reuse and endpoint_host(reuse) == self.advertised_host else 0
        self.clock = PhaseClock()  # the scoring thread's time, phase by phase, from now on
        self.thread = threading.Thread(target=self._run, args=(learner_endpoints, port), daemon=True,
                                       name=self.name)
        self.thread.start()
        self.endpoint_ready.wait(timeout=30)
        self._raise_if_failed()
        return self.endpoint

    def stats(self) -> dict:
        """Counters by reason, drops, the judging rate (samples per second of scoring), the phases and
        the spans since the last call."""
        self._raise_if_failed()
        judged = self.counters["judged_samples"]
        rate = judged / self.scoring_s if self.scoring_s else 0.0
        verdicts = {k: v for k, v in self.counters.items() if k != "judged_samples" and not k.startswith("dropped_")}
        self.metrics.publish({"judgments_per_s": rate, "latency_s": self.scoring_s / judged if judged else None,
                              "judged_samples": judged, "timeouts": self.counters["judge_timeout"]}, verdicts)
        return {**self.counters, **{f"dropped_{k}": v for k, v in self.receiver_drops.items()}, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "judged_samples": judged, "scoring_s": self.scoring_s,
                "judgments_per_s": rate, "phases": self.clock.seconds(), "spans": self.clock.take_spans()}

    def watch(self) -> None:
        """Returns when the judge stops, raises when its scoring thread failed; the driver keeps
        one call pending to see it die or fail."""
        self.stopping.wait()
        self._raise_if_failed()

    def stop(self) -> dict:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=self.cfg.judge.timeout_s + 10)  # the sample being scored, then the drain
        return {**self.stats(), "fates": self.fates}

    # -- scoring thread ------------------------------------------------------------
    def _run(self, learner_endpoints: list[str], port: int) -> None:
        receiver = TrajectoryReceiver(self.bind_host, self.cfg.comm.hwm, keys=self.keys, port=port,
                                      advertised_host=self.advertised_host)
        sender = TrajectorySender(learner_endpoints, self.cfg.comm.hwm, self.cfg.comm.send_timeout_s, keys=self.keys)
        self.endpoint = receiver.endpoint
        self.endpoint_ready.set()
        try:
            while not self.stopping.is_set():
                group = self._next_group(receiver, POLL_S)
                self.receiver_drops = receiver.dropped
                if group is not None and self._score_group(group):
                    with self.clock.phase("sending"):  # blocks only at the learners' high-water mark
                        sender.send_group(group)
            while (group := self._next_group(receiver, DRAIN_QUIET_S)) is not None:
                self._drop_at_stop(group)
        except BaseException as err:
            self.failure = err
            self.log.exception("scoring thread failed")
            self.stopping.set()
        finally:
            receiver.close()
            sender.close()

    def _next_group(self, receiver: TrajectoryReceiver, timeout_s: float) -> list[Trajectory] | None:
        with self.clock.phase("waiting"):
            return receiver.recv_group(timeout_s=timeout_s)

    @timed("scoring")
    def _score_group(self, group: list[Trajectory]) -> bool:
        """Score every trajectory in place; False if the judge is stopping (the group is dropped)."""
        for trajectory in group:
            if self.stopping.is_set():
                self._drop_at_stop(group)
                return False
            start = time.perf_counter()
            judgment = judge_completion(self.task, trajectory.completion_tokens, trajectory.task_meta,
                                        self.cfg.judge.timeout_s)
            seconds = time.perf_counter() - start
            self.scoring_s += seconds
            self.counters[judgment.reason] += 1
            self.counters["judged_samples"] += 1
            trajectory.reward = judgment.reward
            trajectory.judge = {"reason": judgment.reason, "judge": self.name, "detail": judgment.detail}
            trajectory.timings = {**trajectory.timings, "judge_s": seconds}
        return True

    def _drop_at_stop(self, group: list[Trajectory]) -> None:
        self.counters["dropped_run_end"] += len(group)
        self.fates[group[0].prompt_uid] = "run_end"

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"{self.name} scoring thread failed: {self.failure!r}")
