"""Learner actor: the Ray shell around `learner.Trainer`.

It owns the inbound trajectory channel (scored groups from the judges) and rank 0
of the weight group. All its methods run on the actor's one thread, so the ZeroMQ
socket and the process group are only touched from there.
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
from comm.weights import WeightPublisher, free_port, init_weight_group
from conf.schema import Config
from learner.batch import collate, collate_demonstrations, select_informative
from learner.trainer import Trainer
from model.moe import MoECausalLM


@ray.remote
class Learner:
    def __init__(self, cfg: Config, rank: int):
        self.cfg, self.rank = cfg, rank
        self.log = setup_logging("learner", rank)
        torch.set_num_threads(cfg.learner.torch_threads)
        torch.manual_seed(cfg.run.seed)
        self.task = build_task(cfg.task)
        self.model = MoECausalLM(cfg.model)
        self.trainer = Trainer(self.model, cfg.learner, cfg.algo, cfg.generator.temperature)
        self.counters: Counter = Counter()
        self.receiver: TrajectoryReceiver | None = None
        self.publisher: WeightPublisher | None = None
        self.log.info("policy has {:,} parameters", self.model.count_parameters())

    def start(self) -> str:
        """Bind the inbound channel; returns its endpoint."""
        self.receiver = TrajectoryReceiver(self.cfg.comm.host, self.cfg.comm.hwm)
        return self.receiver.endpoint

    def weight_group_address(self) -> tuple[str, int]:
        return self.cfg.comm.host, free_port(self.cfg.comm.host)

    def join_weight_group(self, addr: str, port: int, world_size: int) -> None:
        init_weight_group(0, world_size, addr, port, self.cfg.comm.collective_timeout_s)
        bucket_bytes = int(self.cfg.comm.bucket_mb * 2**20)
        self.publisher = WeightPublisher(self._weights(), bucket_bytes, self.cfg.comm.collective_timeout_s)

    def _weights(self) -> list[tuple[str, torch.Tensor]]:
        """What generators need: parameters and persistent buffers (the expert bias)."""
        return list(self.model.state_dict().items())

    def warmup(self) -> dict:
        """Supervised warm-up on the task's imperfect demonstrations."""
        rng = random.Random(f"warmup-{self.cfg.run.seed}")
        start, stats = time.perf_counter(), {}
        for _ in range(self.cfg.learner.warmup_steps):
            pairs = [self.task.demonstration(rng) for _ in range(self.cfg.learner.warmup_batch)]
            stats = self.trainer.sft_step(*collate_demonstrations(pairs, self.task.tokenizer.pad_id))
        return {**stats, "warmup_s": time.perf_counter() - start}

    def publish(self) -> dict:
        """Broadcast the current weights as version `trainer.version` (generators join)."""
        return {**self.publisher.publish(self.trainer.version, self._weights()),
                "version": self.trainer.version}

    def train_step(self) -> dict:
        """Wait for one batch of scored groups, then take one IcePop step."""
        groups, wait_s = self._next_batch()
        if self.cfg.algo.filter_uninformative:
            informative, dropped = select_informative(groups)
        else:
            informative, dropped = groups, 0
        consumed = sum(len(g) for g in groups)
        self.counters["consumed_samples"] += consumed
        self.counters["dropped_uninformative"] += dropped * self.cfg.algo.group_size
        rewards = [t.reward for g in groups for t in g]
        stats = {"consumed": consumed, "reward": sum(rewards) / len(rewards), "wait_s": wait_s,
                 "accuracy": sum(r == 1.0 for r in rewards) / len(rewards),
                 "informative_groups": len(informative)}
        if informative:
            start = time.perf_counter()
            stats.update(self.trainer.rl_step(collate(informative, self.task.tokenizer.pad_id,
                                                      self.cfg.algo.normalize_std)))
            stats["train_s"] = time.perf_counter() - start
            self.counters["trained_samples"] += sum(len(g) for g in informative)
            self.counters["trained_tokens"] += stats["trained_tokens"]
        stats["version"] = self.trainer.version
        return stats

    def _next_batch(self):
        groups, start = [], time.perf_counter()
        while len(groups) < self.cfg.algo.prompts_per_step:
            group = self.receiver.recv_group(timeout_s=self.cfg.learner.recv_timeout_s)
            if group is None:
                raise TimeoutError(f"learner-{self.rank} got {len(groups)}/{self.cfg.algo.prompts_per_step} "
                                   f"groups in {self.cfg.learner.recv_timeout_s}s at version {self.trainer.version}")
            groups.append(group)
        return groups, time.perf_counter() - start

    def stats(self) -> dict:
        drops = {f"dropped_{k}": v for k, v in self.receiver.dropped.items()} if self.receiver else {}
        return {**self.counters, **drops, "version": self.trainer.version}

    def save(self, directory: str) -> str:
        path = Path(directory) / f"learner-{self.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.trainer.optimizer.state_dict(),
                    "version": self.trainer.version, "config": self.cfg}, path)
        return str(path)

    def stop(self) -> dict:
        if self.receiver is not None:
            self.receiver.close()
        return self.stats()
