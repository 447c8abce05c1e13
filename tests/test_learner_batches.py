"""Batches on a real Learner actor fed over real ZeroMQ.

C3PO++: a round's batch is the groups sent in it and before, whatever order they arrive in, the
learner computes them while the round is still running, and a checkpoint keeps what it has
received of the next round. The group filter: leaving out groups without signal saves their
compute and changes neither the loss nor the gradient."""
import asyncio
import uuid

import numpy as np
import pytest
import ray

from actors.learner import Learner, RoundBatch
from comm.channel import TrajectorySender
from comm.wire import Trajectory
from conf.load import load_config

pytestmark = pytest.mark.timeout(240)

GROUP_SIZE = 4


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=f"test-rounds-{uuid.uuid4().hex}")
    yield
    ray.shutdown()


@ray.remote
class RoundGate:
    """Stands where a generator's `wait_rounds_closed` call stands: returns once the round closes."""

    def __init__(self):
        self.closed = asyncio.Event()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()


def group(prompt_uid: str, sent_in_round: int, vocab: int, rng: np.random.Generator,
          rewards: tuple[float, ...] = (1.0, 0.0) * (GROUP_SIZE // 2)) -> list[Trajectory]:
    """A group of short completions, informative unless its `rewards` are all equal."""
    prompt = rng.integers(3, vocab, 4, dtype=np.int32)
    return [Trajectory(uid=f"{prompt_uid}/{i}", prompt_uid=prompt_uid, group=i, round=sent_in_round,
                       prompt_tokens=prompt, completion_tokens=rng.integers(3, vocab, length, dtype=np.int32),
                       behavior_logprobs=np.full(length, -2.5, dtype=np.float32),
                       policy_version=np.zeros(length, dtype=np.int32), finish_reason="stop", reward=reward)
            for i, (reward, length) in enumerate(zip(rewards, rng.integers(3, 9, GROUP_SIZE)))]


def test_a_round_is_trained_on_while_it_runs_and_is_the_groups_sent_in_it(local_ray, tmp_path):
    cfg = load_config(["comm.host=loopback", "algo.mode=async", "algo.round_token_budget=600",
                       "run.on_actor_failure=stop", f"algo.group_size={GROUP_SIZE}", "learner.stream_groups=2"])
    learner = Learner.options(num_cpus=0).remote(cfg, 0)
    sender = TrajectorySender([ray.get(learner.setup.remote("127.0.0.1", 0))], cfg.comm.hwm, send_timeout_s=30)
    rng = np.random.default_rng(0)
    # a group of round 1 overtakes round 0's (another generator closed round 0 sooner, a faster judge)
    for prompt_uid, sent_in in [("next", 1), ("a", 0), ("b", 0), ("c", 0), ("d", 0)]:
        sender.send_group(group(prompt_uid, sent_in, cfg.model.vocab_size, rng))
    gate = RoundGate.remote()
    round_closes = [gate.wait_closed.remote()]

    running = ray.get(learner.collect.remote(3.0, RoundBatch(0), round_closes))
    assert not running["round_closed"] and not running["ready"]
    assert sorted(running["buffered"]) == ["a", "b", "c", "d", "next"]
    # both micro-batches of round 0 were computed before it closed
    assert ray.get(learner.stats.remote())["phases"]["training"] > 0

    ray.get(gate.close.remote())
    assert ray.get(learner.collect.remote(3.0, RoundBatch(0), round_closes))["round_closed"]
    round_0 = RoundBatch(0, groups=4)  # what the generators had sent when round 0 closed
    assert ray.get(learner.collect.remote(3.0, round_0))["ready"]
    step = ray.get(learner.train_step.remote(round_0))
    assert step["fates"] == dict.fromkeys("abcd", "trained") and step["consumed"] == 4 * GROUP_SIZE
    assert step["micro_batches"] == 2 and step["version"] == 1

    ray.get(learner.save.remote(str(tmp_path)))
    sender.close()
    ray.kill(learner)

    resumed = Learner.options(num_cpus=0).remote(cfg, 0)
    ray.get(resumed.setup.remote("127.0.0.1", 0))
    assert ray.get(resumed.load.remote(str(tmp_path))) == 1
    round_1 = RoundBatch(1, groups=5)
    assert ray.get(resumed.collect.remote(3.0, round_1))["ready"]
    step = ray.get(resumed.train_step.remote(round_1))
    assert step["fates"] == {"next": "trained"} and step["consumed"] == GROUP_SIZE and step["version"] == 2
    ray.kill(resumed)


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_leaving_out_groups_without_signal_changes_no_gradient(local_ray, aggregation):
    """Two learners from the same seed take one step on the same batch, one with the filter and one
    without: the same loss and gradient norm, and only the filtering one leaves a group out."""
    rng = np.random.default_rng(1)
    vocab = load_config([]).model.vocab_size
    batch = [group("mixed", 0, vocab, rng), group("all-right", 0, vocab, rng, rewards=(1.0,) * GROUP_SIZE),
             group("also-mixed", 0, vocab, rng, rewards=(0.0, 0.0, 1.0, 0.0)),
             group("all-wrong", 0, vocab, rng, rewards=(0.0,) * GROUP_SIZE)]
    steps = {}
    for filtered in (True, False):
        cfg = load_config(["comm.host=loopback", "algo.mode=async", f"algo.group_size={GROUP_SIZE}",
                           "algo.prompts_per_step=4", "learner.stream_groups=0", f"algo.aggregation={aggregation}",
                           f"algo.filter_uninformative={filtered}"])
        learner = Learner.options(num_cpus=0).remote(cfg, 0)
        sender = TrajectorySender([ray.get(learner.setup.remote("127.0.0.1", 0))], cfg.comm.hwm, send_timeout_s=30)
        for trajectories in batch:
            sender.send_group(trajectories)
        assert ray.get(learner.collect.remote(10.0))["ready"]
        steps[filtered] = ray.get(learner.train_step.remote())
        sender.close()
        ray.kill(learner)

    filtered, unfiltered = steps[True], steps[False]
    assert filtered["informative_groups"] == 2 and filtered["fates"]["all-right"] == "uninformative"
    assert set(unfiltered["fates"].values()) == {"trained"}
    assert filtered["trained_tokens"] < unfiltered["trained_tokens"]
    assert filtered["loss"] == pytest.approx(unfiltered["loss"], rel=1e-5, abs=1e-9)
    assert filtered["grad_norm"] == pytest.approx(unfiltered["grad_norm"], rel=1e-5)
    assert filtered["grad_norm"] > 0
