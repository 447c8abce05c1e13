"""The driver's supervisor: every wait of the training loop also watches generators and judges.

`Supervisor.call` waits for {actor name: ref} like `system.call` while one `watch` call is
pending on every generator and judge; it fails the moment the actor's process dies. A dead
generator or judge is then dealt with as `run.on_actor_failure` says:

  restart   a new actor of the same name takes its place: a judge binds the dead one's
            endpoint if it is on the same node (the generators' sockets reconnect by
            themselves), else the generators are pointed at its new one; a generator joins
            the re-formed weight group, gets the current weights and starts decoding;
  continue  the same without a replacement: the pool shrinks (not below one of each);
  stop      the run stops with an ActorFailure naming the actor.

Actors that died together (a lost node) are dealt with together. With restart and continue,
the prompts that may have died with the actor are re-issued (see
actors/ledger.py): those the dead generator held, or for a judge those sent on by the
generators that no learner has received. The result of a call the death broke is None: the
dead actor's own calls, and a weight broadcast (the recovery has re-sent the weights).

A dead learner ends the run: `python run.py run.resume=<run dir>` continues it from its last
checkpoint.
"""
import time
from dataclasses import asdict, dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.ledger import Ledger
from actors.system import (ActorFailure, System, async_on_learners, async_sync_weights, call, form_weight_group,
                           new_generator, new_judge, start_generators, start_judge, summary)
from comm.weights import abort_weight_group
from learner.staleness import AdmissionController

DEATH_GRACE_S = 10.0  # after a call fails: how long its actor's death may take to be seen
PROBE_S = 5.0  # on a death: how long another actor may take to answer before it counts as dead too
ABSORB_QUIET_S = 0.5  # before re-issuing: learners take in what is still arriving, until this quiet
NAME_RETRY_S = 0.2
REPLACE_TIMEOUT_S = 60.0  # a replacement placed on a node Ray has not yet marked dead is made again


@dataclass
class Fault:
    """One dead actor, as the summary and bench/faults.py report it."""

    actor: str
    step: int
    seen_at: float          # wall clock when its death was seen
    cause: str = ""         # died (its process is gone) or failed: <its thread's error>
    recovered_s: float = -1.0  # seconds from then until the pool was whole again (-1: not recovered)
    reissued: int = 0       # prompts re-issued
    broke: str = ""         # the calls in flight its death broke
    learner_report: str = ""  # a broken weight broadcast: what learner-0's publish reported


class Supervisor:
    def __init__(self, system: System, ledger: Ledger, admission: AdmissionController, log):
        self.system, self.ledger, self.admission, self.log = system, ledger, admission, log
        self.policy = system.cfg.run.on_actor_failure
        self.step = 0
        self.faults: list[Fault] = []
        self.last_publish: dict | None = None
        self.watches = {name: actor.watch.remote() for name, actor in self._watched().items()}

    def _watched(self) -> dict:
        return {**self.system.generators, **self.system.judges}

    def call(self, named_refs: dict, is_broadcast: bool = False) -> dict:
        """Results by actor name; a generator or judge dying meanwhile is dealt with first.

        For a weight broadcast (`is_broadcast`), the other refs are given up (None) once a dead
        generator was dealt with: a broadcast with a dead member can only fail.
        """
        pending, results, recovered = dict(named_refs), {}, False
        broken = self._generator_faults()
        while pending and not (is_broadcast and self._generator_faults() > broken):
            watching = {ref: name for name, ref in self.watches.items()}
            ready, _ = ray.wait(list(pending.values()) + list(watching), num_returns=1)
            if ready[0] in watching:
                self._on_death(watching[ready[0]], broke=", ".join(pending))
                recovered = True
                continue
            name = next(n for n, ref in pending.items() if ref == ready[0])
            ref = pending.pop(name)
            try:
                results[name] = ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                results[name] = self._failed_call(name, err, recovered)
                recovered = True
        return {**results, **dict.fromkeys(pending)}

    def sync_weights(self, resend: bool = False) -> dict:
        """Publish the weights to every generator; after a death during it, the re-sent ones' result.

        The broken broadcast's own outcome on learner-0 (by then over: the recovery's calls to
        learner-0 waited behind it) is kept in the fault as `learner_report`.
        """
        before = len(self.faults)
        refs = async_sync_weights(self.system, resend)
        results = self.call(refs, is_broadcast=True)
        broke = [fault for fault in self.faults[before:] if fault.actor.startswith("generator")]
        for fault in broke:
            fault.learner_report = _cause(refs["learner-0"]).removeprefix("failed: ")
        return self.last_publish if broke else results

    def _generator_faults(self) -> int:
        return sum(fault.actor.startswith("generator") for fault in self.faults)

    def _failed_call(self, name: str, err: Exception, recovered: bool):
        """A call that failed: fine (None) if a generator or judge died under it, else fatal."""
        if name.startswith("learner") and isinstance(err, RayActorError):
            raise ActorFailure(name, summary(err)) from err
        died = self._next_death(0.0 if recovered else DEATH_GRACE_S)
        if died is None and not recovered:
            raise ActorFailure(name, summary(err)) from err
        if died is not None:
            self._on_death(died, broke=f"{name}: {summary(err)}")
        return None

    def _next_death(self, grace_s: float) -> str | None:
        """The first watched actor seen dead within `grace_s`, or None."""
        watching = {ref: name for name, ref in self.watches.items()}
        ready, _ = ray.wait(list(watching), num_returns=1, timeout=grace_s)
        return watching[ready[0]] if ready else None

    def _on_death(self, name: str, broke: str) -> None:
        """`name`'s watch call ended: its process died, or its work thread failed (it is killed).

        Actors that died with it (a lost node takes all of its actors) are dealt with together:
        the recovery must not call a dead one. Judges are replaced before generators, so that a
        new generator starts towards the judges that are there.
        """
        start = time.monotonic()
        dead = sorted([name, *self._also_dead(name)], key=lambda n: (n.startswith("generator"), n))
        faults = [self._record_death(n, broke) for n in dead]
        pools = {n: self.system.generators if n.startswith("generator") else self.system.judges for n in dead}
        for n in dead:
            ray.kill(pools[n][n], no_restart=True)
        generators = [n for n in dead if n.startswith("generator")]
        if generators:
            self._abort_weight_group(f"{', '.join(generators)} {faults[-1].cause} at step {self.step}")
        suspects = self._lost_with(dead)
        emptied = any(set(pools[n]) <= set(dead) for n in dead)  # a role with nobody left
        if self.policy == "stop" or (self.policy == "continue" and emptied):
            self.settle({uid: "actor_lost" for uid in suspects})
            raise ActorFailure(name, f"{faults[0].cause} at step {self.step} (run.on_actor_failure={self.policy})")
        if self.policy == "restart":
            self._replace(dead)
        else:
            for n in dead:
                del pools[n][n]
            if generators:
                self._refresh_weight_group()
        reissued = self._reissue(suspects)
        for fault in faults:
            fault.reissued, fault.recovered_s = reissued, time.monotonic() - start
        self.log.warning("{} {} after {:.1f}s; {} prompts re-issued", ", ".join(dead),
                         "replaced" if self.policy == "restart" else "left the pool", time.monotonic() - start,
                         reissued)

    def _record_death(self, name: str, broke: str) -> Fault:
        fault = Fault(name, self.step, time.time(), broke=broke)
        self.faults.append(fault)
        fault.cause = _cause(self.watches.pop(name))
        self.log.error("{} {} at step {} (in flight: {})", name, fault.cause, self.step, broke or "nothing")
        return fault

    def _also_dead(self, name: str) -> list[str]:
        """The other watched actors that are dead or cannot be reached within PROBE_S."""
        others = {n: actor for n, actor in self._watched().items() if n != name and n in self.watches}
        probes = {actor.__ray_ready__.remote(): n for n, actor in others.items()}
        ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=PROBE_S)
        return [n for ref, n in probes.items() if ref not in ready or not _answered(ref)]

    def _abort_weight_group(self, reason: str) -> None:
        """Ranks waiting in the weight group for the dead generator give up now, not at their timeout."""
        try:
            abort_weight_group(*self.system.weight_store, reason=reason)
        except RuntimeError as err:  # its store is gone with learner-0: nobody is left waiting on it
            self.log.warning("could not abort the weight group: {}", summary(err))

    def _lost_with(self, dead: list[str]) -> set[str]:
        """Prompt copies that may have died with `dead`: every pending copy a dead generator owned,
        and if a judge died, every pending copy no live generator holds (it may have had any)."""
        lost = {uid for name in dead if name.startswith("generator") for uid in self.ledger.pending(name)}
        if any(name.startswith("judge") for name in dead):
            live = {name: g for name, g in self.system.generators.items() if name not in dead}
            held = call({name: g.holding.remote() for name, g in live.items()})
            lost |= set(self.ledger.pending()) - {uid for uids in held.values() for uid in uids}
        return lost

    def _replace(self, dead: list[str]) -> None:
        """New actors under the dead ones' names: judges first, then the generators, which join a
        re-formed weight group, get the current weights and start decoding."""
        for name in dead:
            actor = self._new_actor(name)
            if name.startswith("judge"):
                self.system.judges[name] = actor
                dead_endpoint = self.system.judge_endpoints[name]
                start_judge(self.system, name, actor, reuse=dead_endpoint)
                if self.system.judge_endpoints[name] != dead_endpoint:  # placed on another node
                    live = {n: g for n, g in self.system.generators.items() if n not in dead}
                    call({n: g.connect_judges.remote(list(self.system.judge_endpoints.values()))
                          for n, g in live.items()})
            else:
                self.system.generators[name] = actor
            self.watches[name] = actor.watch.remote()
        generators = [name for name in dead if name.startswith("generator")]
        if generators:
            self._refresh_weight_group()
            start_generators(self.system, generators)

    def _new_actor(self, name: str):
        """A live new actor under the dead one's name. Ray frees the name once the death is recorded;
        until Ray has marked a lost node dead it may still place the actor there, where it dies at
        once: then it is made again."""
        make = new_generator if name.startswith("generator") else new_judge
        deadline = time.monotonic() + REPLACE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                actor = make(self.system, name)
            except ValueError:  # the name is still taken
                time.sleep(NAME_RETRY_S)
                continue
            if _answered(actor.__ray_ready__.remote(), timeout_s=REPLACE_TIMEOUT_S):
                return actor
            self.log.warning("{}'s replacement died at start; trying again", name)
            ray.kill(actor, no_restart=True)
        raise ActorFailure(name, f"could not be replaced in {REPLACE_TIMEOUT_S:g}s")

    def _refresh_weight_group(self) -> None:
        """A weight group with a dead member is unusable: form a new one and send the weights again."""
        form_weight_group(self.system)
        self.last_publish = call(async_sync_weights(self.system, resend=True))

    def _reissue(self, suspects: set[str]) -> int:
        """Re-issue the suspects no learner has received (they absorb what is still arriving)."""
        absorbed = call(async_on_learners(self.system, "absorb", ABSORB_QUIET_S))
        self.settle_reported(absorbed)
        at_learners = {uid for result in absorbed.values() for uid in result["buffered"]}
        lost = sorted(suspects.intersection(self.ledger.pending()) - at_learners)
        retries, settled = self.ledger.reissue(lost)
        self.admission.consume(settled * self.ledger.group_size)
        self.submit(retries)
        return len(retries)

    def submit(self, prompts: list[dict]) -> None:
        """Admit `prompts` (already counted by admission control) and deal them out to the generators."""
        names = list(self.system.generators)
        shares = {name: prompts[i :: len(names)] for i, name in enumerate(names)}
        for name, share in shares.items():
            self.ledger.admit(share, name)
        self.admission.admit(len(prompts) * self.ledger.group_size)
        self.call({name: self.system.generators[name].submit.remote(share) for name, share in shares.items()})

    def settle(self, fates: dict[str, str]) -> None:
        """Record fates in the ledger; a copy's first fate frees its place in admission control."""
        self.admission.consume(self.ledger.settle(fates) * self.ledger.group_size)

    def settle_reported(self, results: dict) -> None:
        """Settle the fates that actors' results carry under "fates" (taken out of each result)."""
        self.settle({uid: fate for result in results.values() if result
                     for uid, fate in result.pop("fates", {}).items()})

    def report(self) -> list[dict]:
        return [asdict(fault) for fault in self.faults]


def _answered(ref, timeout_s: float = 0.0) -> bool:
    """Whether a call returned (rather than raising: its actor is gone) within `timeout_s`."""
    try:
        ray.get(ref, timeout=timeout_s)
        return True
    except (RayActorError, RayTaskError, GetTimeoutError):
        return False


def _cause(ref) -> str:
    """How the call behind a finished `ref` ended: completed, died (the actor is gone) or failed: why."""
    try:
        ray.get(ref)
        return "completed"
    except RayActorError:
        return "died"
    except RayTaskError as err:
        return f"failed: {summary(err)}"

