"""Start, wire, drive and stop the actor system from the driver.

Naming rule for the whole package: actor methods run inside the actor and are
called with `.remote()`; driver-side helpers that return Ray object refs without
waiting for them start with `async_`. `call` waits for refs and turns an actor's
failure into an `ActorFailure` naming the actor (role and rank).

Generators and judges are kept by name ("generator-0", ...): a replacement takes the
name of the actor it replaces, and with `run.on_actor_failure=continue` a dead one
just leaves the pool. The order of `system.generators` gives their weight-group ranks.
"""
import secrets
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
from loguru import logger
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.generator import Generator
from actors.judge import Judge
from actors.learner import Learner
from comm.addresses import channel_hosts
from comm.auth import ChannelKeys, run_keys
from comm.placement import SHARED, bind_threads, core_plan, weight_path, wire_dtype
from conf.schema import Config

STOP_TIMEOUT_S = 30
STOP_ORDER = ("generator", "judge", "learner")
STORAGE_PROBES = ".storage-probes"
EVAL_SLICE = 256  # held-out prompts per evaluation call
PLACEMENT_STRATEGIES = {"pack": "DEFAULT", "spread": "SPREAD"}  # ray.placement -> Ray's scheduling strategy


class ActorFailure(RuntimeError):
    def __init__(self, actor: str, detail: str):
        super().__init__(f"{actor} failed: {detail}")
        self.actor = actor


@dataclass
class System:
    cfg: Config
    keys: ChannelKeys | None  # CURVE keys of this run's channels (None on loopback)
    learners: list = field(default_factory=list)
    judges: dict = field(default_factory=dict)       # name -> actor
    generators: dict = field(default_factory=dict)   # name -> actor
    learner_endpoints: list[str] = field(default_factory=list)
    judge_endpoints: dict = field(default_factory=dict)  # judge name -> the endpoint it bound and reported
    weight_store: tuple[str, int] = ("", 0)          # rendezvous store of the current weight group
    weight_path: str = ""                            # how weights travel: gloo | nccl | cupy-nccl | cuda-ipc
    cores: dict = field(default_factory=dict)        # ray.bind_cores: actor (or decode thread, driver) -> its cores

    @property
    def learner(self):
        """Rank 0: publishes weights and reports each step's merged figures."""
        return self.learners[0]

    def named(self) -> dict:
        return {**{f"learner-{i}": a for i, a in enumerate(self.learners)}, **self.judges, **self.generators}


def call(named_refs: dict, timeout_s: float | None = None) -> dict:
    """Wait for {actor name: ref}; a failure is re-raised naming the actor."""
    results = {}
    for name, ref in named_refs.items():
        try:
            results[name] = ray.get(ref, timeout=timeout_s)
        except (RayActorError, RayTaskError, GetTimeoutError) as err:
            raise ActorFailure(name, summary(err)) from err
    return results


def summary(err: Exception) -> str:
    """One line: why a call failed."""
    if isinstance(err, RayActorError):
        return "its process died" if "died" in str(err) else "unavailable"
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def placement_options(cfg: Config, name: str) -> dict:
    """Ray options placing actor `name`: its role's CPUs, GPUs and custom resources, spread or packed."""
    section = getattr(cfg, name.rsplit("-", 1)[0])
    return {"name": name, "num_cpus": section.num_cpus, "num_gpus": getattr(section, "num_gpus", 0.0),
            "resources": dict(section.resources), "scheduling_strategy": PLACEMENT_STRATEGIES[cfg.ray.placement]}


def new_generator(system: System, name: str):
    # threads: the watch call, a weight receive, and short calls (submit, stats, ...) beside them
    return Generator.options(**placement_options(system.cfg, name), max_concurrency=5).remote(
        system.cfg, int(name.rsplit("-", 1)[1]), system.keys)


def new_judge(system: System, name: str):
    return Judge.options(**placement_options(system.cfg, name), max_concurrency=2).remote(
        system.cfg, int(name.rsplit("-", 1)[1]), system.keys)


def start_system(cfg: Config) -> System:
    """Create the named actors, then wire the learner group, the channels and the weight group.

    The generators are left to `start_generators` (a resumed run restores them first).
    """
    system = System(cfg, keys=run_keys(*channel_hosts(cfg.comm.host, alive_node_ips())))
    logger.info("trajectory channels on {}: {}", cfg.comm.host,
                "plain TCP (loopback)" if system.keys is None else "CURVE, keys made for this run")
    system.learners = [Learner.options(**placement_options(cfg, f"learner-{i}")).remote(cfg, i, system.keys)
                       for i in range(cfg.learner.num)]
    system.judges = {f"judge-{i}": new_judge(system, f"judge-{i}") for i in range(cfg.judge.num)}
    system.generators = {f"generator-{i}": new_generator(system, f"generator-{i}") for i in range(cfg.generator.num)}
    wait_placed(system)
    addr, port = call({"learner-0": system.learner.address.remote()})["learner-0"]
    # every learner rank must enter the group's rendezvous together
    system.learner_endpoints = list(call({f"learner-{i}": a.setup.remote(addr, port)
                                          for i, a in enumerate(system.learners)}).values())
    logger.info("learners receive at {}", ", ".join(system.learner_endpoints))
    for name, judge in system.judges.items():
        start_judge(system, name, judge)
    form_weight_group(system)
    nodes = {name: stats["node"] for name, stats in call(async_stats(system)).items()}
    logger.info("actors by node: {}", "; ".join(f"{node}: {', '.join(n for n in nodes if nodes[n] == node)}"
                                                 for node in sorted(set(nodes.values()))))
    return system


def check_shared_storage(system: System, run_dir: Path) -> None:
    """The driver and every learner see the same run directory (checkpoints are written there by
    each learner shard): each writes a probe file with a fresh token and reads the others' back."""
    probes = run_dir / STORAGE_PROBES
    probes.mkdir(exist_ok=True)
    token = secrets.token_hex(8)
    (probes / "driver").write_text(token)
    seen = call(async_on_learners(system, "probe_storage", str(probes)))
    for name, (node, learner_token, driver_token) in seen.items():
        written = probes / name
        if driver_token != token or not written.is_file() or written.read_text() != learner_token:
            raise ActorFailure(name, f"on node {node} does not share the run directory {run_dir} with the driver: "
                                     "run.out_dir must be one filesystem seen by the driver and every learner node")
    shutil.rmtree(probes)


def wait_placed(system: System) -> None:
    """Every actor has a process, or ActorFailure naming those Ray could not place in `ray.start_timeout_s`
    (check_placeable ruled out a cluster too small; resources held by others can still be missing)."""
    actors = system.named()
    ready = {actor.__ray_ready__.remote(): name for name, actor in actors.items()}
    done, pending = ray.wait(list(ready), num_returns=len(ready), timeout=system.cfg.ray.start_timeout_s)
    call({ready[ref]: ref for ref in done})  # an actor that failed in its constructor is named here
    if pending:
        waiting = sorted(ready[ref] for ref in pending)
        raise ActorFailure(waiting[0], f"not placed in {system.cfg.ray.start_timeout_s:g}s ({len(waiting)} actors "
                                       f"waiting for resources: {', '.join(waiting)}; ray status shows the cluster)")


def start_judge(system: System, name: str, judge, reuse: str = "") -> None:
    """Start `judge`; a replacement binds the endpoint of the judge it replaces (`reuse`) if on its node."""
    endpoint = call({name: judge.start.remote(system.learner_endpoints, reuse)})[name]
    system.judge_endpoints[name] = endpoint
    logger.info("{} receives at {}", name, endpoint)


def alive_node_ips() -> list[str]:
    """The address of every live node of the Ray cluster."""
    return [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]


def form_weight_group(system: System) -> None:
    """(Re-)form the weight group: learner-0 and every generator join a fresh one together, over
    the path that where their tensors live allows, with weights in the generators' dtype."""
    placements = call({"learner-0": system.learner.placement_info.remote(),
                       **{name: g.placement_info.remote() for name, g in system.generators.items()}})
    subscribers = [placements[name] for name in system.generators]
    path, why = weight_path(placements["learner-0"], subscribers)
    if path != system.weight_path:
        logger.info("weight sync over {}: {}", path, why)
    system.weight_path = path
    call(async_on_learners(system, "set_wire_dtype", wire_dtype(subscribers)))
    addr, port = call({"learner-0": system.learner.address.remote()})["learner-0"]
    system.weight_store = (addr, port)
    world_size = 1 + len(system.generators)
    joins = {"learner-0": system.learner.join_weight_group.remote(addr, port, world_size, path)}
    joins.update({name: g.join_weight_group.remote(addr, port, rank, world_size, path)
                  for rank, (name, g) in enumerate(system.generators.items(), start=1)})
    call(joins)


def start_generators(system: System, names: list[str] | None = None) -> None:
    """Start decoding on the generators `names` (default all) towards the judges; in async mode with
    `ray.bind_cores`, every thread bound to its cores first (in sync mode the roles take turns, and
    each may use every core)."""
    names = names or list(system.generators)
    if system.cfg.ray.bind_cores and system.cfg.algo.mode == "async":
        bind_cores(system)
    call({name: system.generators[name].start.remote(list(system.judge_endpoints.values())) for name in names})


def bind_cores(system: System) -> None:
    """On each machine with CPU generators: each one's decode thread to cores of its own (as many as
    its torch threads), every other thread of the actors there, and of the driver (for the rest of
    its run) if it is there, to the rest (comm.placement.core_plan). A machine where that leaves no
    core for the rest is left to the OS (logged)."""
    named = system.named()
    hosts = call({name: actor.host_cores.remote() for name, actor in named.items()})
    on_cpu = [name for name, placement in call({name: g.placement_info.remote() for name, g in
                                                system.generators.items()}).items() if not placement.on_cuda]
    for host in sorted({host for host, _ in hosts.values()}):
        here = [name for name in named if hosts[name][0] == host]
        generators = {name: system.cfg.generator.torch_threads for name in on_cpu if name in here}
        if not generators:
            continue
        cores = set(hosts[here[0]][1])  # empty where the OS cannot bind threads
        plan = core_plan(cores, generators)
        if plan is None:
            logger.warning("{}: {} generator thread(s) would leave none of its {} bindable cores for the other actors: "
                           "cores left to the OS", host, sum(generators.values()), len(cores))
            continue
        shared = sorted(plan[SHARED])
        system.cores.update(call({name: named[name].bind_cores.remote(shared) for name in here}))
        call({name: named[name].bind_decode_thread.remote(sorted(plan[name])) for name in generators})
        system.cores.update({f"{name} decode thread": sorted(plan[name]) for name in generators})
        if host == socket.gethostname():
            system.cores["driver"] = bind_threads(shared)
    if system.cores:
        logger.info("cores: {}", "; ".join(f"{name} {cores}" for name, cores in system.cores.items()))


def async_sync_weights(system: System, resend: bool = False) -> dict:
    """Publish learner-0's weights (the other learners gather with it); generators receive.

    `resend`: the same version again (after the weight group was re-formed, or on resume).
    """
    refs = async_on_learners(system, "publish")
    refs.update({name: g.receive_weights.remote(resend) for name, g in system.generators.items()})
    return refs


def async_on_learners(system: System, method: str, *args) -> dict:
    """The same method on every learner rank (their collectives need all of them)."""
    return {f"learner-{i}": getattr(a, method).remote(*args) for i, a in enumerate(system.learners)}


def async_on_generators(system: System, method: str, *args) -> dict:
    return {name: getattr(g, method).remote(*args) for name, g in system.generators.items()}


def async_stats(system: System) -> dict:
    return {name: actor.stats.remote() for name, actor in system.named().items()}


def evaluate_in_slices(system: System, prompts: list[dict], call_actors=call,
                       progress: Callable[[int], None] = lambda done: None) -> dict:
    """Greedy evaluation of `prompts`, EVAL_SLICE at a time: results by "<generator>/<first prompt>".

    Whoever evaluates (a training run, `run.mode=eval`) slices alike, so the decode batches and
    with them the results are the same. `call_actors` waits for the refs (the driver's supervisor
    during a run); `progress(n)` follows each slice of n prompts.
    """
    results = {}
    for start in range(0, len(prompts), EVAL_SLICE):
        part = call_actors(async_evaluate(system, prompts[start : start + EVAL_SLICE]))
        results.update({f"{name}/{start}": result for name, result in part.items()})
        progress(min(EVAL_SLICE, len(prompts) - start))
    return results


def async_evaluate(system: System, prompts: list[dict]) -> dict:
    """Greedy evaluation of `prompts`, split across the generators (see `accuracy`)."""
    names = list(system.generators)
    shards = {name: prompts[i :: len(names)] for i, name in enumerate(names)}
    return {name: system.generators[name].evaluate.remote(shard) for name, shard in shards.items() if shard}


def async_sample(system: System, prompts: list[dict], k: int, temperature: float) -> dict:
    """`k` scored samples of each of `prompts` at `temperature`, split across the generators as
    `async_evaluate` splits them (actors/evaluation.py)."""
    names = list(system.generators)
    shards = {name: prompts[i :: len(names)] for i, name in enumerate(names)}
    return {name: system.generators[name].sample.remote(shard, k, temperature)
            for name, shard in shards.items() if shard}


def accuracy(results: dict) -> dict:
    correct = sum(r["correct"] for r in results.values() if r)
    total = sum(r["total"] for r in results.values() if r)
    examples = [e for r in results.values() if r for e in r["examples"]]
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
            final[name] = {"error": summary(err)}
        ray.kill(actor)
    return final
