"""Trajectory transport throughput: our ZeroMQ + msgpack channel vs Ray actor calls vs raw ZeroMQ.

One message = one GRPO group of G = 8 Trajectory objects (prompt 256 tokens; completion
1K / 8K / 32K tokens; arrays prompt_tokens int32, completion_tokens int32, behavior_logprobs
float32, policy_version int32; no routed_experts). For each completion length, side by side:

  ours  TrajectorySender.send_group -> TrajectoryReceiver.recv_group over tcp://127.0.0.1, the
        receiver in a separate (spawned) process that decodes every group and counts its
        trajectories. Includes encode_group (validation + msgpack header) and decode_group.
  ray   Ray actor method calls on a local Ray instance (ray.init(address="local",
        num_cpus=2)): `actor.count.remote(group)` with the same list of Trajectory objects,
        the actor returns len(group); up to 8 calls in flight (ray.wait pipelining).
  raw   ZeroMQ PUSH/PULL of the same bytes with no encoding: the frames of encode_group(group)
        are materialised once as bytes and re-sent as is (same frame count and sizes,
        send_multipart(copy=False), same HWM); the receiver in a separate spawned process
        counts messages (recv_multipart(copy=False)) and does nothing else.

Timing: a warm-up pass sizes N messages so that one pass lasts about `--seconds`; a pass is
timed from the first send until the receiver (or Ray) has acknowledged all N messages.
Each figure is the median of `--repeats` passes. Bytes/s counts the frame bytes of one encoded
group (header + arrays) per message for all three paths, so bytes/s ratios equal message rate
ratios. GB = 1e9 bytes.

    python bench/transport.py                    # 1K, 8K, 32K tokens, 3 repeats of ~1.5 s
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np
from loguru import logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comm.channel import TrajectoryReceiver, TrajectorySender  # noqa: E402
from comm.wire import Trajectory, encode_group  # noqa: E402

PROMPT_TOKENS = 256
GROUP_SIZE = 8
HWM = 64
RAY_IN_FLIGHT = 8


def make_group(completion_tokens: int, group_size: int = GROUP_SIZE) -> list[Trajectory]:
    rng = np.random.default_rng(completion_tokens)
    prompt = rng.integers(0, 150_000, PROMPT_TOKENS, dtype=np.int32)
    return [
        Trajectory(
            uid=f"p0-{i}", prompt_uid="p0", group=i,
            prompt_tokens=prompt,
            completion_tokens=rng.integers(0, 150_000, completion_tokens, dtype=np.int32),
            behavior_logprobs=-rng.random(completion_tokens, dtype=np.float32),
            policy_version=np.full(completion_tokens, 3, dtype=np.int32),
            finish_reason="length", task_meta={"answer": "85"}, timings={"generate": 1.5},
        )
        for i in range(group_size)
    ]


def quiet_logs() -> None:
    logger.remove()
    logger.add(sys.stderr, level="INFO")


def receiver_main(mode: str, conn) -> None:
    """Child process: bind, report the endpoint, then serve ("expect", n) commands until None."""
    import zmq

    quiet_logs()

    if mode == "ours":
        receiver = TrajectoryReceiver("127.0.0.1", hwm=HWM)
        endpoint = receiver.endpoint

        def receive() -> int:
            group = receiver.recv_group(timeout_s=60.0)
            if group is None:
                raise RuntimeError("ours: no group within 60 s")
            return len(group)
    else:
        socket = zmq.Context.instance().socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, HWM)
        socket.setsockopt(zmq.LINGER, 0)
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"

        def receive() -> int:
            frames = socket.recv_multipart(copy=False)
            return len(frames)
    conn.send(endpoint)
    while (command := conn.recv()) is not None:
        _, messages = command
        units = sum(receive() for _ in range(messages))
        conn.send(units)  # ours: trajectories decoded; raw: frames received


class ZmqPath:
    def __init__(self, mode: str, ctx):
        self.mode = mode
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=receiver_main, args=(mode, child), daemon=True)
        self.process.start()
        endpoint = self.conn.recv()
        if mode == "ours":
            self.sender = TrajectorySender([endpoint], hwm=HWM)
        else:
            import zmq
            self.socket = zmq.Context.instance().socket(zmq.PUSH)
            self.socket.setsockopt(zmq.SNDHWM, HWM)
            self.socket.setsockopt(zmq.LINGER, 2_000)
            self.socket.connect(endpoint)

    def run(self, group, raw_frames, messages: int) -> float:
        """Seconds to deliver `messages` messages; checks the receiver's count."""
        self.conn.send(("expect", messages))
        start = time.perf_counter()
        if self.mode == "ours":
            for _ in range(messages):
                self.sender.send_group(group)
        else:
            for _ in range(messages):
                self.socket.send_multipart(raw_frames, copy=False)
        units = self.conn.recv()
        elapsed = time.perf_counter() - start
        expected = messages * (len(group) if self.mode == "ours" else len(raw_frames))
        assert units == expected, f"{self.mode}: receiver counted {units}, expected {expected}"
        return elapsed

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(10)
        if self.mode == "ours":
            self.sender.close()
        else:
            self.socket.close()


class RayPath:
    def __init__(self):
        import ray

        @ray.remote(num_cpus=1)
        class Counter:
            def count(self, trajectories: list) -> int:
                return len(trajectories)

        self.ray = ray
        self.actor = Counter.remote()
        ray.get(self.actor.count.remote([]))

    def run(self, group, raw_frames, messages: int) -> float:
        ray = self.ray
        start = time.perf_counter()
        pending, total = [], 0
        for _ in range(messages):
            if len(pending) >= RAY_IN_FLIGHT:
                done, pending = ray.wait(pending, num_returns=1)
                total += sum(ray.get(done))
            pending.append(self.actor.count.remote(group))
        total += sum(ray.get(pending))
        elapsed = time.perf_counter() - start
        assert total == messages * len(group), f"ray: actor counted {total}"
        return elapsed


def measure(path, group, raw_frames, seconds: float, repeats: int) -> float:
    """Median messages per second over `repeats` passes of about `seconds` each."""
    warm = 16
    warm_elapsed = path.run(group, raw_frames, warm)
    messages = max(warm, int(seconds * warm / warm_elapsed))
    rates = [messages / path.run(group, raw_frames, messages) for _ in range(repeats)]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--seconds", type=float, default=1.5, help="target duration of one pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_logs()

    ctx = mp.get_context("spawn")
    groups = {tokens: make_group(tokens) for tokens in args.tokens}
    raw = {tokens: [bytes(frame) for frame in encode_group(group)] for tokens, group in groups.items()}
    message_bytes = {tokens: sum(len(frame) for frame in frames) for tokens, frames in raw.items()}
    rates: dict[tuple[str, int], float] = {}

    # ZeroMQ paths first (Ray not yet running, so its background processes do not compete),
    # ours and raw interleaved per completion length.
    paths = {mode: ZmqPath(mode, ctx) for mode in ("ours", "raw")}
    for tokens in args.tokens:
        for mode, path in paths.items():
            rates[mode, tokens] = measure(path, groups[tokens], raw[tokens], args.seconds, args.repeats)
            print(f"{mode:4} {tokens:6} tokens: {rates[mode, tokens]:9.1f} groups/s", flush=True)
    for path in paths.values():
        path.close()

    import ray
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        ray_path = RayPath()
        for tokens in args.tokens:
            rates["ray", tokens] = measure(ray_path, groups[tokens], raw[tokens], args.seconds, args.repeats)
            print(f"ray  {tokens:6} tokens: {rates['ray', tokens]:9.1f} groups/s", flush=True)
    finally:
        ray.shutdown()

    print(f"\nG = {GROUP_SIZE} trajectories per message, prompt {PROMPT_TOKENS} tokens, "
          f"median of {args.repeats} passes of ~{args.seconds} s\n")
    print("| completion tokens | MB/message | path | trajectories/s | GB/s | ours/Ray | ours/raw |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        size = message_bytes[tokens]
        for mode in ("ours", "ray", "raw"):
            rate = rates[mode, tokens]
            ratios = "| | |"
            if mode == "ours":
                ratios = f"| {rate / rates['ray', tokens]:.1f}x | {rate / rates['raw', tokens]:.0%} |"
            print(f"| {tokens:,} | {size / 1e6:.3f} | {mode} | {rate * GROUP_SIZE:,.0f} | "
                  f"{rate * size / 1e9:.2f} {ratios}")
    if 8192 in args.tokens:
        vs_ray = rates["ours", 8192] / rates["ray", 8192]
        vs_raw = rates["ours", 8192] / rates["raw", 8192]
        print(f"\nTargets at 8K tokens: ours >= 10x Ray: {vs_ray:.1f}x -> {'met' if vs_ray >= 10 else 'NOT met'}; "
              f"ours >= 70% of raw ZeroMQ: {vs_raw:.0%} -> {'met' if vs_raw >= 0.7 else 'NOT met'}")


if __name__ == "__main__":
    main()
