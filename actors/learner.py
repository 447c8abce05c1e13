"""Learner actor: the Ray shell around `learner.Trainer`, one per learner rank.

The K learner ranks form one process group and hold the model under FSDP2. Each
rank owns an inbound trajectory channel (the judges round-robin scored groups over
all learners) and takes `prompts_per_step / K` groups per step. Rank 0 is also rank
0 of the weight group and broadcasts each new version, gathering the sharded
weights one bucket at a time with the other learner ranks. All methods run on the
actor's one thread, so the ZeroMQ socket and the process groups are only touched
from there.
"""
import random
import time
from collections import Counter
from pathlib import Path

import ray
import torch

from actors.tasks import build_task
from comm.channel import TrajectoryReceiver
from comm.logs import setup_logging
from comm.weights import WeightPublisher, free_port, init_weight_group, plan_buckets
from conf.schema import Config
from learner.batch import collate, collate_demonstrations, select_informative
from learner.metrics import merge_rank_stats
from learner.sharding import (all_reduce_sum, full_tensor, gather_stats, init_learner_group, loss_scale,
                              shard_model)
from learner.trainer import Trainer
from model.moe import MoECausalLM

DRAIN_QUIET_S = 1.0  # end of run: a second without arrivals means nothing is left on the way


@ray.remote
class Learner:
    def __init__(self, cfg: Config, rank: int):
        self.cfg, self.rank = cfg, rank
        self.log = setup_logging("learner", rank)
        torch.set_num_threads(cfg.learner.torch_threads)
        torch.manual_seed(cfg.run.seed)
        self.task = build_task(cfg.task)
        self.model = MoECausalLM(cfg.model)
        self.trainer: Trainer | None = None
        self.counters: Counter = Counter()
        self.receiver: TrajectoryReceiver | None = None
        self.publisher: WeightPublisher | None = None
        self.groups_consumed = 0  # C3PO++ rounds: groups taken since the start
        self.log.info("policy has {:,} parameters", self.model.count_parameters())

    def address(self) -> tuple[str, int]:
        """A free rendezvous port on this node (for the learner group or the weight group)."""
        return self.cfg.comm.host, free_port(self.cfg.comm.host)

    def setup(self, addr: str, port: int) -> str:
        """Join the learner group, shard the model, bind the inbound channel; returns its endpoint."""
        if self.cfg.learner.num > 1:
            init_learner_group(self.rank, self.cfg.learner.num, addr, port, self.cfg.comm.collective_timeout_s)
        self.model = shard_model(self.model)
        self.trainer = Trainer(self.model, self.cfg.learner, self.cfg.algo, self.cfg.generator.temperature)
        self.receiver = TrajectoryReceiver(self.cfg.comm.host, self.cfg.comm.hwm)
        return self.receiver.endpoint

    def join_weight_group(self, addr: str, port: int, world_size: int) -> None:
        group = init_weight_group(0, world_size, addr, port, self.cfg.comm.collective_timeout_s)
        self.publisher = WeightPublisher(group, self._weights(), self._bucket_bytes(),
                                         self.cfg.comm.collective_timeout_s)

    def _bucket_bytes(self) -> int:
        return int(self.cfg.comm.bucket_mb * 2**20)

    def _weights(self) -> list[tuple[str, torch.Tensor]]:
        """What generators need: parameters and persistent buffers (the expert bias)."""
        return list(self.model.state_dict().items())

    def warmup(self) -> dict:
        """Supervised warm-up on the task's imperfect demonstrations (each rank its own share)."""
        rng = random.Random(f"warmup-{self.cfg.run.seed}-{self.rank}")
        per_rank = self.cfg.learner.warmup_batch // self.cfg.learner.num
        start, stats = time.perf_counter(), {}
        for _ in range(self.cfg.learner.warmup_steps):
            pairs = [self.task.demonstration(rng) for _ in range(per_rank)]
            stats = self.trainer.sft_step(*collate_demonstrations(pairs, self.task.tokenizer.pad_id))
        return {**stats, "warmup_s": time.perf_counter() - start}

    def publish(self) -> dict:
        """Broadcast the weights as version `trainer.version`; every learner rank gathers with rank 0."""
        state = dict(self._weights())

        def fetch(names: list[str]) -> dict[str, torch.Tensor]:
            return {name: full_tensor(state[name]) for name in names}

        if self.publisher is not None:
            return {**self.publisher.publish(self.trainer.version, fetch), "version": self.trainer.version}
        plan = plan_buckets(list(state.items()), self._bucket_bytes())
        for index in range(plan.num_buckets):
            fetch(plan.bucket_names(index))  # the all-gathers rank 0 is doing for this bucket
        return {"version": self.trainer.version}

    def train_step(self, until_groups: int | None = None) -> dict:
        """Take this rank's batch, then one IcePop step with the other ranks (none if it is empty).

        The batch is prompts_per_step groups, or with C3PO++ rounds every group up to the
        `until_groups`-th since the start: what the generators had sent when the round closed.
        """
        groups, wait_s = self._next_batch() if until_groups is None else self._round_batch(until_groups)
        if not groups:
            return {"consumed": 0, "reward": 0.0, "accuracy": 0.0, "wait_s": wait_s,
                    "informative_groups": 0, "version": self.trainer.version}
        informative, dropped = select_informative(groups) if self.cfg.algo.filter_uninformative else (groups, 0)
        consumed = sum(len(g) for g in groups)
        self.counters["consumed_samples"] += consumed
        self.counters["dropped_uninformative"] += dropped * self.cfg.algo.group_size
        rewards = [t.reward for g in groups for t in g]
        stats = {"consumed": consumed, "reward": sum(rewards) / len(rewards), "wait_s": wait_s,
                 "accuracy": sum(r == 1.0 for r in rewards) / len(rewards),
                 "informative_groups": len(informative)}
        stats.update(self._update(informative, groups))
        stats["version"] = self.trainer.version
        return merge_rank_stats(gather_stats(stats))

    def _update(self, informative: list, groups: list) -> dict:
        """One optimizer step over all ranks; skipped by all when no rank has a signal."""
        # a rank with nothing to learn still joins FSDP's collectives, with a zero-weighted loss
        batch = collate(informative or groups, self.task.tokenizer.pad_id, self.cfg.algo.normalize_std)
        local_count = self.trainer.aggregation_count(batch) if informative else 0
        (global_count,) = all_reduce_sum([local_count])
        if global_count == 0:
            return {}
        scale = loss_scale(self.trainer.params.aggregation, local_count, global_count)
        start = time.perf_counter()
        stats = self.trainer.rl_step(batch, loss_scale=scale if informative else 0.0)
        stats["train_s"] = time.perf_counter() - start
        if not informative:
            stats["trained_tokens"] = 0
            return stats
        self.counters["trained_samples"] += sum(len(g) for g in informative)
        self.counters["trained_tokens"] += stats["trained_tokens"]
        return stats

    def _next_batch(self):
        """This rank's share of prompts_per_step groups; blocks until they are all here."""
        share = self.cfg.algo.prompts_per_step // self.cfg.learner.num
        groups, start = [], time.perf_counter()
        while len(groups) < share:
            group = self.receiver.recv_group(timeout_s=self.cfg.learner.recv_timeout_s)
            if group is None:
                raise TimeoutError(f"learner-{self.rank} got {len(groups)}/{share} groups in "
                                   f"{self.cfg.learner.recv_timeout_s}s at version {self.trainer.version}")
            groups.append(group)
        return groups, time.perf_counter() - start

    def _round_batch(self, until_groups: int):
        groups, start = [], time.perf_counter()
        while self.groups_consumed + len(groups) < until_groups:
            group = self.receiver.recv_group(timeout_s=self.cfg.learner.recv_timeout_s)
            if group is None:
                raise TimeoutError(f"learner-{self.rank} got {self.groups_consumed + len(groups)}/{until_groups} "
                                   f"groups of the round in {self.cfg.learner.recv_timeout_s}s")
            groups.append(group)
        self.groups_consumed += len(groups)
        return groups, time.perf_counter() - start

    def _drain(self) -> None:
        """At the end of a run: count samples still arriving as dropped (`run_end`), until quiet."""
        while (group := self.receiver.recv_group(timeout_s=DRAIN_QUIET_S)) is not None:
            self.counters["dropped_run_end"] += len(group)

    def stats(self) -> dict:
        drops = {f"dropped_{k}": v for k, v in self.receiver.dropped.items()} if self.receiver else {}
        return {**self.counters, **drops, "version": self.trainer.version if self.trainer else 0}

    def save(self, directory: str) -> str:
        """Every rank writes its shard of model, optimizer and trainer state (DCP)."""
        path = Path(directory)
        self.trainer.save(path)
        return str(path)

    def load(self, directory: str) -> int:
        self.trainer.load(Path(directory))
        return self.trainer.version

    def stop(self) -> dict:
        """Called after generators and judges stopped: what is still on its way is counted, then closed."""
        if self.receiver is not None:
            self._drain()
            self.receiver.close()
        return self.stats()
