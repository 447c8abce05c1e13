"""Learner actor: the Ray shell around `learner.Trainer`, one per learner rank.

The K learner ranks form one process group and hold the model under FSDP2. Each
rank owns an inbound trajectory channel (the judges round-robin scored groups over
all learners) and takes `prompts_per_step / K` groups per step. Rank 0 is also rank
0 of the weight group and broadcasts each new version, gathering the sharded
weights one bucket at a time with the other learner ranks. All methods run on the
actor's one thread, so the ZeroMQ socket and the process groups are only touched
from there.

Groups are received into a buffer by `collect`, which the driver calls in short slices
until the next batch is there (so it can replace a dead generator meanwhile), and
trained on by `train_step`. While it waits, a lone learner computes the gradient of the
batch's groups that have arrived, `learner.stream_groups` at a time, so that once the
last group is in only its micro-batch and the optimizer step are left (see
`learner/trainer.py`): the new weights go out sooner, and the generators, which may not
run more than max_staleness versions ahead, wait less for them. A C3PO++ batch is every
group sent in the rounds up to the step's (each group names its round), so its groups
are streamed from the first, before the round has closed. A group of a prompt this
learner has already consumed (a re-issued copy, see actors/ledger.py) is dropped as
`duplicate`: nothing is trained twice. The buffer and the consumed prompts are part of
the checkpoint.
"""
import os
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

import ray
import torch

from actors.phases import PhaseClock, timed
from actors.telemetry import ActorMetrics
from actors.tasks import build_task
from comm.addresses import bind_address, pin_gloo_interface
from comm.auth import ChannelKeys
from comm.channel import TrajectoryReceiver
from comm.logs import setup_logging
from actors.ledger import root_of
from comm.placement import BindsCores, Placement, compute_dtype, place_here
from comm.weights import WeightPublisher, free_port, init_weight_group
from comm.wire import decode_group, encode_group
from conf.schema import Config
from learner.checkpoint import write_durably
from learner.batch import collate, collate_demonstrations, select_informative
from learner.metrics import merge_loss_stats, merge_rank_stats
from learner.sharding import (all_reduce_sum, full_tensor, gather_stats, init_learner_group, loss_scale,
                              shard_model, world_size)
from learner.trainer import Trainer
from model.flops import matmul_peak_flops, training_flops
from model.moe import MoECausalLM

DRAIN_QUIET_S = 1.0  # end of run: a second without arrivals means nothing is left on the way
# how often a rank waiting for a C3PO++ round looks whether it closed: late by at most this, and
# each look (a ray.wait) costs tens of microseconds of a core the generators are decoding on
ROUND_POLL_S = 0.005


@dataclass
class Accumulated:
    """The part of the next batch whose gradient the learner has already computed."""
    uids: set[str] = field(default_factory=set)  # its groups' prompt uids (informative or not)
    parts: list[dict] = field(default_factory=list)  # each micro-batch's loss statistics
    counts: list[float] = field(default_factory=list)  # and aggregation count (the step divides by their sum)
    seconds: float = 0.0                         # spent computing them

    def add(self, stats: dict, count: float) -> None:
        self.parts.append(stats)
        self.counts.append(count)

    def losses(self) -> list[tuple[float, float]]:
        """(loss, aggregation count) of each micro-batch, for Trainer.step_loss."""
        return [(stats["loss"], count) for stats, count in zip(self.parts, self.counts)]


@dataclass(frozen=True)
class RoundBatch:
    """A C3PO++ batch: every group the generators sent in rounds 0..`last_round`. `groups` is
    how many they sent in all, since the start; known once the round closed, None before."""
    last_round: int
    groups: int | None = None


@ray.remote
class Learner(BindsCores):
    def __init__(self, cfg: Config, rank: int, keys: ChannelKeys | None = None):
        self.cfg, self.rank, self.keys = cfg, rank, keys
        self.log = setup_logging("learner", rank)
        torch.set_num_threads(cfg.learner.torch_threads)
        torch.manual_seed(cfg.run.seed)
        self.task = build_task(cfg.task)
        self.bind_host, self.advertised_host = bind_address(cfg.comm.host, ray.util.get_node_ip_address())
        pin_gloo_interface(self.advertised_host)
        self.placement = place_here(f"learner-{rank}", cfg.learner.device,
                                    ray.get_runtime_context().get_node_id(), ray.get_gpu_ids())
        self.device = self.placement.torch_device()
        self.model = MoECausalLM(cfg.model).to(self.device)  # float32 master weights on either device
        self.wire_dtypes: dict[str, torch.dtype] = {}  # what each weight travels in to the generators
        self.peak_flops = matmul_peak_flops(cfg.model.hidden_size, cfg.learner.torch_threads, self.device,
                                            compute_dtype(self.placement))  # for MFU
        self.trainer: Trainer | None = None
        self.counters: Counter = Counter()
        self.receiver: TrajectoryReceiver | None = None
        self.publisher: WeightPublisher | None = None
        self.buffer: list[list] = []              # groups received, not yet trained, in arrival order
        self.received_by_round: Counter = Counter()  # C3PO++ round -> groups received since the start
        self.consumed_roots: set[str] = set()     # prompts trained on or found uninformative
        self.accumulated = Accumulated()          # of the batch being collected
        self.fates: dict[str, str] = {}           # prompt uid -> fate, until the driver takes them
        self.clock = PhaseClock(rest="between_calls")  # waiting for a batch, training, publishing
        self.metrics = ActorMetrics("learner", f"learner-{rank}")
        self.warmup_rng = random.Random(f"warmup-{cfg.run.seed}-{rank}")  # the demonstrations, across slices
        self.log.info("policy has {:,} parameters", self.model.count_parameters())

    def probe_storage(self, probes: str) -> tuple[str, str, str]:
        """Write a fresh token into `probes`/<name> and read the driver's: (this node, the token
        written, the driver's as read here, '' if missing) for the driver's shared-storage check."""
        folder, token = Path(probes), secrets.token_hex(8)
        try:
            write_durably(folder / f"learner-{self.rank}", token.encode())
            driver_token = (folder / "driver").read_text()
        except OSError:  # the folder is not there on this node
            driver_token = ""
        return ray.util.get_node_ip_address(), token, driver_token

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it: a rendezvous (learner group, weight group)."""
        return self.advertised_host, free_port(self.bind_host)

    def setup(self, addr: str, port: int) -> str:
        """Join the learner group, shard the model, bind the inbound channel; returns its endpoint."""
        if self.cfg.learner.num > 1:
            init_learner_group(self.rank, self.cfg.learner.num, addr, port, self.cfg.comm.collective_timeout_s,
                               self.device)
        self.model = shard_model(self.model)
        self.trainer = Trainer(self.model, self.cfg.learner, self.cfg.algo, self.cfg.generator.temperature)
        self.receiver = TrajectoryReceiver(self.bind_host, self.cfg.comm.hwm, keys=self.keys,
                                           advertised_host=self.advertised_host)
        return self.receiver.endpoint

    def placement_info(self) -> Placement:
        return self.placement

    def set_wire_dtype(self, dtype: torch.dtype) -> None:
        """Floating parameters travel to the generators in `dtype` (what they compute in); buffers
        (the expert bias) as they are. Every learner rank needs it: they gather together."""
        params = {name for name, _ in self.model.named_parameters()}
        self.wire_dtypes = {name: dtype if name in params else tensor.dtype for name, tensor in self._weights()}

    def join_weight_group(self, addr: str, port: int, world_size: int, path: str) -> None:
        group = init_weight_group(0, world_size, addr, port, self.cfg.comm.collective_timeout_s,
                                  backend=path, model_device=self.device)
        on_wire = [(name, torch.empty(tensor.shape, dtype=self.wire_dtypes[name], device="meta"))
                   for name, tensor in self._weights()]
        self.publisher = WeightPublisher(group, on_wire, int(self.cfg.comm.bucket_mb * 2**20),
                                         self.cfg.comm.collective_timeout_s)

    def _weights(self) -> list[tuple[str, torch.Tensor]]:
        """What generators need: parameters and persistent buffers (the expert bias)."""
        return list(self.model.state_dict().items())

    @timed("warmup")
    def warmup(self, steps: int) -> dict:
        """`steps` more steps of the supervised warm-up on the task's imperfect demonstrations (each
        rank its own share); the driver calls it in slices to show progress.

        The generators idle meanwhile, so the learners take their cores (learner.warmup_threads).
        """
        rng = self.warmup_rng
        per_rank = self.cfg.learner.warmup_batch // self.cfg.learner.num
        threads = self.cfg.learner.warmup_threads or max(1, len(os.sched_getaffinity(0)) // self.cfg.learner.num)
        start, stats = time.perf_counter(), {}
        torch.set_num_threads(threads)
        try:
            for _ in range(steps):
                pairs = [self.task.demonstration(rng) for _ in range(per_rank)]
                batch = collate_demonstrations(pairs, self.task.tokenizer.pad_id)
                stats = self.trainer.sft_step(*(tensor.to(self.device) for tensor in batch))
        finally:
            torch.set_num_threads(self.cfg.learner.torch_threads)
        return {**stats, "warmup_s": time.perf_counter() - start, "warmup_threads": threads}

    @timed("publishing")
    def publish(self) -> dict:
        """Broadcast the weights as version `trainer.version`; every learner rank gathers with rank 0.

        Each weight is gathered whole (an all-gather over the learners when sharded), in the
        plan's order, one bucket at a time on rank 0; the other ranks make the same all-gathers.
        If the broadcast breaks (a generator died), rank 0 still gathers the weights it had not
        reached, so that no rank is left waiting in an all-gather, then raises.
        """
        state = dict(self._weights())
        gathered: set[str] = set()

        def fetch(names: list[str]) -> dict[str, torch.Tensor]:
            gathered.update(names)
            return {name: full_tensor(state[name]).to(self.wire_dtypes[name]) for name in names}

        def gather_the_rest() -> None:
            for name in state:
                if name not in gathered:
                    fetch([name])

        if self.publisher is None:
            gather_the_rest()  # the all-gathers rank 0 is making, in the same order
            return {"version": self.trainer.version}
        try:
            return {**self.publisher.publish(self.trainer.version, fetch), "version": self.trainer.version}
        except Exception:
            gather_the_rest()
            raise

    def collect(self, wait_s: float, batch: RoundBatch | None = None, round_closes: list | None = None) -> dict:
        """Receive into the buffer for up to `wait_s`, returning early once the batch is ready.

        The batch is this rank's share of prompts_per_step groups, or with C3PO++ rounds the
        `batch` of groups sent up to its round. Before that round has closed, the driver passes
        `round_closes`: its calls to the generators that return as each closes the round (which
        tell how many groups the batch has). The rank then receives until they have all
        returned, so the wait for the round is this rank's wait for its batch, and the groups
        that arrive meanwhile are decoded and trained on meanwhile. Returns {"ready",
        "round_closed" (with `round_closes`), "buffered": prompt uids now buffered, "fates":
        taken since last time}. Micro-batches computed meanwhile count as `training`, the rest
        as `waiting`.
        """
        deadline = time.monotonic() + wait_s
        if round_closes is None:
            done, poll_s = (lambda: self._batch_ready(batch)), wait_s
        else:
            done, poll_s = (lambda: _all_returned(round_closes)), ROUND_POLL_S
        while True:
            with self.clock.phase("waiting"):
                self._receive_until(deadline, lambda: done() or self._micro_batch(batch), poll_s)
            micro_batch = self._micro_batch(batch)
            if not micro_batch:
                break
            with self.clock.phase("training"):
                self._accumulate(micro_batch)
        result = {"ready": self._batch_ready(batch), "buffered": self.buffered_uids(), "fates": self.take_fates()}
        if round_closes is not None:
            result["round_closed"] = done()
        return result

    def _micro_batch(self, batch: RoundBatch | None) -> list:
        """The next `learner.stream_groups` groups of the batch being collected, once all are in
        (fewer at the batch's end); none when streaming is off. Sharded ranks must make FSDP's
        collectives together, so they take their batch at once."""
        size = self.cfg.learner.stream_groups
        if not size or world_size() > 1:
            return []
        pending = [group for group in self._buffered_batch(batch) if group[0].prompt_uid not in self.accumulated.uids]
        return pending[:size] if len(pending) >= size or self._batch_ready(batch) else []

    def _receive_until(self, deadline: float, done, poll_s: float) -> bool:
        """Buffer groups until `done()` (looked at after each group, and at least every `poll_s`)
        or the deadline; whether `done()` came true."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            group = self.receiver.recv_group(timeout_s=min(remaining, poll_s))
            if group is not None:
                self._buffer(group)
        return True

    @timed("waiting")
    def absorb(self, quiet_s: float) -> dict:
        """Buffer whatever arrives until `quiet_s` passes without a group (checkpoints drain the wire)."""
        while (group := self.receiver.recv_group(timeout_s=quiet_s)) is not None:
            self._buffer(group)
        return {"buffered": self.buffered_uids(), "fates": self.take_fates()}

    def buffered_uids(self) -> list[str]:
        return [group[0].prompt_uid for group in self.buffer]

    def take_fates(self) -> dict[str, str]:
        fates, self.fates = self.fates, {}
        return fates

    def _buffer(self, group: list) -> None:
        self.received_by_round[group[0].round] += 1
        root = root_of(group[0].prompt_uid)
        if root in self.consumed_roots or root in {root_of(uid) for uid in self.buffered_uids()}:
            self.counters["dropped_duplicate"] += len(group)
            self.fates[group[0].prompt_uid] = "duplicate"
            return
        self.buffer.append(group)

    def _buffered_batch(self, batch: RoundBatch | None) -> list:
        """The buffered groups of the batch being collected, in arrival order."""
        if batch is None:
            return self.buffer[:self._share()]
        return [group for group in self.buffer if group[0].round <= batch.last_round]

    def _share(self) -> int:
        """Groups per step of this rank, without C3PO++ rounds."""
        return self.cfg.algo.prompts_per_step // self.cfg.learner.num

    def _batch_ready(self, batch: RoundBatch | None) -> bool:
        if batch is None:
            return len(self.buffer) >= self._share()
        received = sum(count for sent_in, count in self.received_by_round.items() if sent_in <= batch.last_round)
        return batch.groups is not None and received >= batch.groups

    def _take_batch(self, batch: RoundBatch | None) -> list:
        """The batch's groups, out of the buffer, in prompt-uid order (reproducible sums when
        not streamed)."""
        taken = self._buffered_batch(batch)
        taken_ids = {id(group) for group in taken}
        self.buffer = [group for group in self.buffer if id(group) not in taken_ids]
        return sorted(taken, key=lambda group: group[0].prompt_uid)

    @timed("training")
    def train_step(self, batch: RoundBatch | None = None) -> dict:
        """One IcePop step with the other ranks on the collected batch (none if it is empty)."""
        if not self._batch_ready(batch):
            raise RuntimeError(f"learner-{self.rank}: train_step before the batch was collected")
        groups = self._take_batch(batch)
        for group in groups:
            self.consumed_roots.add(root_of(group[0].prompt_uid))
        if not groups:
            return {"consumed": 0, "reward": 0.0, "accuracy": 0.0, "informative_groups": 0,
                    "version": self.trainer.version, "fates": {}}
        informative, uninformative = self._informative(groups)
        left_out = {id(group) for group in uninformative}
        fates = {g[0].prompt_uid: "uninformative" if id(g) in left_out else "trained" for g in groups}
        consumed = sum(len(g) for g in groups)
        self.counters["consumed_samples"] += consumed
        self.counters["dropped_uninformative"] += sum(len(g) for g in uninformative)
        rewards = [t.reward for g in groups for t in g]
        stats = {"consumed": consumed, "reward": sum(rewards) / len(rewards),
                 "accuracy": sum(r == 1.0 for r in rewards) / len(rewards),
                 "informative_groups": len(informative)}
        start = time.perf_counter()
        stats.update(self._update(informative, uninformative, groups))
        stats["version"] = self.trainer.version
        merged = merge_rank_stats(gather_stats(stats))
        self._publish_metrics(merged, time.perf_counter() - start)
        return {**merged, "fates": fates}

    def _publish_metrics(self, step: dict, seconds: float) -> None:
        """The step's figures (every rank's merged) in Ray's metrics."""
        lags = [int(lag) for lag in step.get("lag_histogram", {})]
        masked = step.get("masked_below_alpha_frac", 0.0) + step.get("masked_above_beta_frac", 0.0)
        self.metrics.publish({"step_s": seconds, "loss": step.get("loss"), "reward": step["reward"],
                              "accuracy": step["accuracy"], "masked_frac": masked,
                              "mean_abs_log_k": step.get("mean_abs_log_k"), "max_lag": max(lags) if lags else None,
                              "version": step["version"]})

    def _update(self, informative: list, uninformative: list, groups: list) -> dict:
        """One optimizer step over all ranks; skipped by all when no rank has a signal. The
        `uninformative` groups are not computed but count in the loss's divisor."""
        accumulated = self.accumulated
        rest = [group for group in informative if group[0].prompt_uid not in accumulated.uids]
        start = time.perf_counter()
        # a rank with nothing to learn still joins FSDP's collectives, with a zero-weighted loss
        joins_only = not informative and world_size() > 1
        batch = self._collate(rest or groups) if rest or joins_only else None
        batch_count = self.trainer.aggregation_count(batch) if batch is not None else 0.0
        local_count = sum(accumulated.counts) + (batch_count if rest else 0)
        left_out_count = self.trainer.uninformative_count(uninformative)
        trained_count, divisor = all_reduce_sum([local_count, local_count + left_out_count])
        if trained_count == 0:
            self._forget_accumulated()
            return {}
        if batch is not None:
            accumulated.add(self.trainer.accumulate(batch, weight=1.0 if rest else 0.0), batch_count)
        stats = {**merge_loss_stats(accumulated.parts), "micro_batches": len(accumulated.parts),
                 "loss": self.trainer.step_loss(accumulated.losses(), left_out_count)}
        stats["grad_norm"] = self.trainer.finish_step(loss_scale(self.trainer.params.aggregation, 1.0, divisor))
        stats["train_s"] = accumulated.seconds + time.perf_counter() - start
        self._forget_accumulated()
        if not informative:
            stats["trained_tokens"] = 0
            return stats
        flops = training_flops(self.cfg.model, [len(t.prompt_tokens) + len(t.completion_tokens) - 1
                                                for group in informative for t in group])
        stats["mfu"] = flops / (stats["train_s"] * self.peak_flops)
        self.counters["model_flops"] += flops
        self.counters["trained_samples"] += sum(len(g) for g in informative)
        self.counters["trained_tokens"] += stats["trained_tokens"]
        return stats

    def _accumulate(self, groups: list) -> None:
        """Add the gradient of `groups` (their informative ones) to the step being built."""
        start = time.perf_counter()
        informative, _ = self._informative(groups)
        if informative:
            batch = self._collate(sorted(informative, key=lambda group: group[0].prompt_uid))
            self.accumulated.add(self.trainer.accumulate(batch), self.trainer.aggregation_count(batch))
        self.accumulated.uids.update(group[0].prompt_uid for group in groups)
        self.accumulated.seconds += time.perf_counter() - start

    def _forget_accumulated(self) -> None:
        self.trainer.discard_gradients()
        self.accumulated = Accumulated()

    def _informative(self, groups: list) -> tuple[list, list]:
        """(groups to train on, groups left out for carrying no signal)."""
        return select_informative(groups) if self.cfg.algo.filter_uninformative else (groups, [])

    def _collate(self, groups: list):
        return collate(groups, self.task.tokenizer.pad_id, self.cfg.algo.normalize_std).to(self.device)

    def _drain(self) -> None:
        """At the end of a run: what is buffered or still arriving (until quiet) is dropped as `run_end`."""
        self.absorb(DRAIN_QUIET_S)
        for group in self.buffer:
            self.counters["dropped_run_end"] += len(group)
            self.fates[group[0].prompt_uid] = "run_end"
        self.buffer = []
        self._forget_accumulated()

    def stats(self) -> dict:
        drops = {f"dropped_{k}": v for k, v in self.receiver.dropped.items()} if self.receiver else {}
        return {**self.counters, **drops, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "device": self.placement.describe(),
                "peak_flops": self.peak_flops, "phases": self.clock.seconds(), "spans": self.clock.take_spans(),
                "version": self.trainer.version if self.trainer else 0}

    @timed("checkpointing")
    def save(self, directory: str) -> list[str]:
        """Every rank writes its shard of model, optimizer and trainer state (DCP) and its buffer;
        returns the files this rank wrote (relative to `directory`)."""
        path = Path(directory)
        self.trainer.save(path / "model")
        state = path / f"learner-{self.rank}.msgpack"
        write_durably(state, msgpack.packb(self._state()))
        return [state.name]

    def load(self, directory: str, policy_only: bool = False) -> int:
        """Take up a checkpoint: the policy (model, optimizer, version), and unless `policy_only`
        also this rank's buffer, consumed prompts and counters."""
        path = Path(directory)
        self.trainer.load(path / "model")
        self.accumulated = Accumulated()  # the loaded step starts from no gradient
        if policy_only:
            return self.trainer.version
        state = msgpack.unpackb((path / f"learner-{self.rank}.msgpack").read_bytes())
        self.buffer = [decode_group(frames) for frames in state["buffer"]]
        self.received_by_round = Counter(dict(state["received_by_round"]))
        self.consumed_roots = set(state["consumed_roots"])
        self.counters.update(state["counters"])
        return self.trainer.version

    def _state(self) -> dict:
        return {"buffer": [[bytes(frame) for frame in encode_group(group)] for group in self.buffer],
                "received_by_round": sorted(self.received_by_round.items()),
                "consumed_roots": sorted(self.consumed_roots),
                "counters": dict(self.counters)}

    def stop(self) -> dict:
        """Called after generators and judges stopped: what is still on its way is counted, then closed."""
        if self.receiver is not None:
            self._drain()
            self.receiver.close()
        return {**self.stats(), "fates": self.take_fates()}


def _all_returned(refs: list) -> bool:
    """Whether every call behind `refs` has returned (or failed: the driver reads which)."""
    return len(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]) == len(refs)
