"""Weight broadcast over a real gloo group: 1 publisher + 2 subscribers in spawned processes.

The `gpu` tests run the same broadcast over torch's NCCL and cupy's NCCL, one rank per GPU, and,
with every rank's model on one GPU, over CUDA IPC and through pinned host memory (gloo).
"""
import functools
import importlib.util
import re
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from comm.weights import (WAIT_SLICE_S, BucketPlan, CollectiveAborted, CollectiveTimeout, WeightPublisher,
                          WeightSubscriber, _broadcast, _rendezvous, abort_weight_group, fetch_from, free_port,
                          init_weight_group, plan_buckets)

BUCKET_BYTES = 4096
WORLD_SIZE = 3
GROUP_TIMEOUT_S = 30.0
SHORT_TIMEOUT_S = 3.0


def model_tensors(version: int) -> list[tuple[str, torch.Tensor]]:
    """Named tensors whose values depend on `version`, in several dtypes, shapes and layouts.

    Buckets (BUCKET_BYTES): 1, 6 and 8 are packed into the publisher's two staging buffers (8
    reuses 6's); 9, a transposed tensor alone, goes as a contiguous copy; the others as they are.
    """
    generator = torch.Generator().manual_seed(version)
    return [
        ("embed.weight", torch.randn(64, 32, generator=generator)),  # 8 KiB: bigger than a bucket
        ("layers.0.norm.weight", torch.randn(32, generator=generator)),
        ("layers.0.attn.qkv.weight", torch.randn(16, 32, generator=generator)),
        ("layers.0.experts.w1", torch.randn(4, 8, 8, generator=generator).to(torch.bfloat16)),
        ("layers.0.router.bias", torch.randn(4, generator=generator)),
        ("step", torch.tensor(version, dtype=torch.int64)),
        ("lm_head.weight", torch.randn(32, 40, generator=generator)),  # 5 KiB: bigger than a bucket
        ("layers.1.attn.qkv.weight", torch.randn(32, 16, generator=generator).t()),  # not contiguous
        ("layers.1.norm.weight", torch.randn(32, generator=generator)),
        ("layers.1.mlp.w1", torch.randn(24, 32, generator=generator)),
        ("layers.1.mlp.w2", torch.randn(32, 24, generator=generator).t()),  # not contiguous
        ("layers.1.mlp_norm.weight", torch.randn(32, generator=generator)),
        ("layers.1.router.weight", torch.randn(128, 8, generator=generator).t()),  # not contiguous, alone
    ]


def join(rank: int, world_size: int, port: int, timeout_s: float, backend: str, model_device: str):
    """Join as `rank`; NCCL ranks take GPU `rank`, the other paths leave the model on `model_device`."""
    if backend in ("nccl", "cupy-nccl"):
        torch.cuda.set_device(rank)
        model_device = f"cuda:{rank}"
    return init_weight_group(rank, world_size, "127.0.0.1", port, timeout_s, backend=backend,
                             model_device=torch.device(model_device))


def publisher_main(port: int, out_path: str, versions: list[int], timeout_s: float, world_size: int = WORLD_SIZE,
                   backend: str = "gloo", model_device: str = "cpu") -> None:
    group = join(0, world_size, port, timeout_s, backend, model_device)
    device = group.ipc_device or (group.device if backend != "gloo" else torch.device(model_device))
    publisher = WeightPublisher(group, model_tensors(0), BUCKET_BYTES, timeout_s)
    stats = [publisher.publish(version, fetch_from([(name, tensor.to(device))
                                                    for name, tensor in model_tensors(version)]))
             for version in versions]
    torch.save({"stats": stats, "plan_bytes": publisher.plan.total_bytes}, out_path)


def subscriber_main(rank: int, port: int, out_path: str, receives: int, world_size: int = WORLD_SIZE,
                    backend: str = "gloo", model_device: str = "cpu") -> None:
    group = join(rank, world_size, port, GROUP_TIMEOUT_S, backend, model_device)
    subscriber = WeightSubscriber(group, GROUP_TIMEOUT_S)
    received = {}
    for _ in range(receives):
        version, tensors = subscriber.receive()
        received[version] = {name: tensor.to("cpu", copy=True) for name, tensor in tensors.items()}
    torch.save(received, out_path)


def timed_out_main(rank: int, port: int, out_path: str, timeout_s: float) -> None:
    """Publish (rank 0) or receive (rank 1) once while rank 2 never calls receive."""
    group = init_weight_group(rank, WORLD_SIZE, "127.0.0.1", port, SHORT_TIMEOUT_S, backend="gloo")
    if rank == 0:
        publisher = WeightPublisher(group, model_tensors(0), BUCKET_BYTES, timeout_s)
        transfer = functools.partial(publisher.publish, 1, fetch_from(model_tensors(1)))
    else:
        transfer = WeightSubscriber(group, timeout_s).receive
    start = time.monotonic()
    try:
        transfer()
        outcome = {"error": None}
    except (CollectiveTimeout, CollectiveAborted) as error:
        outcome = {"error": str(error)}
    outcome["seconds"] = time.monotonic() - start
    del group  # after a timeout the group is unusable: drop it; recovery builds a new one
    torch.save(outcome, out_path)


def absent_main(port: int, release) -> None:
    """Joins the group and takes the plan, then stays away from the broadcast until released."""
    group = init_weight_group(2, WORLD_SIZE, "127.0.0.1", port, SHORT_TIMEOUT_S, backend="gloo")
    WeightSubscriber(group, SHORT_TIMEOUT_S)
    release.wait(60)


def stalled_main(port: int, release) -> None:
    """Joins, takes the plan and the publish's rendezvous and header, then takes no bucket until released."""
    group = init_weight_group(2, WORLD_SIZE, "127.0.0.1", port, SHORT_TIMEOUT_S, backend="gloo")
    WeightSubscriber(group, SHORT_TIMEOUT_S)
    _rendezvous(group, SHORT_TIMEOUT_S, "rendezvous")
    _broadcast(group, torch.zeros(2, dtype=torch.int64), SHORT_TIMEOUT_S, "header")
    release.wait(60)


def run_processes(targets: list[tuple], timeout_s: float) -> None:
    """Start one spawned process per (function, args) and require each to exit cleanly."""
    context = mp.get_context("spawn")
    processes = [context.Process(target=target, args=args) for target, args in targets]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in processes] == [0] * len(processes)


def test_plan_buckets_by_size_and_dtype():
    plan = plan_buckets(model_tensors(0), BUCKET_BYTES)
    layout = [(entry.name, entry.bucket_index, entry.offset, entry.numel) for entry in plan.entries]
    assert layout == [
        ("embed.weight", 0, 0, 2048),
        ("layers.0.norm.weight", 1, 0, 32),
        ("layers.0.attn.qkv.weight", 1, 32, 512),
        ("layers.0.experts.w1", 2, 0, 256),
        ("layers.0.router.bias", 3, 0, 4),
        ("step", 4, 0, 1),
        ("lm_head.weight", 5, 0, 1280),
        ("layers.1.attn.qkv.weight", 6, 0, 512),
        ("layers.1.norm.weight", 6, 512, 32),
        ("layers.1.mlp.w1", 7, 0, 768),
        ("layers.1.mlp.w2", 8, 0, 768),
        ("layers.1.mlp_norm.weight", 8, 768, 32),
        ("layers.1.router.weight", 9, 0, 1024),
    ]
    assert plan.bucket_dtypes == [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.int64,
                                  torch.float32, torch.float32, torch.float32, torch.float32, torch.float32]
    assert plan.bucket_numels == [2048, 544, 256, 4, 1, 1280, 544, 768, 800, 1024]
    assert plan.total_bytes == 4 * (2048 + 544 + 4 + 1280 + 544 + 768 + 800 + 1024) + 2 * 256 + 8
    assert plan.entries[3].shape == (4, 8, 8) and plan.entries[5].shape == () and plan.entries[-1].shape == (8, 128)
    assert plan_buckets(model_tensors(0), 1 << 20).bucket_numels == [2048 + 32 + 512, 256, 4, 1,
                                                                     1280 + 512 + 32 + 768 + 800 + 1024]


def test_plan_survives_its_wire_encoding():
    plan = plan_buckets(model_tensors(0), BUCKET_BYTES)
    assert BucketPlan.from_bytes(plan.to_bytes()) == plan


def check_broadcast(tmp_path, world_size: int, backend: str, versions: tuple = (1, 2),
                    model_device: str = "cpu") -> None:
    """Each version published by rank 0 arrives bit-identical on every other rank."""
    port = free_port()
    versions = list(versions)
    run_processes([(publisher_main, (port, str(tmp_path / "publisher.pt"), versions, GROUP_TIMEOUT_S, world_size,
                                     backend, model_device))] + [
        (subscriber_main, (rank, port, str(tmp_path / f"subscriber{rank}.pt"), len(versions), world_size, backend,
                           model_device))
        for rank in range(1, world_size)], timeout_s=120)
    published = torch.load(tmp_path / "publisher.pt")
    assert [stats["buckets"] for stats in published["stats"]] == [10] * len(versions)
    assert [stats["bytes"] for stats in published["stats"]] == [published["plan_bytes"]] * len(versions)
    for rank in range(1, world_size):
        received = torch.load(tmp_path / f"subscriber{rank}.pt")
        assert sorted(received) == versions
        for version in versions:
            expected = dict(model_tensors(version))
            assert received[version].keys() == expected.keys()
            for name, tensor in expected.items():
                got = received[version][name]
                assert got.dtype == tensor.dtype and torch.equal(got, tensor), (rank, version, name)


def test_subscribers_receive_bit_identical_versions(tmp_path):
    check_broadcast(tmp_path, WORLD_SIZE, "gloo")


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one per rank)")


@pytest.mark.gpu
@needs_two_gpus
def test_torch_nccl_broadcast(tmp_path):
    check_broadcast(tmp_path, 2, "nccl")


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
def test_cupy_nccl_broadcast(tmp_path):
    check_broadcast(tmp_path, 2, "cupy-nccl")


needs_a_gpu = pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")


@pytest.mark.gpu
@needs_a_gpu
def test_shared_gpu_cuda_ipc_delivers_three_versions_bit_identical(tmp_path):
    check_broadcast(tmp_path, WORLD_SIZE, "cuda-ipc", versions=(1, 2, 3), model_device="cuda:0")


@pytest.mark.gpu
@needs_a_gpu
def test_pinned_host_path_from_gpu_models_is_bit_identical(tmp_path):
    check_broadcast(tmp_path, WORLD_SIZE, "gloo", versions=(1, 2, 3), model_device="cuda:0")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"weight group backend \(mpi\) must be one of gloo, nccl, cupy-nccl, cuda-ipc"):
        init_weight_group(0, 1, "127.0.0.1", free_port(), 1.0, backend="mpi")


def publish_with_rank_2_away(tmp_path, away_main, timeout_s: float = SHORT_TIMEOUT_S,
                             abort_after_s: float | None = None) -> tuple[dict, dict]:
    """The outcomes of publish (rank 0) and receive (rank 1) while rank 2 runs `away_main`;
    with `abort_after_s`, this process aborts the group (as the driver does) that much later."""
    port = free_port()
    release = mp.get_context("spawn").Event()
    away = mp.get_context("spawn").Process(target=away_main, args=(port, release))
    away.start()
    if abort_after_s is not None:
        abort = threading.Timer(abort_after_s, abort_weight_group, args=("127.0.0.1", port, "generator-2 died"))
        abort.start()
    try:
        run_processes([(timed_out_main, (rank, port, str(tmp_path / f"rank{rank}.pt"), timeout_s))
                       for rank in (0, 1)], timeout_s=60)
    finally:
        release.set()
        away.join(30)
    assert away.exitcode == 0
    return torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")


def test_missing_subscriber_becomes_collective_timeout(tmp_path):
    publisher, subscriber = publish_with_rank_2_away(tmp_path, absent_main)
    assert publisher["error"] == (f"weight broadcast rendezvous of version 1 timed out after {SHORT_TIMEOUT_S}s "
                                  "on rank 0 (learner)")
    assert subscriber["error"] == (f"weight broadcast rendezvous (after version None) timed out after "
                                   f"{SHORT_TIMEOUT_S}s on rank 1 (generator)")
    for outcome in (publisher, subscriber):
        assert SHORT_TIMEOUT_S * 0.9 <= outcome["seconds"] <= SHORT_TIMEOUT_S * 2


def test_aborted_group_gives_up_long_before_its_timeout(tmp_path):
    """The driver saw a generator die: every rank stops waiting within a slice, naming the reason."""
    publisher, subscriber = publish_with_rank_2_away(tmp_path, absent_main, timeout_s=60.0, abort_after_s=1.0)
    assert re.fullmatch(r"weight broadcast rendezvous of version 1 aborted after [\d.]+s on rank 0 \(learner\): "
                        r"generator-2 died", publisher["error"])
    assert re.fullmatch(r"weight broadcast rendezvous \(after version None\) aborted after [\d.]+s on rank 1 "
                        r"\(generator\): generator-2 died", subscriber["error"])
    for outcome in (publisher, subscriber):
        assert outcome["seconds"] < 1.0 + 2 * WAIT_SLICE_S + 2


def test_subscriber_stalled_between_buckets_becomes_collective_timeout(tmp_path):
    """With buckets in flight, the publisher times out waiting on the first one rank 2 never takes."""
    publisher, subscriber = publish_with_rank_2_away(tmp_path, stalled_main)
    assert publisher["error"] == (f"weight broadcast bucket 1/10 of version 1 timed out after {SHORT_TIMEOUT_S}s "
                                  "on rank 0 (learner)")
    assert re.fullmatch(rf"weight broadcast bucket \d+/10 of version 1 timed out after {SHORT_TIMEOUT_S}s "
                        r"on rank 1 \(generator\)", subscriber["error"])
    for outcome in (publisher, subscriber):
        assert SHORT_TIMEOUT_S * 0.9 <= outcome["seconds"] <= SHORT_TIMEOUT_S * 2
