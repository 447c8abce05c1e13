"""Judgments per second of real judge actors, math and code, with judge.num = 1 and 2.

The bench process plays both neighbours of the judges over the real ZeroMQ channel: a
TrajectorySender connected to every judge (ZeroMQ deals whole groups round-robin, as from the
generators) and the TrajectoryReceiver they forward to (as the learner's). Every group holds
G completions of one shipped training prompt: half the reference completion (correct; for code
every test runs), a quarter a wrong but well-formed answer, a quarter with no answer / a syntax
error. Before timing, each judge scores warm-up groups (the math worker's imports, the first
sandbox). Rate = samples judged / wall seconds from the first send to the last scored group;
each configuration is measured `--repeats` times on the same judges and the median is reported.

    python bench/judges.py                      # both tasks, judge.num 1 and 2
    python bench/judges.py --tasks code --groups 8
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.judge import Judge  # noqa: E402
from actors.tasks import build_task  # noqa: E402
from comm.channel import TrajectoryReceiver, TrajectorySender  # noqa: E402
from comm.wire import Trajectory  # noqa: E402
from conf.load import load_config  # noqa: E402

WRONG = {"math": "\\boxed{{{answer}+1}}", "code": "print(0)"}
MALFORMED = {"math": "I am not sure", "code": "def ("}


def completions(task_name: str, task, record: dict, group_size: int) -> list[str]:
    reference = task.reference_completion(record)
    wrong = WRONG[task_name].format(answer=record.get("answer", ""))
    quarter = group_size // 4
    return [reference] * (group_size - 2 * quarter) + [wrong] * quarter + [MALFORMED[task_name]] * quarter


def make_group(task, index: int, texts: list[str], meta: dict) -> list[Trajectory]:
    group = []
    for g, text in enumerate(texts):
        tokens = np.asarray(task.tokenizer.encode(text, eos=True), dtype=np.int32)
        group.append(Trajectory(uid=f"bench-{index}/{g}", prompt_uid=f"bench-{index}", group=g,
                                prompt_tokens=np.asarray([1], dtype=np.int32), completion_tokens=tokens,
                                behavior_logprobs=np.zeros(len(tokens), dtype=np.float32),
                                policy_version=np.zeros(len(tokens), dtype=np.int32), finish_reason="stop",
                                task_meta=meta))
    return group


def workload(task_name: str, task, groups: int, group_size: int) -> list[list[Trajectory]]:
    records = task.train
    return [make_group(task, i, completions(task_name, task, records[i % len(records)], group_size),
                       task.meta(records[i % len(records)])) for i in range(groups)]


def pump(sender: TrajectorySender, receiver: TrajectoryReceiver, batch: list) -> float:
    """Send every group, wait for all of them back scored; the wall seconds it took."""
    start = time.perf_counter()
    for group in batch:
        sender.send_group(group)
    for _ in batch:
        if receiver.recv_group(timeout_s=600) is None:
            raise TimeoutError("the judges returned nothing for 600 s")
    return time.perf_counter() - start


def measure(task_name: str, num_judges: int, groups: int, group_size: int, repeats: int) -> dict:
    cfg = load_config([f"task={task_name}", f"judge.num={num_judges}", "comm.host=loopback"])
    task = build_task(cfg.task)
    learner_side = TrajectoryReceiver(hwm=cfg.comm.hwm)
    judges = [Judge.options(name=f"judge-{i}", num_cpus=cfg.judge.num_cpus).remote(cfg, i) for i in range(num_judges)]
    endpoints = ray.get([j.start.remote([learner_side.endpoint]) for j in judges])
    generator_side = TrajectorySender(endpoints, cfg.comm.hwm, cfg.comm.send_timeout_s)
    pump(generator_side, learner_side, workload(task_name, task, 2 * num_judges, group_size))  # warm-up
    batch = workload(task_name, task, groups, group_size)
    seconds = statistics.median(pump(generator_side, learner_side, batch) for _ in range(repeats))
    stats = ray.get([j.stop.remote() for j in judges])
    for judge in judges:
        ray.kill(judge)
    generator_side.close()
    learner_side.close()
    samples = groups * group_size
    return {"task": task_name, "judges": num_judges, "samples": samples, "seconds": seconds,
            "per_s": samples / seconds, "per_judge": [round(s["judged_samples"]) for s in stats]}


def report(rows: list[dict]) -> str:
    lines = ["| task | judge.num | samples | wall s | judgments/s | vs judge.num=1 |", "|---|---|---|---|---|---|"]
    base = {r["task"]: r["per_s"] for r in rows if r["judges"] == 1}
    for r in rows:
        ratio = r["per_s"] / base[r["task"]] if r["task"] in base else math.nan
        lines.append(f"| {r['task']} | {r['judges']} | {r['samples']} | {r['seconds']:.1f} | {r['per_s']:.1f} "
                     f"| {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["math", "code"])
    parser.add_argument("--judges", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--groups", type=int, default=0, help="groups per measurement (0: 384 math, 16 code)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    for task_name in args.tasks:
        groups = args.groups or {"math": 384, "code": 16}[task_name]
        for num in args.judges:
            rows.append(measure(task_name, num, groups, args.group_size, args.repeats))
            print(f"{task_name} judge.num={num}: {rows[-1]['per_s']:.1f} judgments/s "
                  f"(samples per judge, warm-up included: {rows[-1]['per_judge']})", flush=True)
    ray.shutdown()
    print(report(rows))


if __name__ == "__main__":
    main()
