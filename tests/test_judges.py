"""Judge actors on real Ray, fed over the real ZeroMQ channel: hostile programs are contained,
the judge stays up (same process, no restart) and goes on scoring; a hung math comparison
times out within twice judge.timeout_s."""
import json
import os
import socket
import time
import uuid

import numpy as np
import pytest
import ray

from actors.judge import Judge
from actors.tasks import build_task
from comm.channel import TrajectoryReceiver, TrajectorySender
from comm.wire import Trajectory
from conf.load import load_config

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0, reason="the code sandbox runs each program as its own uid: "
                                                           "needs root")]

SECRET = f"judge-secret-{uuid.uuid4().hex}"
ESCAPED = "escaped\n"  # what a hostile program prints only if it got out; the test expects it, so 1 = a breach


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace=f"test-judges-{uuid.uuid4().hex}")
    yield
    ray.shutdown()


class JudgeUnderTest:
    """One Judge actor between a generator-side sender and a learner-side receiver, both real ZeroMQ."""

    def __init__(self, overrides: list[str]):
        self.cfg = load_config(["comm.host=loopback", *overrides])  # no driver here to settle `auto`
        self.task = build_task(self.cfg.task)
        self.learner_side = TrajectoryReceiver(hwm=self.cfg.comm.hwm)
        self.actor = Judge.options(runtime_env={"env_vars": {"RINGRL_JUDGE_SECRET": SECRET}}).remote(self.cfg, 0)
        endpoint = ray.get(self.actor.start.remote([self.learner_side.endpoint]))
        self.generator_side = TrajectorySender([endpoint], self.cfg.comm.hwm, send_timeout_s=30)
        self.pid = self.judge_pid()

    def judge_pid(self) -> int:
        return ray.get(self.actor.__ray_call__.remote(lambda judge: os.getpid()))

    def score(self, completions: list[str], metas: list[dict]) -> list[Trajectory]:
        group = [self._trajectory(i, text, meta) for i, (text, meta) in enumerate(zip(completions, metas))]
        self.generator_side.send_group(group)
        scored = self.learner_side.recv_group(timeout_s=180)
        assert scored is not None, "the judge forwarded nothing"
        return scored

    def _trajectory(self, index: int, text: str, meta: dict) -> Trajectory:
        tokens = np.asarray(self.task.tokenizer.encode(text, eos=True), dtype=np.int32)
        return Trajectory(uid=f"p/{index}", prompt_uid="p", group=index,
                          prompt_tokens=np.asarray([1], dtype=np.int32), completion_tokens=tokens,
                          behavior_logprobs=np.zeros(len(tokens), dtype=np.float32),
                          policy_version=np.zeros(len(tokens), dtype=np.int32), finish_reason="stop", task_meta=meta)

    def close(self) -> dict:
        stats = ray.get(self.actor.stop.remote())
        ray.kill(self.actor)
        self.generator_side.close()
        self.learner_side.close()
        return stats


def hostile_programs(judge_pid: int, port: int, host_file: str) -> dict[str, str]:
    """name -> program; each prints ESCAPED only if what it tried worked."""
    return {
        "infinite_loop": "while True:\n    pass",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))",
        "huge_output": "while True:\n    print('escaped' * 1000)",
        "write_outside": (f"import os\nfor path in ['{host_file}', '/etc/ringrl-x', '/usr/ringrl-x', '/ringrl-x']:\n"
                          f"    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
                          f"print('escaped' if os.path.exists('/etc/ringrl-x') else 'contained')"),
        "socket_connect": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                           "print('escaped')"),
        "read_environment": ("import os, glob\nfound = 'RINGRL_JUDGE_SECRET' in os.environ\n"
                             "for path in glob.glob('/proc/*/environ'):\n    try:\n"
                             "        found |= 'RINGRL_JUDGE_SECRET' in open(path).read()\n"
                             "    except OSError:\n        pass\nprint('escaped' if found else 'contained')"),
        "signal_parent": (f"import os\nescaped = False\nfor pid in ({judge_pid}, -1):\n    try:\n"
                          f"        os.kill(pid, 9)\n        escaped = True\n    except OSError:\n        pass\n"
                          f"print('escaped' if escaped else 'contained')"),
    }


EXPECTED_REASONS = {"infinite_loop": {"time_limit"}, "fork_bomb": {"time_limit", "process_limit"},
                    "memory_bomb": {"memory_limit"}, "huge_output": {"output_limit"},
                    "write_outside": {"wrong_answer"}, "socket_connect": {"runtime_error"},
                    "read_environment": {"wrong_answer"}, "signal_parent": {"wrong_answer"}}


def test_hostile_programs_are_contained_and_the_judge_carries_on(local_ray):
    judge = JudgeUnderTest(["task=code", "task.sandbox.cpu_s=1", "task.sandbox.wall_s=3",
                            "task.sandbox.max_procs=8", "task.sandbox.memory_mb=256", "judge.timeout_s=8"])
    host_file = f"/tmp/ringrl-escape-{uuid.uuid4().hex}"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        programs = hostile_programs(judge.pid, listener.getsockname()[1], host_file)
        meta = {"tests": json.dumps([{"input": "", "output": ESCAPED}])}
        scored = judge.score(list(programs.values()), [meta] * len(programs))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # the socket case never reached the loopback listener

    outcomes = {name: (t.reward, t.judge["reason"]) for name, t in zip(programs, scored)}
    for name, (reward, reason) in outcomes.items():
        assert reward == 0.0 and reason in EXPECTED_REASONS[name], (name, reward, reason, outcomes)
    assert not os.path.exists(host_file) and not os.path.exists("/etc/ringrl-x")

    record = judge.task.train[0]  # the same judge still scores a correct program
    [good] = judge.score([record["solution"]], [judge.task.meta(record)])
    assert (good.reward, good.judge["reason"]) == (1.0, "correct")
    assert judge.judge_pid() == judge.pid  # same process: never restarted
    stats = judge.close()
    assert stats["judged_samples"] == len(programs) + 1 and stats["correct"] == 1
    assert stats["judgments_per_s"] > 0


def test_math_timeout_fires_within_twice_its_setting_through_the_actor(local_ray):
    timeout_s = 1.0
    judge = JudgeUnderTest(["task=math", f"judge.timeout_s={timeout_s}"])
    completions = ["\\boxed{1}", "\\boxed{9^{9^{9}}}", "\\boxed{2}", "no idea", "\\boxed{1.0}"]
    scored = judge.score(completions, [{"answer": "1"}] * len(completions))
    assert [(t.reward, t.judge["reason"]) for t in scored] == [
        (1.0, "correct"), (0.0, "judge_timeout"), (0.0, "wrong_answer"), (0.0, "no_answer"), (1.0, "correct")]
    assert timeout_s <= scored[1].timings["judge_s"] < 2 * timeout_s
    stats = judge.close()
    assert stats["judge_timeout"] == 1 and stats["judged_samples"] == len(completions)



def test_stop_counts_every_unjudged_sample_as_dropped_run_end(local_ray):
    judge = JudgeUnderTest(["task=math", "judge.timeout_s=1.0"])
    hanging = ["\\boxed{9^{9^{9}}}"] * 4  # each sample takes the full timeout
    for _ in range(3):
        judge.generator_side.send_group([judge._trajectory(i, text, {"answer": "1"}) for i, text in enumerate(hanging)])
    deadline = time.monotonic() + 60
    while ray.get(judge.actor.stats.remote())["judged_samples"] < 1:  # busy inside the first group
        assert time.monotonic() < deadline, "the judge never started scoring"
    start = time.monotonic()
    stats = ray.get(judge.actor.stop.remote())
    assert time.monotonic() - start < judge.cfg.judge.timeout_s + 5  # the current sample, then the drain
    assert stats["dropped_run_end"] == 12 and 1 <= stats["judged_samples"] < 4
    assert judge.learner_side.recv_group(timeout_s=0.5) is None  # nothing half-judged went on
    judge.close()
