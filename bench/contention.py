"""How much the generation engine and the learner slow each other when they run at once on this
machine's cores, with nothing of ringrl around them (no Ray, no ZeroMQ, no driver).

Two processes, one torch thread each, as the generator and the learner have by default: one runs
engine decode steps over `--slots` long-tail sequences, the other `Trainer.rl_step` on a long-tail
batch of `--batch` samples (the model and lengths of bench/async_vs_sync.py). Each is timed alone,
then both together, their timed windows begun at one barrier; `--repeats` times, alternating. It
prints each role's steps per second alone and together and the ratio (together / alone): the speed
each role keeps beside the other. bench/async_vs_sync.py measures the same ratios inside the
pipeline (each role's tokens per busy second, async against sync); if they match these, the
slowdown is the cores' (shared caches and memory bandwidth), not the pipeline's overheads.

    python bench/contention.py [--seconds 10] [--repeats 3] [--slots 256] [--batch 256]
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.tasks import build_task  # noqa: E402
from bench.async_vs_sync import TASK  # noqa: E402
from bench.mfu import decode_item, learner_item, longtail_samples  # noqa: E402
from conf.load import load_config  # noqa: E402
from model.moe import MoECausalLM  # noqa: E402

ROLES = ("decode", "train")
DECODE_CONTEXT = 40  # keys per sequence around which the timed decode steps run (long-tail mean: ~36)


def work(role: str, args, start, results) -> None:
    """Build the role's work, wait at the `start` barrier, then count its steps for `args.seconds` and
    put (role, steps per second) on the `results` queue."""
    torch.set_num_threads(1)
    cfg = load_config(TASK)
    task = build_task(cfg.task)
    torch.manual_seed(0)
    model = MoECausalLM(cfg.model)
    samples = longtail_samples(task, max(args.slots, args.batch), cfg.model.max_seq_len)
    if role == "decode":
        item = decode_item(model.eval(), task.tokenizer, [p for p, _ in samples[: args.slots]], DECODE_CONTEXT,
                           steps=8)
    else:
        item = learner_item(model, cfg, samples[: args.batch], repeats=1)
    item.run()  # untimed: allocations, first-call costs
    start.wait()
    began, steps = time.perf_counter(), 0
    while time.perf_counter() - began < args.seconds:
        item.run()
        steps += 1
    results.put((role, steps / (time.perf_counter() - began)))


def speeds(roles: tuple[str, ...], args) -> dict[str, float]:
    """Steps per second of each of `roles`, run at once in processes of their own."""
    start, results = mp.Barrier(len(roles)), mp.Queue()
    processes = [mp.Process(target=work, args=(role, args, start, results)) for role in roles]
    for process in processes:
        process.start()
    measured = dict(results.get() for _ in roles)
    for process in processes:
        process.join()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed window of each measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", type=int, default=256, help="sequences each decode step runs")
    parser.add_argument("--batch", type=int, default=256, help="samples per learner step")
    args = parser.parse_args()
    ratios: dict[str, list[float]] = {role: [] for role in ROLES}
    for repeat in range(args.repeats):
        alone = {role: speeds((role,), args)[role] for role in ROLES}
        together = speeds(ROLES, args)
        for role in ROLES:
            ratios[role].append(together[role] / alone[role])
        print(f"repeat {repeat}: " + "; ".join(
            f"{role} {alone[role]:.2f} steps/s alone, {together[role]:.2f} together ({ratios[role][-1]:.3f})"
            for role in ROLES), flush=True)
    for role in ROLES:
        print(f"{role}: speed kept beside the other {statistics.mean(ratios[role]):.3f} "
              f"({min(ratios[role]):.3f}..{max(ratios[role]):.3f}) over {args.repeats} repeats")


if __name__ == "__main__":
    main()
