"""ringrl controller: `python run.py [key=value ...]` (Hydra overrides, see conf/schema.py).

The driver starts the actors, paces admission, triggers training and weight
syncs, and records; trajectories never pass through it.
"""
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import ray
from tqdm import tqdm

from actors.record import Recorder, accounting, make_run_dir
from actors.system import (ActorFailure, async_on_learners, async_stats, async_sync_weights, call,
                           evaluate, start_system, stop_system)
from actors.tasks import build_task
from comm.logs import setup_logging
from conf.load import ConfigError, load_config
from conf.schema import Config
from learner.staleness import AdmissionController
from model.plan import plan_report

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED_EXCLUDES = [".venv", ".git", "runs", "outputs", "bench", "**/__pycache__"]
DRIVER_STATE = "driver.json"


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
    log.info("Ray dashboard: {}", f"http://{context.dashboard_url}" if context.dashboard_url else "off")
    try:
        yield
    finally:
        ray.shutdown()  # an attached cluster keeps running; only this job's actors go


def start_policy(cfg: Config, system, recorder: Recorder, log) -> int:
    """Warm up a fresh policy, or load `run.resume`; publish it; return the prompt cursor."""
    if cfg.run.resume:
        version = call(async_on_learners(system, "load", cfg.run.resume))["learner-0"]
        cursor = json.loads((Path(cfg.run.resume) / DRIVER_STATE).read_text())["prompt_cursor"]
        log.info("resumed {} at version {}, prompt cursor {}", cfg.run.resume, version, cursor)
    else:
        with recorder.timer("warmup"):
            warmup = call(async_on_learners(system, "warmup"))["learner-0"]
        log.info("warm-up done: loss {:.3f} in {:.0f}s", warmup["sft_loss"], warmup["warmup_s"])
        cursor = 0
    call(async_sync_weights(system))
    return cursor


def admit(system, task, admission: AdmissionController, group_size: int, cursor: int) -> int:
    """Hand generators as many new prompts as the staleness bound allows; returns the new cursor."""
    groups = admission.admissible_groups(group_size)
    prompts = [vars(task.train_prompt(cursor + i)) for i in range(groups)]
    call({f"generator-{i}": g.submit.remote(prompts[i :: len(system.generators)])
          for i, g in enumerate(system.generators)})
    admission.admit(groups * group_size)
    return cursor + groups


def save(system, directory: Path, cursor: int) -> None:
    """Every learner writes its shard; the driver adds where the prompt stream stands."""
    call(async_on_learners(system, "save", str(directory)))
    (directory / DRIVER_STATE).write_text(json.dumps({"prompt_cursor": cursor}))


def train(cfg: Config, system, recorder: Recorder, log) -> None:
    task = build_task(cfg.task)
    eval_prompts = [vars(p) for p in task.eval_prompts()]
    cursor = start_policy(cfg, system, recorder, log)
    accuracy = recorder.evaluation("after_warmup", evaluate(system, eval_prompts))["accuracy"]
    log.info("held-out greedy accuracy before RL: {:.1%}", accuracy)
    G, eta = cfg.algo.group_size, 0 if cfg.algo.mode == "sync" else cfg.algo.max_staleness
    admission = AdmissionController(cfg.algo.prompts_per_step * G, eta)
    purged, rl_start = 0, time.monotonic()
    deadline = rl_start + (cfg.run.time_budget_s or math.inf)
    bar = tqdm(range(cfg.run.steps), desc="RL", disable=not cfg.run.progress, file=sys.stdout)
    for step in bar:
        if time.monotonic() > deadline:
            break
        with recorder.timer("admit"):
            cursor = admit(system, task, admission, G, cursor)
        with recorder.timer("round"):
            until_groups = round_batch_end(cfg, system, step)
        with recorder.timer("train"):
            stats = call(async_on_learners(system, "train_step", until_groups))["learner-0"]
            admission.consume(stats["consumed"])
        with recorder.timer("weight_sync"):
            sync = call(async_sync_weights(system))
        totals = pool_totals(call(async_stats(system)))
        admission.consume(totals["purged"] - purged)  # a purged group will never reach the learner
        purged = totals["purged"]
        if due_for_evaluation(cfg, step, totals["trained_samples"], recorder):
            with recorder.timer("eval"):
                accuracy = stats["eval_accuracy"] = evaluate(system, eval_prompts)["accuracy"]
        recorder.step({"step": step, **stats, **totals, "weight_sync_s": sync["learner-0"]["seconds"],
                       "in_flight": admission.in_flight, "prompt_cursor": cursor})
        bar.set_postfix(reward=f"{stats['reward']:.2f}", acc=f"{accuracy:.2f}", v=stats["version"])
    recorder.summary["rl_wall_s"] = time.monotonic() - rl_start
    accuracy = recorder.evaluation("after_rl", evaluate(system, eval_prompts))["accuracy"]
    log.info("held-out greedy accuracy after RL: {:.1%}", accuracy)
    save(system, recorder.run_dir / "checkpoint", cursor)


def round_batch_end(cfg: Config, system, step: int) -> int | None:
    """C3PO++: wait for round `step` to close; the batch ends with the groups sent by then."""
    if not (cfg.algo.round_token_budget and cfg.algo.mode == "async"):
        return None
    return sum(call({f"generator-{i}": g.wait_rounds_closed.remote(step + 1, cfg.learner.recv_timeout_s)
                     for i, g in enumerate(system.generators)}).values())


def pool_totals(counters: dict) -> dict:
    """Counters summed over the actors: tokens generated, samples trained, samples purged."""
    def total(key: str) -> int:
        return sum(c.get(key, 0) for c in counters.values())
    return {"generated_tokens": total("generated_tokens"), "trained_samples": total("trained_samples"),
            "purged": total("dropped_purged")}


def due_for_evaluation(cfg: Config, step: int, trained: int, recorder: Recorder) -> bool:
    """Every `run.eval_every` steps, and once on reaching `run.eval_at_trained_samples`."""
    periodic = cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0
    milestone = cfg.run.eval_at_trained_samples and trained >= cfg.run.eval_at_trained_samples and \
        not any("eval_accuracy" in r for r in recorder.steps if r["trained_samples"] >= cfg.run.eval_at_trained_samples)
    return bool(periodic or milestone)


def main(argv: list[str]) -> int:
    log = setup_logging("driver")
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if cfg.run.mode == "plan":
        print(plan_report(cfg))
        return 0
    run_dir = make_run_dir(cfg)
    recorder = Recorder(run_dir, cfg)
    log.info("run directory: {}", run_dir)
    status, final = "failed", {}
    with ray_session(cfg, namespace=run_dir.name, log=log):
        system = start_system(cfg)
        try:
            train(cfg, system, recorder, log)
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("interrupted: stopping every actor")
        except ActorFailure as err:
            log.error("{}", err)
        finally:
            final = stop_system(system)
            summary = recorder.finish(status, {"actors": final, "samples": accounting(final)})
    log.info("summary: {}", summary)
    return 0 if status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
