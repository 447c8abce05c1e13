"""Judge actor: scores each trajectory of a group and forwards the group to the learner.

A scoring thread owns both ZeroMQ sockets: it pulls groups from the generators,
scores every trajectory with a per-sample timeout (a timeout scores 0 and is
counted under `judge_timeout`), and pushes the scored group on. Malformed
messages are dropped and counted by the receiving channel.
"""
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import ray

from actors.tasks import build_task
from comm.channel import TrajectoryReceiver, TrajectorySender
from comm.logs import setup_logging
from comm.wire import Trajectory
from conf.schema import Config

POLL_S = 0.1


@ray.remote
class Judge:
    def __init__(self, cfg: Config, rank: int):
        self.cfg, self.rank = cfg, rank
        self.log = setup_logging("judge", rank)
        self.task = build_task(cfg.task)
        self.scorers = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"judge-{rank}-score")
        self.counters: Counter = Counter()
        self.stopping = threading.Event()
        self.endpoint_ready = threading.Event()
        self.endpoint = ""
        self.receiver_drops: Counter = Counter()
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def start(self, learner_endpoints: list[str]) -> str:
        """Bind the inbound channel in the scoring thread; returns its endpoint."""
        self.thread = threading.Thread(target=self._run, args=(learner_endpoints,), daemon=True,
                                       name=f"judge-{self.rank}")
        self.thread.start()
        self.endpoint_ready.wait(timeout=30)
        self._raise_if_failed()
        return self.endpoint

    def stats(self) -> dict:
        self._raise_if_failed()
        return {**self.counters, **{f"dropped_{k}": v for k, v in self.receiver_drops.items()}}

    def stop(self) -> dict:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        return self.stats()

    # -- scoring thread ------------------------------------------------------------
    def _run(self, learner_endpoints: list[str]) -> None:
        receiver = TrajectoryReceiver(self.cfg.comm.host, self.cfg.comm.hwm)
        sender = TrajectorySender(learner_endpoints, self.cfg.comm.hwm, self.cfg.comm.send_timeout_s)
        self.endpoint = receiver.endpoint
        self.endpoint_ready.set()
        try:
            while not self.stopping.is_set():
                group = receiver.recv_group(timeout_s=POLL_S)
                self.receiver_drops = receiver.dropped
                if group is not None:
                    sender.send_group(self._score_group(group))
        except BaseException as err:
            self.failure = err
            self.log.exception("scoring thread failed")
        finally:
            receiver.close()
            sender.close()

    def _score_group(self, group: list[Trajectory]) -> list[Trajectory]:
        for trajectory in group:
            start = time.perf_counter()
            future = self.scorers.submit(self.task.score, trajectory.completion_tokens, trajectory.task_meta)
            try:
                trajectory.reward, reason = future.result(timeout=self.cfg.judge.timeout_s), "ok"
            except FutureTimeout:
                trajectory.reward, reason = 0.0, "judge_timeout"
            self.counters[reason] += 1
            trajectory.judge = {"reason": reason, "judge": f"judge-{self.rank}"}
            trajectory.timings = {**trajectory.timings, "judge_s": time.perf_counter() - start}
        self.counters["judged_samples"] += len(group)
        return group

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"judge-{self.rank} scoring thread failed: {self.failure!r}")
