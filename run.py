"""ringrl controller: `python run.py [key=value ...]` (Hydra overrides, see conf/schema.py).

The driver starts the actors, paces admission, triggers training and weight syncs,
keeps the ledger of every prompt's fate, takes checkpoints and records; trajectories
never pass through it. `python run.py run.resume=<run dir>` continues a run from its
newest complete checkpoint with the run's own overrides (later ones on top).
"""
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import ray

from actors.evaluation import evaluate_checkpoint, with_evaluated_run_overrides
from actors.learner import RoundBatch
from actors.ledger import Ledger
from actors.record import MFU_ROLES, Recorder, make_run_dir
from actors.status import Status
from actors.telemetry import ActorMetrics
from actors.supervisor import Supervisor
from actors.system import (ActorFailure, accuracy, async_on_generators, async_on_learners,
                           async_stats, call, check_shared_storage, evaluate_in_slices, start_generators,
                           start_system, stop_system)
from actors.tasks import build_task
from comm.logs import setup_logging
from conf.load import ConfigError, check_placeable, load_config, resolve_gpus, resolve_host
from conf.schema import Config
from learner.checkpoint import CheckpointError, latest_valid, publish, staging_dir, write_durably
from learner.staleness import AdmissionController
from model.plan import plan_report

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED_EXCLUDES = [".venv", ".git", "runs", "outputs", "bench", "**/__pycache__"]
DRIVER_STATE = "driver.json"
OVERRIDES = "overrides.json"
COLLECT_SLICE_S = 1.0  # the driver looks after the actors between slices of a learner's wait
# a checkpoint's drain: learners take in groups until this quiet, then the ledger says whether any is
# still on the way; short, because the generators are held meanwhile
CHECKPOINT_QUIET_S = 0.05
WARMUP_SLICE = 25     # warm-up steps per learner call: the progress shown moves this often


@dataclass
class Progress:
    """Where the driver stands; a checkpoint's driver.json keeps it."""

    step: int      # RL steps done
    cursor: int    # index of the next training prompt
    ledger: Ledger
    admission: AdmissionController

    def to_dict(self) -> dict:
        return {"step": self.step, "cursor": self.cursor, "ledger": self.ledger.to_dict(),
                "admitted": self.admission.admitted, "consumed": self.admission.consumed}

    @staticmethod
    def start(cfg: Config, state: dict | None = None) -> "Progress":
        G = cfg.algo.group_size
        eta = 0 if cfg.algo.mode == "sync" else cfg.algo.max_staleness
        admission = AdmissionController(cfg.algo.prompts_per_step * G, eta)
        if state is None:
            return Progress(0, 0, Ledger(G), admission)
        admission.admitted, admission.consumed = state["admitted"], state["consumed"]
        return Progress(state["step"], state["cursor"], Ledger.from_dict(G, state["ledger"]), admission)


@contextmanager
def ray_session(cfg: Config, namespace: str, log):
    """Attach to `ray.address` or start a local instance; code ships via runtime_env."""
    runtime_env = {"working_dir": REPO_ROOT, "excludes": SHIPPED_EXCLUDES}
    if cfg.ray.address:
        context = ray.init(address=cfg.ray.address, namespace=namespace, runtime_env=runtime_env,
                           log_to_driver=True)
    else:
        wanted = (cfg.learner.num * cfg.learner.num_cpus + cfg.judge.num * cfg.judge.num_cpus
                  + cfg.generator.num * cfg.generator.num_cpus)
        num_cpus = cfg.ray.num_cpus or max(os.cpu_count(), math.ceil(wanted))
        context = ray.init(address="local", num_cpus=num_cpus, namespace=namespace, runtime_env=runtime_env,
                           include_dashboard=cfg.ray.dashboard)
    if context.dashboard_url:  # Ray asks for its token: authentication stays on
        log.info("Ray dashboard: http://{} (it asks for a token: `ray get-auth-token` prints it)",
                 context.dashboard_url)
    else:
        log.info("Ray dashboard: off")
    try:
        nodes = [node for node in ray.nodes() if node["Alive"]]  # before any actor starts:
        resolve_gpus(cfg, ray.cluster_resources().get("GPU", 0.0))
        resolve_host(cfg, [node["NodeManagerAddress"] for node in nodes])
        check_placeable(cfg, [node["Resources"] for node in nodes])
        log.info("Ray metrics (Prometheus): {}", ", ".join(
            f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics" for node in nodes))
        log.info("GPUs per actor: learner {:g}, generator {:g}", cfg.learner.num_gpus, cfg.generator.num_gpus)
        yield
    finally:
        ray.shutdown()  # an attached cluster keeps running; only this job's actors go


def restore(cfg: Config, system, recorder: Recorder, log) -> Progress:
    """Load the newest complete checkpoint of `run.resume` into the learners and generators."""
    checkpoint = latest_valid(Path(cfg.run.resume), log.warning)
    state = json.loads((checkpoint / DRIVER_STATE).read_text())
    snapshots = {name: checkpoint / f"{name}.msgpack" for name in system.generators}
    missing = [name for name, path in snapshots.items() if not path.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} has no state for {', '.join(missing)}: "
                              "resume with the generator.num it was written with")
    call(async_on_learners(system, "load", str(checkpoint)))
    call({name: system.generators[name].restore.remote(msgpack.unpackb(path.read_bytes()))
          for name, path in snapshots.items()})
    recorder.resume(state["step"])
    log.info("resumed {} at step {}, prompt cursor {}", checkpoint, state["step"], state["cursor"])
    return Progress.start(cfg, state)


def warm_up(cfg: Config, system, recorder: Recorder, log) -> None:
    """The supervised warm-up, or the policy of `run.init_from`."""
    if cfg.run.init_from:
        checkpoint = latest_valid(Path(cfg.run.init_from), log.warning)
        version = call(async_on_learners(system, "load", str(checkpoint), True))["learner-0"]
        log.info("policy of {} (version {}) as the starting point", checkpoint, version)
        return
    if not cfg.learner.warmup_steps:
        log.info("no warm-up (learner.warmup_steps=0): RL starts from the initial policy")
        return
    steps, seconds = cfg.learner.warmup_steps, 0.0
    status = Status(cfg, log, "warm-up", steps)
    with recorder.timer("warmup"):
        for done in range(0, steps, WARMUP_SLICE):
            warmup = call(async_on_learners(system, "warmup", min(WARMUP_SLICE, steps - done)))["learner-0"]
            seconds += warmup["warmup_s"]
            status.update(min(WARMUP_SLICE, steps - done), loss=warmup["sft_loss"])
    status.close()
    log.info("warm-up done: loss {:.3f} in {:.0f}s on {} threads per learner", warmup["sft_loss"], seconds,
             warmup["warmup_threads"])


class RLClock:
    """Seconds of RL since it started, evaluations not counted: an evaluation pauses every actor's
    progress, so accuracy over this clock does not depend on how often a run is evaluated."""

    def __init__(self, grid_s: float):
        self.start, self.paused_s = time.monotonic(), 0.0
        self.grid_s, self.next_grid_s = grid_s, grid_s

    def seconds(self) -> float:
        return time.monotonic() - self.start - self.paused_s

    def grid_due(self) -> bool:
        """Whether a point of the `run.eval_every_s` grid was passed since the last one."""
        if not self.grid_s or self.seconds() < self.next_grid_s:
            return False
        self.next_grid_s = (self.seconds() // self.grid_s + 1) * self.grid_s
        return True

    @contextmanager
    def paused(self):
        start = time.monotonic()
        try:
            yield
        finally:
            self.paused_s += time.monotonic() - start


def admit(sup: Supervisor, task, progress: Progress) -> None:
    """Hand generators as many new prompts as the staleness bound allows."""
    groups = progress.admission.admissible_groups(progress.ledger.group_size)
    sup.submit([vars(task.train_prompt(progress.cursor + i)) for i in range(groups)])
    progress.cursor += groups


def collect_batch(cfg: Config, sup: Supervisor, batch: RoundBatch | None) -> None:
    """Let the learners fill their buffers, a slice at a time, until every rank has its batch."""
    last_count, last_change = -1, time.monotonic()
    while True:
        results = sup.call(async_on_learners(sup.system, "collect", COLLECT_SLICE_S, batch))
        sup.settle_reported(results)
        if all(r["ready"] for r in results.values()):
            return
        count = sum(len(r["buffered"]) for r in results.values())
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > cfg.learner.recv_timeout_s:
            raise ActorFailure("learner-0", f"{count} groups buffered and none new for {cfg.learner.recv_timeout_s}s "
                                            f"at step {sup.step}")


def train_step(sup: Supervisor, batch: RoundBatch | None) -> dict:
    results = sup.call(async_on_learners(sup.system, "train_step", batch))
    sup.settle_reported(results)
    return results["learner-0"]


def checkpoint(cfg: Config, sup: Supervisor, progress: Progress, run_dir: Path, log) -> Path | None:
    """Hold the generators, drain what is on the wire into the learners' buffers, write every
    part, publish; a checkpoint that cannot be completed is skipped (logged), the run goes on."""
    system = sup.system
    snapshots = {n: s for n, s in sup.call(async_on_generators(system, "hold")).items() if s is not None}
    try:
        sup.settle_reported(snapshots)
        held = {uid for s in snapshots.values() for uid in [*s["meta"], *(p["uid"] for p in s["queued"])]}
        if not drain_to_learners(cfg, sup, progress.ledger, held, log):
            return None
        staged = staging_dir(run_dir, progress.step)
        sup.call(async_on_learners(system, "save", str(staged)))
        for name, snapshot in snapshots.items():
            write_durably(staged / f"{name}.msgpack", msgpack.packb(snapshot))
        write_durably(staged / DRIVER_STATE, json.dumps(progress.to_dict()).encode())
        return publish(staged)
    finally:
        sup.call(async_on_generators(system, "release"))


def drain_to_learners(cfg: Config, sup: Supervisor, ledger: Ledger, held: set[str], log) -> bool:
    """Until every pending prompt the generators do not hold is buffered at a learner."""
    deadline = time.monotonic() + cfg.learner.recv_timeout_s
    while True:
        absorbed = sup.call(async_on_learners(sup.system, "absorb", CHECKPOINT_QUIET_S))
        sup.settle_reported(absorbed)
        on_the_way = set(ledger.pending()) - held - {uid for r in absorbed.values() for uid in r["buffered"]}
        if not on_the_way:
            return True
        if time.monotonic() > deadline:
            log.warning("checkpoint at step {} skipped: {} groups never reached a learner", sup.step, len(on_the_way))
            return False


def train(cfg: Config, sup: Supervisor, progress: Progress, recorder: Recorder, log) -> None:
    task = build_task(cfg.task)
    eval_prompts = [vars(p) for p in task.eval_prompts()]
    if "after_warmup" not in recorder.evaluations:
        result = recorder.evaluation("after_warmup", held_out_accuracy(cfg, sup, eval_prompts, log))
        log.info("held-out greedy accuracy before RL: {:.1%}", result["accuracy"])
    recorder.start_rl(pool_totals(recorder.take_spans(sup.call(async_stats(sup.system)))))
    clock = RLClock(cfg.run.eval_every_s)
    budget_s = cfg.run.time_budget_s or math.inf
    status = Status(cfg, log, "RL", cfg.run.steps, initial=progress.step)
    metrics = ActorMetrics("driver", "driver")
    for step in range(progress.step, cfg.run.steps):
        if clock.seconds() > budget_s:
            break
        sup.step = step
        with recorder.timer("admit"):
            admit(sup, task, progress)
        with recorder.timer("round"):
            batch = round_batch(cfg, sup, step)
        with recorder.timer("collect"):
            collect_batch(cfg, sup, batch)
        with recorder.timer("train"):
            stats = train_step(sup, batch)
        with recorder.timer("weight_sync"):
            sync = sup.sync_weights()
        with recorder.timer("admit"):  # refill at once with what the step consumed: the new weights are out
            admit(sup, task, progress)
        sup.settle({uid: fate for fates in sup.call(async_on_generators(sup.system, "take_fates")).values()
                    if fates for uid, fate in fates.items()})
        counters = recorder.take_spans(sup.call(async_stats(sup.system)))  # the spans go to the timeline
        recorder.processes({name: {"pid": c["pid"], "node": c["node"]} for name, c in counters.items() if c})
        totals = pool_totals(counters)
        progress.step = step + 1
        publish_driver_metrics(metrics, sup, progress)
        stats["rl_s"] = clock.seconds()
        # `|`, not `or`: the grid moves on even when another reason made the evaluation due
        if due_for_evaluation(cfg, step, totals["trained_samples"], recorder) | clock.grid_due():
            with recorder.timer("eval"), clock.paused():
                stats["eval_accuracy"] = held_out_accuracy(cfg, sup, eval_prompts, log)["accuracy"]
        record = recorder.step({"step": step, **stats, **totals, "weight_sync_s": sync["learner-0"]["seconds"],
                                "weight_sync_bytes": sync["learner-0"]["bytes"],
                                "in_flight": progress.admission.in_flight, "prompt_cursor": progress.cursor})
        if cfg.run.checkpoint_every and progress.step % cfg.run.checkpoint_every == 0 and progress.step < cfg.run.steps:
            with recorder.timer("checkpoint"):
                checkpoint(cfg, sup, progress, recorder.run_dir, log)
        status.update(reward=stats["reward"], accuracy=stats["accuracy"], version=stats["version"],
                      tokens_per_s=round(record.get("generated_tokens_per_s", 0.0)), mfu=record.get("mfu/run", 0.0))
    status.close()
    recorder.summary.update(rl_wall_s=clock.seconds(), rl_eval_s=clock.paused_s)
    result = recorder.evaluation("after_rl", held_out_accuracy(cfg, sup, eval_prompts, log))
    log.info("held-out greedy accuracy after RL: {:.1%}", result["accuracy"])
    checkpoint(cfg, sup, progress, recorder.run_dir, log)


def publish_driver_metrics(metrics: ActorMetrics, sup: Supervisor, progress: Progress) -> None:
    """The ledger's figures in Ray's metrics: admitted, in flight, trained, dropped by reason."""
    samples = sup.ledger.totals()
    metrics.publish({"admitted": samples["admitted"], "in_flight": progress.admission.in_flight,
                     "trained": samples["trained"], "step": progress.step}, samples["dropped"])


def held_out_accuracy(cfg: Config, sup: Supervisor, prompts: list[dict], log) -> dict:
    """Greedy accuracy on the held-out `prompts`, a slice at a time (progress shows)."""
    status = Status(cfg, log, "evaluation", len(prompts))
    results = evaluate_in_slices(sup.system, prompts, sup.call, status.update)
    status.close()
    return accuracy(results)


def round_batch(cfg: Config, sup: Supervisor, step: int) -> RoundBatch | None:
    """C3PO++: the learners receive (and train on) round `step`'s groups until it closes; the
    batch is every group sent by then."""
    if not (cfg.algo.round_token_budget and cfg.algo.mode == "async"):
        return None
    closes = async_on_generators(sup.system, "wait_rounds_closed", step + 1, cfg.learner.recv_timeout_s)
    while True:
        results = sup.call(async_on_learners(sup.system, "collect", COLLECT_SLICE_S, RoundBatch(step),
                                             list(closes.values())))
        sup.settle_reported(results)
        if all(r["round_closed"] for r in results.values()):
            break
    closed = sup.call(closes)  # a generator that failed meanwhile is named (and dealt with) here
    return RoundBatch(step, sum(sent for sent in closed.values() if sent is not None))


def pool_totals(counters: dict) -> dict:
    """Counters summed over the live actors: tokens generated, samples trained, samples purged, and
    per role the model FLOPs done so far and the peak FLOP/s of the cores the role holds (for MFU)."""
    def total(key: str, role: str = "") -> float:
        return sum(c.get(key, 0) for name, c in counters.items() if c and name.startswith(role))
    totals = {"generated_tokens": total("generated_tokens"), "trained_samples": total("trained_samples"),
              "purged": total("dropped_purged")}
    for role in MFU_ROLES:
        totals[f"{role}_flops"] = total("model_flops", role)
        totals[f"{role}_peak_flops"] = total("peak_flops", role)
        for name, c in counters.items():
            for phase, seconds in (c or {}).get("phases", {}).items() if name.startswith(role) else ():
                totals[f"phases/{role}/{phase}"] = totals.get(f"phases/{role}/{phase}", 0.0) + seconds
    return totals


def due_for_evaluation(cfg: Config, step: int, trained: int, recorder: Recorder) -> bool:
    """Every `run.eval_every` steps, and once on reaching `run.eval_at_trained_samples`."""
    periodic = cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0
    milestone = cfg.run.eval_at_trained_samples and trained >= cfg.run.eval_at_trained_samples and \
        not any("eval_accuracy" in r for r in recorder.steps if r["trained_samples"] >= cfg.run.eval_at_trained_samples)
    return bool(periodic or milestone)


def with_run_overrides(argv: list[str]) -> list[str]:
    """On `run.resume=<run dir>`: the run's own overrides, then these (later ones win)."""
    resume = [arg for arg in argv if arg.startswith("run.resume=")]
    if not resume:
        return argv
    saved = Path(resume[-1].split("=", 1)[1]) / OVERRIDES
    if not saved.is_file():
        raise ConfigError(f"{resume[-1]}: {saved} not found (not a ringrl run directory)")
    return [*json.loads(saved.read_text()), *argv]


def run(cfg: Config, argv: list[str], log) -> int:
    run_dir = Path(cfg.run.resume).absolute() if cfg.run.resume else make_run_dir(cfg)
    if not cfg.run.resume:
        (run_dir / OVERRIDES).write_text(json.dumps(argv))
    recorder = Recorder(run_dir, cfg)
    log.info("run directory: {}", run_dir)
    status, final, sup = "failed", {}, None
    with ray_session(cfg, namespace=run_dir.name, log=log):
        try:
            system = start_system(cfg)
            check_shared_storage(system, run_dir)
        except ActorFailure as err:  # no actor has work yet: Ray's shutdown takes them all
            log.error("{}", err)
            recorder.finish(status, {})
            return 1
        try:
            progress = restore(cfg, system, recorder, log) if cfg.run.resume else Progress.start(cfg)
            sup = Supervisor(system, progress.ledger, progress.admission, log)
            if not cfg.run.resume:
                warm_up(cfg, system, recorder, log)
            sup.sync_weights(resend=bool(cfg.run.resume))
            start_generators(system)
            train(cfg, sup, progress, recorder, log)
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("interrupted: stopping every actor")
        except (ActorFailure, CheckpointError) as err:
            log.error("{}", err)
        finally:
            final = recorder.take_spans(stop_system(system))
            extra = {"actors": final, "weight_path": system.weight_path, "cores": system.cores,
                     "faults": sup.report() if sup else []}
            if sup:
                sup.settle_reported(final)
                extra["samples"] = sup.ledger.totals()
            summary = recorder.finish(status, extra)
    log.info("summary: {}", summary)
    return 0 if status == "finished" else 1


def evaluate(cfg: Config, argv: list[str], log) -> int:
    """run.mode=eval: the newest complete checkpoint of `run.init_from` on the held-out prompts, in a
    run directory of its own (actors/evaluation.py); the same actors, no training."""
    run_dir = make_run_dir(cfg)
    (run_dir / OVERRIDES).write_text(json.dumps(argv))
    log.info("run directory: {}", run_dir)
    with ray_session(cfg, namespace=run_dir.name, log=log):
        system = None
        try:
            system = start_system(cfg)
            check_shared_storage(system, run_dir)
            evaluate_checkpoint(cfg, system, run_dir, log)
            return 0
        except (ActorFailure, CheckpointError) as err:
            log.error("{}", err)
            return 1
        finally:
            if system is not None:
                stop_system(system)


def main(argv: list[str]) -> int:
    log = setup_logging("driver")
    try:
        cfg = load_config(with_evaluated_run_overrides(with_run_overrides(argv), OVERRIDES))
        if cfg.run.mode == "plan":
            print(plan_report(cfg))
            return 0
        if cfg.run.mode == "eval":
            return evaluate(cfg, argv, log)
        return run(cfg, argv, log)
    except ConfigError as err:  # at load, or against the Ray cluster's GPUs before any actor starts
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
