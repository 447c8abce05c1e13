"""Start, wire, drive and stop the actor system from the driver.

Naming rule for the whole package: actor methods run inside the actor and are
called with `.remote()`; driver-side helpers that return Ray object refs without
waiting for them start with `async_`. `call` waits for refs and turns an actor's
failure into an `ActorFailure` naming the actor (role and rank).
"""
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.generator import Generator
from actors.judge import Judge
from actors.learner import Learner
from conf.schema import Config

STOP_TIMEOUT_S = 30
STOP_ORDER = ("generator", "judge", "learner")


class ActorFailure(RuntimeError):
    pass


@dataclass
class System:
    learners: list
    judges: list
    generators: list

    @property
    def learner(self):
        """Rank 0: publishes weights and reports each step's merged figures."""
        return self.learners[0]

    def named(self) -> dict:
        actors = {f"learner-{i}": a for i, a in enumerate(self.learners)}
        actors.update({f"judge-{i}": j for i, j in enumerate(self.judges)})
        actors.update({f"generator-{i}": g for i, g in enumerate(self.generators)})
        return actors


def call(named_refs: dict, timeout_s: float | None = None) -> dict:
    """Wait for {actor name: ref}; a failure is re-raised naming the actor."""
    results = {}
    for name, ref in named_refs.items():
        try:
            results[name] = ray.get(ref, timeout=timeout_s)
        except (RayActorError, RayTaskError, GetTimeoutError) as err:
            raise ActorFailure(f"{name} failed: {_summary(err)}") from err
    return results


def _summary(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def start_system(cfg: Config) -> System:
    """Create the named actors, then wire the learner group, channels and the weight group."""
    system = System(
        learners=[Learner.options(name=f"learner-{i}", num_cpus=cfg.learner.num_cpus).remote(cfg, i)
                  for i in range(cfg.learner.num)],
        judges=[Judge.options(name=f"judge-{i}", num_cpus=cfg.judge.num_cpus).remote(cfg, i)
                for i in range(cfg.judge.num)],
        generators=[Generator.options(name=f"generator-{i}", num_cpus=cfg.generator.num_cpus,
                                      max_concurrency=4).remote(cfg, i)
                    for i in range(cfg.generator.num)])
    addr, port = call({"learner-0": system.learner.address.remote()})["learner-0"]
    # every learner rank must enter the group's rendezvous together
    learner_endpoints = list(call({f"learner-{i}": a.setup.remote(addr, port)
                                   for i, a in enumerate(system.learners)}).values())
    judge_endpoints = list(call({f"judge-{i}": j.start.remote(learner_endpoints)
                                 for i, j in enumerate(system.judges)}).values())
    addr, port = call({"learner-0": system.learner.address.remote()})["learner-0"]
    world_size = 1 + len(system.generators)
    # likewise every rank of the weight group: learner-0 and each generator
    joins = {"learner-0": system.learner.join_weight_group.remote(addr, port, world_size)}
    joins.update({f"generator-{i}": g.join_weight_group.remote(addr, port, i + 1, world_size)
                  for i, g in enumerate(system.generators)})
    call(joins)
    call({f"generator-{i}": g.start.remote(judge_endpoints) for i, g in enumerate(system.generators)})
    return system


def async_sync_weights(system: System) -> dict:
    """Publish learner-0's weights (the other learners gather with it); generators receive."""
    refs = {f"learner-{i}": a.publish.remote() for i, a in enumerate(system.learners)}
    refs.update({f"generator-{i}": g.receive_weights.remote() for i, g in enumerate(system.generators)})
    return refs


def async_on_learners(system: System, method: str, *args) -> dict:
    """The same method on every learner rank (their collectives need all of them)."""
    return {f"learner-{i}": getattr(a, method).remote(*args) for i, a in enumerate(system.learners)}


def async_stats(system: System) -> dict:
    return {name: actor.stats.remote() for name, actor in system.named().items()}


def evaluate(system: System, prompts: list[dict]) -> dict:
    """Greedy accuracy over `prompts`, split across the generators."""
    shards = [prompts[i :: len(system.generators)] for i in range(len(system.generators))]
    results = call({f"generator-{i}": g.evaluate.remote(shard)
                    for i, (g, shard) in enumerate(zip(system.generators, shards)) if shard})
    correct = sum(r["correct"] for r in results.values())
    total = sum(r["total"] for r in results.values())
    examples = [e for r in results.values() for e in r["examples"]]
    return {"accuracy": correct / total, "correct": correct, "total": total, "examples": examples[:6]}


def stop_system(system: System) -> dict:
    """Stop the actors upstream first (generators, judges, learners) so that every sample
    still on its way is counted downstream; collect final counters, then kill each actor."""
    final = {}
    upstream_first = sorted(system.named().items(), key=lambda item: STOP_ORDER.index(item[0].split("-")[0]))
    for name, actor in upstream_first:
        try:
            final[name] = ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT_S)
        except Exception as err:  # a dead actor still has to be killed; report, go on
            final[name] = {"error": _summary(err)}
        ray.kill(actor)
    return final
