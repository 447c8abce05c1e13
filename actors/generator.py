"""Generator actor: continuous-batching rollouts, sent to the judges as GRPO groups.

A decode thread owns the engine; it hands finished groups to a sender thread, which
owns the outgoing ZeroMQ socket (comm.channel.BackgroundSender), so encoding and
queueing them does not hold up decoding. Ray method calls (other threads) only queue
prompts, stage new weights, or read counters; the decode thread applies staged weights
between two decode steps, so running rollouts are never drained and their later tokens
carry the new version.

For checkpoints the driver holds the decode thread (`hold`), takes a `snapshot` of
everything unfinished (queued prompts, rollouts in the slots or paused, finished
members of incomplete groups, sampling RNG, round counters) and releases it; a resumed
run `restore`s the snapshot before decoding starts. Fates the driver's ledger needs
(purged prompts) are handed over by `take_fates`.
"""
import os
import queue
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager

import numpy as np
import ray
import torch

from actors.phases import PhaseClock
from actors.telemetry import ActorMetrics
from actors.tasks import build_task
from comm.addresses import bind_address, pin_gloo_interface
from comm.auth import ChannelKeys
from comm.channel import BackgroundSender
from comm.logs import setup_logging
from comm.placement import BindsCores, Placement, cast_parameters, compute_dtype, place_here
from comm.weights import WeightSubscriber, init_weight_group
from comm.wire import Trajectory
from conf.schema import Config
from model.engine import GenerationEngine, Rollout, generate
from model.flops import matmul_peak_flops
from model.moe import MoECausalLM

IDLE_WAIT_S = 0.05


@ray.remote
class Generator(BindsCores):
    def __init__(self, cfg: Config, rank: int, keys: ChannelKeys | None = None):
        self.cfg, self.rank, self.keys = cfg, rank, keys
        self.log = setup_logging("generator", rank)
        torch.set_num_threads(cfg.generator.torch_threads)
        torch.manual_seed(cfg.run.seed)
        self.task = build_task(cfg.task)
        pin_gloo_interface(bind_address(cfg.comm.host, ray.util.get_node_ip_address())[1])  # the weight group
        self.placement = place_here(f"generator-{rank}", cfg.generator.device,
                                    ray.get_runtime_context().get_node_id(), ray.get_gpu_ids())
        model = cast_parameters(MoECausalLM(cfg.model), compute_dtype(self.placement))
        self.model = model.to(self.placement.torch_device()).eval()
        self.peak_flops = matmul_peak_flops(cfg.model.hidden_size, cfg.generator.torch_threads,
                                            self.placement.torch_device(), compute_dtype(self.placement))  # for MFU
        tok = self.task.tokenizer
        self.engine = GenerationEngine(self.model, cfg.generator.max_slots, cfg.model.max_seq_len,
                                       tok.eos_id, tok.pad_id, cfg.generator.max_new_tokens,
                                       cfg.generator.temperature, seed=cfg.run.seed * 1000 + rank,
                                       record_routing=cfg.algo.routing_replay)
        self.prompts: queue.Queue = queue.Queue()
        self.step_lock = threading.Lock()          # held by the decode thread for each step
        # the hand-off between the driver's calls and the decode thread (prompts in, fates out): never
        # held for a decode step, so `submit` and `take_fates` do not wait for one
        self.handoff_lock = threading.Lock()
        self.nudge = threading.Event()  # set by calls that give a waiting decode thread work (prompts, weights)
        self.staged: tuple[int, dict] | None = None
        self.applied = threading.Condition()
        self.stopping = threading.Event()
        self.counters: Counter = Counter()
        self.busy_s = 0.0
        self.subscriber: WeightSubscriber | None = None
        # decode-thread state: groups being completed, C3PO++ rounds, paused and purged rollouts
        self.groups: dict[str, list[Rollout]] = defaultdict(list)
        self.meta: dict[str, dict] = {}
        self.paused: list[Rollout] = []
        self.purged: set[str] = set()
        rounds_on = cfg.algo.mode == "async"
        self.round_budget = cfg.algo.round_token_budget // cfg.generator.num if rounds_on else 0
        # round r may start while the learner is at most eta versions behind it (C3PO++ with overlap)
        self.round_open, self.round_tokens = True, 0
        self.rounds_closed, self.updates_applied, self.idle = 0, 0, False
        self.groups_sent, self.groups_sent_at_close = 0, []  # a round's batch: groups sent before it closed
        self.first_group_sent_at = 0.0  # wall time (a replacement's first trajectories, in fault drills)
        self.round_progress = threading.Condition()
        self.new_fates: dict[str, str] = {}  # prompt uid -> fate, until the driver takes them
        self.hold_requested, self.held = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None
        self.judge_endpoints: list[str] = []  # where the sender thread sends groups
        self.sender: BackgroundSender | None = None  # the decode thread's, once it runs
        self.decode_cores: list[int] = []  # ray.bind_cores: the decode thread's own cores ([]: not bound)
        self.clock = PhaseClock()
        self.metrics = ActorMetrics("generator", f"generator-{rank}")
        self.last_reading = (time.monotonic(), 0)  # (when, generated tokens) at the last stats()
        self.failure: BaseException | None = None

    def placement_info(self) -> Placement:
        return self.placement

    def join_weight_group(self, addr: str, port: int, weight_rank: int, world_size: int, path: str) -> None:
        """Join (or, after a peer died, re-join) the weight group as `weight_rank`, over `path`."""
        group = init_weight_group(weight_rank, world_size, addr, port, self.cfg.comm.collective_timeout_s,
                                  backend=path, model_device=self.placement.torch_device())
        self.subscriber = WeightSubscriber(group, self.cfg.comm.collective_timeout_s)

    def watch(self) -> None:
        """Returns when the generator stops, raises when its decode thread failed; the driver keeps
        one call pending to see it die or fail."""
        self.stopping.wait()
        self._raise_if_failed()

    def connect_judges(self, endpoints: list[str]) -> None:
        """A judge was replaced on another node: the decode thread sends to `endpoints` from its next step."""
        self.judge_endpoints = list(endpoints)

    def start(self, judge_endpoints: list[str]) -> None:
        self.clock = PhaseClock()  # the decode thread's time, phase by phase, from now on
        self.judge_endpoints = list(judge_endpoints)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"generator-{self.rank}-decode")
        self.thread.start()

    def bind_decode_thread(self, cores: list[int]) -> None:
        """ray.bind_cores: the decode thread runs on `cores` (from its start, or now if it runs); call
        after `bind_cores`, which binds every thread of the process to the shared cores."""
        self.decode_cores = cores
        if self.thread is not None and self.thread.is_alive():
            os.sched_setaffinity(self.thread.native_id, cores)

    def submit(self, prompts: list[dict]) -> None:
        """Queue admitted prompts; each becomes group_size rollouts.

        All at once: the decode thread fills slots under the same lock, so which prompts
        share a decode batch does not depend on thread timing (sync runs are reproducible).
        """
        self._raise_if_failed()
        with self.handoff_lock:
            for prompt in prompts:
                self.prompts.put(prompt)
            if prompts:  # not idle from now: a round wait must not return before the decode thread saw them
                self._set_idle(False)
                self.nudge.set()

    def take_fates(self) -> dict[str, str]:
        """Fates decided here since the last call (purged prompts), for the driver's ledger."""
        with self.handoff_lock:
            fates, self.new_fates = self.new_fates, {}
        return fates

    def holding(self) -> list[str]:
        """Uids of the prompts this generator still holds: unfinished, or finished and waiting for
        the sender thread (which sends them to the judges named when it takes them)."""
        unfinished = self._unfinished()  # first: a group leaves these before it is handed over
        return unfinished + (self.sender.waiting_prompts() if self.sender is not None else [])

    def _unfinished(self) -> list[str]:
        """Uids of the prompts not finished yet: queued, decoding, paused or in an incomplete group."""
        with self.step_lock:
            return list(self.meta) + [p["uid"] for p in self.prompts.queue]

    def hold(self) -> dict:
        """Stop decoding (after the current step); returns the snapshot of everything unfinished."""
        self._raise_if_failed()
        self.hold_requested.set()
        while not self.held.wait(timeout=1.0):
            self._raise_if_failed()
        return self._snapshot()

    def release(self) -> None:
        self.hold_requested.clear()
        self.held.clear()

    def restore(self, snapshot: dict) -> None:
        """Before `start`: take up a checkpoint's unfinished work where it stood."""
        if self.thread is not None:
            raise RuntimeError("restore must come before start")
        for prompt in snapshot["queued"]:
            self.prompts.put(prompt)
        self.paused = [Rollout.from_state(r) for r in snapshot["rollouts"]]
        for prompt_uid, members in snapshot["groups"].items():
            self.groups[prompt_uid] = [Rollout.from_state(r) for r in members]
        self.meta, self.purged = dict(snapshot["meta"]), set(snapshot["purged"])
        self.counters.update(snapshot["counters"])
        self.busy_s = snapshot["busy_s"]
        self.engine.version = snapshot["version"]
        self.engine.rng.set_state(torch.frombuffer(bytearray(snapshot["rng"]), dtype=torch.uint8))
        for key, value in snapshot["rounds"].items():
            setattr(self, key, value)

    def _snapshot(self) -> dict:
        rounds = ("round_open", "round_tokens", "rounds_closed", "updates_applied", "groups_sent",
                  "groups_sent_at_close")
        return {"queued": list(self.prompts.queue), "meta": self.meta, "purged": sorted(self.purged),
                "rollouts": [r.to_state() for r in self.engine.active + self.paused],
                "groups": {uid: [r.to_state() for r in members] for uid, members in self.groups.items()},
                "counters": dict(self.counters), "busy_s": self.busy_s, "version": self.engine.version,
                "rng": self.engine.rng.get_state().numpy().tobytes(),
                "rounds": {key: getattr(self, key) for key in rounds}, "fates": self.take_fates()}

    def receive_weights(self, resend: bool = False) -> dict:
        """Take part in the broadcast, then wait until the decode thread applied it.

        A `resend` (to a re-formed weight group, or on resume) reloads the weights the
        generator had; it does not count as an update of the C3PO++ round logic.
        """
        self._raise_if_failed()
        start = time.perf_counter()
        version, tensors = self.subscriber.receive()
        received_s = time.perf_counter() - start
        with self.applied:
            self.staged = (version, tensors, resend)
            self.nudge.set()
            if self.thread is None:  # not decoding yet (a new or restored generator): load them here
                self._apply_staged()
            while self.staged is not None and self.failure is None:
                self.applied.wait(timeout=1.0)
        self._raise_if_failed()
        return {"version": version, "receive_s": received_s, "total_s": time.perf_counter() - start}

    def evaluate(self, prompts: list[dict]) -> dict:
        """Greedy accuracy on `prompts` under the current weights (decoding pauses meanwhile)."""
        tok = self.task.tokenizer
        with self.step_lock:  # the decode thread counts its wait for the lock as `evaluating`
            engine = GenerationEngine(self.model, len(prompts), self.cfg.model.max_seq_len, tok.eos_id,
                                      tok.pad_id, self.cfg.generator.max_new_tokens, temperature=0.0)
            rollouts = generate(engine, [(p["uid"], p["tokens"]) for p in prompts])
        rewards = [self.task.score(r.completion_tokens, p["meta"]) for r, p in zip(rollouts, prompts)]
        examples = [f"{tok.decode(p['tokens'])}{tok.decode(r.completion_tokens)}"
                    for r, p in zip(rollouts[:4], prompts)]
        per_prompt = [{"uid": p["uid"], "completion": tok.decode(r.completion_tokens), "reward": reward}
                      for r, p, reward in zip(rollouts, prompts, rewards)]
        return {"correct": sum(rewards), "total": len(prompts), "version": self.engine.version,
                "examples": examples, "per_prompt": per_prompt}

    def sample(self, prompts: list[dict], k: int, temperature: float) -> list[dict]:
        """`k` completions of each prompt at `temperature` under the current weights, scored (pass@k).

        Sampled with continuous batching over `generator.max_slots`, from an RNG seeded with run.seed and
        this generator's rank: the same prompts give the same samples on every call and every run.
        """
        tok = self.task.tokenizer
        with self.step_lock:  # the decode thread counts its wait for the lock as `evaluating`
            engine = GenerationEngine(self.model, min(self.cfg.generator.max_slots, k * len(prompts)),
                                      self.cfg.model.max_seq_len, tok.eos_id, tok.pad_id,
                                      self.cfg.generator.max_new_tokens, temperature,
                                      seed=self.cfg.run.seed * 1000 + self.rank)
            rollouts = generate(engine, [(f"{p['uid']}/{j}", p["tokens"]) for p in prompts for j in range(k)])
        groups = [rollouts[i * k : (i + 1) * k] for i in range(len(prompts))]
        return [{"uid": p["uid"], "completions": [tok.decode(r.completion_tokens) for r in group],
                 "rewards": [self.task.score(r.completion_tokens, p["meta"]) for r in group]}
                for p, group in zip(prompts, groups)]

    def wait_rounds_closed(self, rounds: int, timeout_s: float) -> int:
        """Block until `rounds` rounds have spent their token budget, or nothing is left to decode.

        Returns how many groups this generator had sent when round `rounds` closed (or now, if idle).
        """
        with self.round_progress:
            done = self.round_progress.wait_for(
                lambda: self.rounds_closed >= rounds or self.idle or self.failure is not None, timeout=timeout_s)
            self._raise_if_failed()
            if not done:
                raise TimeoutError(f"generator-{self.rank} closed {self.rounds_closed}/{rounds} rounds in {timeout_s}s")
            return self.groups_sent_at_close[rounds - 1] if self.rounds_closed >= rounds else self.groups_sent

    def stats(self) -> dict:
        """Counters, phases and the spans since the last call; the live figures go to Ray's metrics."""
        self._raise_if_failed()
        stats = {**self.counters, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                 "device": self.placement.describe(), "busy_s": self.busy_s, "model_flops": self.engine.model_flops,
                 "peak_flops": self.peak_flops, "phases": self.clock.seconds(), "spans": self.clock.take_spans(),
                 "version": self.engine.version, "first_group_sent_at": self.first_group_sent_at,
                 "queued_prompts": self.prompts.qsize(), "active": self.engine.num_active,
                 "paused_now": len(self.paused), "decode_cores": self.decode_cores}
        self._publish_metrics(stats)
        return stats

    def _publish_metrics(self, stats: dict) -> None:
        now, tokens = time.monotonic(), stats.get("generated_tokens", 0)
        (then, before), self.last_reading = self.last_reading, (now, tokens)
        self.metrics.publish({"tokens_per_s": (tokens - before) / max(now - then, 1e-6),
                              "running_rollouts": stats["active"], "paused_rollouts": stats["paused_now"],
                              "queued_prompts": stats["queued_prompts"], "policy_version": stats["version"],
                              "loading_weights_s": stats["phases"].get("loading_weights", 0.0)})

    def stop(self) -> dict:
        """Stop decoding; what is still unfinished is reported with fate `unfinished`."""
        self.stopping.set()
        self.nudge.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        fates = self.take_fates()
        fates.update({uid: "unfinished" for uid in self._unfinished()})  # what is sent gets its fate downstream
        return {**self.stats(), "fates": fates}

    # -- decode thread -------------------------------------------------------------
    # Rounds (C3PO++, algo.round_token_budget > 0): a round closes once this generator made its
    # share of the budget; every unfinished rollout is then paused and resumes in a later round.
    def _run(self) -> None:
        self.sender = sender = BackgroundSender(lambda: self.judge_endpoints, self.cfg.comm.hwm,
                                                self.cfg.comm.send_timeout_s, keys=self.keys,
                                                name=f"generator-{self.rank}-send")
        if self.decode_cores:  # after the sender's thread started: it stays on the shared cores
            os.sched_setaffinity(0, self.decode_cores)
            self.decode_cores = sorted(os.sched_getaffinity(0))  # as the OS has it, for stats()
        try:
            while not self.stopping.is_set():
                sender.raise_if_failed()  # groups it could not send are lost: the generator fails
                with self.clock.phase("loading_weights"), self.applied:
                    self._apply_staged()
                if self.hold_requested.is_set():
                    with self.clock.phase("held"):
                        self.held.set()  # a checkpoint is being taken: no step until release
                        time.sleep(IDLE_WAIT_S)
                    continue
                if not self.round_open:
                    with self.clock.phase("paused_for_round"):
                        self._wait_for_nudge()  # C3PO++: the round's budget is spent, wait for new weights
                    continue
                with self._step_locked("decoding"), self.handoff_lock:
                    self._fill_slots_locked()
                    self._set_idle(not self.engine.num_active)
                if self.idle:
                    with self.clock.phase("idle"):
                        self._wait_for_nudge()  # no prompt admitted
                    continue
                self._decode_step(sender)
        except BaseException as err:  # reaches the driver through the next method call
            self.failure = err
            self.log.exception("decode thread failed")
            self.stopping.set()
            with self.applied:
                self.applied.notify_all()
        finally:
            sender.close()

    def _wait_for_nudge(self) -> None:
        """Sleep until a call brings work (or IDLE_WAIT_S passes); the loop then looks again. Cleared
        before the loop looks, so work that comes after the look sets it for the next wait."""
        self.nudge.wait(IDLE_WAIT_S)
        self.nudge.clear()

    def _decode_step(self, sender: BackgroundSender) -> None:
        with self._step_locked("decoding"):
            start = time.perf_counter()
            finished = self.engine.step()
            self.busy_s += time.perf_counter() - start
        emitted = self.engine.num_active + len(finished)
        self.counters["generated_tokens"] += emitted
        self.round_tokens += emitted
        with self.clock.phase("sending"):  # the hand-off to the sender thread; blocks only when it is behind
            for rollout in finished:
                self._collect(rollout, sender)
        if self.round_budget and self.round_tokens >= self.round_budget:
            with self.clock.phase("decoding"):
                self._close_round()

    @contextmanager
    def _step_locked(self, phase: str):
        """The decode thread's step lock, then `phase`. Waiting for the lock counts as `evaluating`:
        an evaluation holds it for seconds (the driver's short calls for microseconds)."""
        with self.clock.phase("evaluating"):
            self.step_lock.acquire()
        try:
            with self.clock.phase(phase):
                yield
        finally:
            self.step_lock.release()

    def _close_round(self) -> None:
        """Cut every unfinished rollout; one cut more than sigma times purges its group.

        With `generator.kv_on_update=keep` the others stay in their slots with their KV and go on in
        the next round, under whatever weights are loaded by then; with `recompute` they leave the
        slots and resume later with their KV rebuilt under the newer weights (a prefill each).
        """
        keep = self.cfg.generator.kv_on_update == "keep"
        with self.step_lock:
            cut = self.engine.cut_all() if keep else self.engine.pause_all()
            for rollout in cut:
                prompt_uid = _prompt_uid(rollout)
                if prompt_uid in self.purged:
                    continue
                if rollout.pauses > self.cfg.algo.max_pauses:
                    self._purge(prompt_uid)
                elif not keep:
                    self.paused.append(rollout)
            if keep:
                self.engine.evict([r for r in cut if _prompt_uid(r) in self.purged])
        self.counters["rounds"] += 1
        self.counters["paused_rollouts"] += len(cut)
        with self.round_progress:
            self.rounds_closed += 1
            self.groups_sent_at_close.append(self.groups_sent)
            self.round_progress.notify_all()
        self._open_round_if_allowed()

    def _open_round_if_allowed(self) -> None:
        """Open the next round unless it would run more than eta versions ahead of the learner."""
        ahead = self.rounds_closed - max(self.updates_applied - 1, 0)
        self.round_open = ahead <= self.cfg.algo.max_staleness
        if self.round_open:
            self.round_tokens = 0

    def _set_idle(self, idle: bool) -> None:
        if idle != self.idle:
            with self.round_progress:
                self.idle = idle
                self.round_progress.notify_all()

    def _purge(self, prompt_uid: str) -> None:
        """Drop the whole group: its finished members now; the caller evicts its unfinished ones (or
        does not resume them), and `_collect` discards any that finish after all."""
        self.purged.add(prompt_uid)
        self.groups.pop(prompt_uid, None)
        self.meta.pop(prompt_uid)
        G = self.cfg.algo.group_size
        self.counters["generated_samples"] += G
        self.counters["dropped_purged"] += G
        with self.handoff_lock:  # take_fates swaps the dict under this lock
            self.new_fates[prompt_uid] = "purged"

    def _apply_staged(self) -> None:
        """Load staged weights between decode steps; an update (not a resend) opens the next round."""
        if self.staged is None:
            return
        version, tensors, resend = self.staged
        with self.step_lock:
            self.engine.load_weights(tensors, version)
            if not resend and self.cfg.generator.kv_on_update == "recompute":
                self.engine.recompute_cache()
        self.staged = None
        self.updates_applied += not resend
        if not self.round_open:
            self._open_round_if_allowed()
        self.applied.notify_all()

    def _fill_slots_locked(self) -> None:
        """Resume paused rollouts first, then start whole groups of new prompts."""
        while self.paused and self.engine.free_slots:
            rollout = self.paused.pop(0)
            if _prompt_uid(rollout) not in self.purged:
                self.engine.add_rollout(rollout)
        G = self.cfg.algo.group_size
        while self.engine.free_slots >= G:
            try:
                prompt = self.prompts.get_nowait()
            except queue.Empty:
                return
            self.meta[prompt["uid"]] = prompt
            for g in range(G):
                self.engine.add(f"{prompt['uid']}/{g}", prompt["tokens"])

    def _collect(self, rollout: Rollout, sender: BackgroundSender) -> None:
        prompt_uid = _prompt_uid(rollout)
        if prompt_uid in self.purged:
            return
        self.groups[prompt_uid].append(rollout)
        if len(self.groups[prompt_uid]) < self.cfg.algo.group_size:
            return
        prompt = self.meta.pop(prompt_uid)
        group = [self._trajectory(r, prompt) for r in sorted(self.groups.pop(prompt_uid), key=lambda r: r.uid)]
        sender.send_group(group)
        self.counters["generated_samples"] += len(group)
        self.groups_sent += 1
        self.first_group_sent_at = self.first_group_sent_at or time.time()

    def _trajectory(self, rollout: Rollout, prompt: dict) -> Trajectory:
        routed = None
        if self.engine.record_routing:
            expert_dtype = np.uint8 if self.cfg.model.num_experts <= 256 else np.int16
            routed = rollout.routed_experts().cpu().numpy().astype(expert_dtype)
        return Trajectory(
            uid=rollout.uid, prompt_uid=prompt["uid"], group=int(rollout.uid.rsplit("/", 1)[1]),
            prompt_tokens=np.asarray(rollout.prompt_tokens, dtype=np.int32),
            completion_tokens=np.asarray(rollout.completion_tokens, dtype=np.int32),
            behavior_logprobs=np.asarray(rollout.behavior_logprobs, dtype=np.float32),
            policy_version=np.asarray(rollout.policy_versions, dtype=np.int32),
            finish_reason=rollout.finish_reason, task_meta=prompt["meta"],
            timings={"finished_at": time.time()}, routed_experts=routed, round=self.rounds_closed)

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"generator-{self.rank} decode thread failed: {self.failure!r}")


def _prompt_uid(rollout: Rollout) -> str:
    return rollout.uid.rsplit("/", 1)[0]
