"""Weight sync: WeightPublisher/WeightSubscriber against one raw flat broadcast, gloo on 127.0.0.1.

For each model size (float32 named tensors with transformer-like shapes, hidden 1024: qkv
[3072, 1024], o [1024, 1024], gate/up [4096, 1024], down [1024, 4096], norm vectors [1024])
and each number N of generator (subscriber) ranks, one publisher + N subscribers are started
as spawned processes and join one weight group (comm.weights.init_weight_group, gloo). On that
same group, alternately, after one untimed warm-up of each:

  (a) ours: WeightPublisher.publish(version, fetch_from(model)) on rank 0 (bucketed, --bucket-mb,
      includes its rendezvous, header and packing the buckets that hold several tensors) while every
      subscriber calls WeightSubscriber.receive();
  (b) raw: one broadcast of a single flat float32 buffer of the same total bytes (no packing,
      no header, no rendezvous).

Each timed operation sits between two barriers (an all-reduce on the group): the time is from
rank 0 leaving the first barrier to rank 0 leaving the second, i.e. until every rank has the
data. Reported: median over --repeats; bandwidth = model bytes / time (payload bytes once, not
multiplied by N); ours/raw = bandwidth ratio. And two generator figures (medians over
subscribers and repeats):

  (c) receive: the time a subscriber spends inside receive(). A generator receives on its actor
      thread while its decode thread keeps decoding (in-flight update, actors/generator.py);
  (d) decode pause: copying the received tensors into the model's tensors, as
      GenerationEngine.load_weights does between two decode steps; decoding stops only for this.

Every rank runs torch with one intra-op thread, as the actors do by default (learner and
generator torch_threads). All ranks share this machine's CPUs (with 2 cores, N >= 2 means more
processes than cores).

    python bench/weight_sync.py                                # 10M, 100M, 250M params; N = 1, 2
    python bench/weight_sync.py --params-m 100 500 --subscribers 1 2 4 --bucket-mb 64
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from loguru import logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comm.weights import (WeightPublisher, WeightSubscriber, _broadcast, _rendezvous, fetch_from,  # noqa: E402
                          free_port, init_weight_group)
from conf.schema import CommConfig  # noqa: E402

HIDDEN = 1024
LAYER = [("attn.qkv.weight", (3 * HIDDEN, HIDDEN)), ("attn.o.weight", (HIDDEN, HIDDEN)),
         ("mlp.gate.weight", (4 * HIDDEN, HIDDEN)), ("mlp.up.weight", (4 * HIDDEN, HIDDEN)),
         ("mlp.down.weight", (HIDDEN, 4 * HIDDEN)), ("attn_norm.weight", (HIDDEN,)),
         ("mlp_norm.weight", (HIDDEN,))]
TIMEOUT_S = 300.0


def model_shapes(target_params: int) -> list[tuple[str, tuple[int, ...]]]:
    """Layer tensors in order until the next matrix would pass `target_params` (vectors always fit)."""
    shapes, total, layer = [], 0, 0
    while True:
        for name, shape in LAYER:
            numel = 1
            for dim in shape:
                numel *= dim
            if len(shape) > 1 and total + numel > target_params:
                return shapes + [("final_norm.weight", (HIDDEN,))]
            shapes.append((f"layers.{layer}.{name}", shape))
            total += numel
        layer += 1


def timed(group, operation) -> float:
    _rendezvous(group, TIMEOUT_S, "bench barrier before")
    start = time.perf_counter()
    operation()
    _rendezvous(group, TIMEOUT_S, "bench barrier after")
    return time.perf_counter() - start


def rank_main(rank: int, world_size: int, port: int, target_params: int, bucket_bytes: int, repeats: int,
              results) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    torch.set_num_threads(1)
    group = init_weight_group(rank, world_size, "127.0.0.1", port, TIMEOUT_S, backend="gloo")
    if rank == 0:
        model = [(name, torch.empty(shape).uniform_(-0.02, 0.02)) for name, shape in model_shapes(target_params)]
        endpoint = WeightPublisher(group, model, bucket_bytes, TIMEOUT_S)
        total_numel = sum(tensor.numel() for _, tensor in model)
        flat = torch.empty(total_numel, dtype=torch.float32).uniform_(-0.02, 0.02)
    else:
        endpoint = WeightSubscriber(group, TIMEOUT_S)
        flat = torch.zeros(sum(endpoint.plan.bucket_numels), dtype=torch.float32)
        # the generator's model, loaded into after each receive: views of `flat` (saves memory; all float32)
        views = flat.split([entry.numel for entry in endpoint.plan.entries])
        model = {entry.name: view.view(entry.shape) for entry, view in zip(endpoint.plan.entries, views)}
    receives: list[float] = []
    applies: list[float] = []
    received: dict[str, torch.Tensor] = {}

    def ours(version: int) -> None:
        if rank == 0:
            endpoint.publish(version, fetch_from(model))
            return
        start = time.perf_counter()
        got, tensors = endpoint.receive()
        receives.append(time.perf_counter() - start)
        assert got == version, (got, version)
        received.update(tensors)

    def apply() -> None:
        """On subscribers, after the timed transfer: what GenerationEngine.load_weights does."""
        start = time.perf_counter()
        for name, tensor in received.items():
            model[name].copy_(tensor)
        applies.append(time.perf_counter() - start)

    def raw() -> None:
        _broadcast(group, flat, TIMEOUT_S, "raw flat broadcast")

    ours_s, raw_s = [], []
    for repeat in range(1 + repeats):  # repeat 0 is the warm-up
        ours_s.append(timed(group, lambda: ours(1 + repeat)))
        if rank != 0:
            apply()
        raw_s.append(timed(group, raw))
    ours_s, raw_s, receives[:], applies[:] = ours_s[1:], raw_s[1:], receives[1:], applies[1:]
    if rank == 0:
        results.put({"rank": 0, "ours_s": ours_s, "raw_s": raw_s, "bytes": endpoint.plan.total_bytes,
                     "params": total_numel, "buckets": endpoint.plan.num_buckets, "tensors": len(model)})
    else:
        results.put({"rank": rank, "receives": receives, "applies": applies})


def run_config(target_params: int, subscribers: int, bucket_bytes: int, repeats: int, timeout_s: float) -> dict:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    world_size = subscribers + 1
    processes = [context.Process(target=rank_main, args=(rank, world_size, port, target_params, bucket_bytes,
                                                         repeats, results)) for rank in range(world_size)]
    for process in processes:
        process.start()
    collected = [results.get() for _ in range(world_size)]  # before join: the queue must drain
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
    if [process.exitcode for process in processes] != [0] * world_size:
        raise RuntimeError(f"a rank failed: exit codes {[process.exitcode for process in processes]}")
    summary = next(item for item in collected if item["rank"] == 0)
    for key in ("receives", "applies"):
        summary[key] = [s for item in collected if item["rank"] != 0 for s in item[key]]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, nargs="+", default=[10, 100, 250], help="model sizes, millions")
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1, 2], help="generator ranks N")
    parser.add_argument("--bucket-mb", type=float, default=CommConfig.bucket_mb,
                        help="bucket size in MiB (default: comm.bucket_mb's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bucket_bytes = int(args.bucket_mb * (1 << 20))
    print(f"gloo on 127.0.0.1, {os.cpu_count()} CPUs, bucket {args.bucket_mb:g} MiB, median of {args.repeats} "
          "after 1 warm-up; GB/s = model bytes / time (1e9 B)\n")
    rows = ["| params | MB | N | buckets | ours s | ours GB/s | raw s | raw GB/s | ours/raw | receive s | "
            "decode pause s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    started = time.perf_counter()
    for params_m in args.params_m:
        for subscribers in args.subscribers:
            result = run_config(int(params_m * 1e6), subscribers, bucket_bytes, args.repeats, timeout_s=600)
            ours_s, raw_s = statistics.median(result["ours_s"]), statistics.median(result["raw_s"])
            ours_bw, raw_bw = result["bytes"] / ours_s / 1e9, result["bytes"] / raw_s / 1e9
            row = (f"| {result['params'] / 1e6:.1f}M | {result['bytes'] / 1e6:,.0f} | {subscribers} | "
                   f"{result['buckets']} | {ours_s:.3f} | {ours_bw:.2f} | {raw_s:.3f} | {raw_bw:.2f} | "
                   f"{ours_bw / raw_bw:.0%} | {statistics.median(result['receives']):.3f} | "
                   f"{statistics.median(result['applies']):.3f} |")
            rows.append(row)
            print(row, flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
