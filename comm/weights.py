"""Versioned, bucketed weight broadcast over torch.distributed (gloo on CPU, NCCL on GPU).

The weight group holds the publisher (rank 0, learner-0) and the subscribers (ranks 1..,
the generators). It is a process group of its own, built from a TCP store, not the process's
default group: the learners keep the default group for FSDP, and a generator can rejoin a new
weight group without touching it. Tensors travel in flat buckets, one dtype per bucket, one collective per
bucket. The bucket plan (names, dtypes, shapes, offsets) is sent once, when the publisher and
subscribers are built; each publish then sends a small header [version, num_buckets] and the
buckets. Subscribers receive into buffers allocated once from the plan.

Every collective is issued with async_op=True and waited on with a timeout, so a missing or
stuck peer becomes a CollectiveTimeout naming role, rank, operation and version instead of a
hang. After a CollectiveTimeout the group is unusable: every rank must destroy and re-create it.
The same code serves NCCL: the communication buffers then live on the current CUDA device.
"""
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist
from loguru import logger

PUBLISHER_RANK = 0


class CollectiveTimeout(TimeoutError):
    """A collective of the weight group that did not complete within its timeout."""


def pick_backend() -> str:
    """NCCL where CUDA is available, else gloo (logged)."""
    if torch.cuda.is_available():
        logger.info("CUDA available, using nccl for weight broadcast")
        return "nccl"
    logger.info("no CUDA, using gloo for weight broadcast")
    return "gloo"


@dataclass
class WeightGroup:
    """A standalone process group: `pg` runs the collectives, `rank` 0 publishes."""

    pg: dist.ProcessGroup
    rank: int
    size: int
    device: torch.device

    @property
    def role(self) -> str:
        return "learner" if self.rank == PUBLISHER_RANK else "generator"


def init_weight_group(rank: int, world_size: int, master_addr: str, master_port: int,
                      timeout_s: float, backend: str | None = None) -> WeightGroup:
    """Join the weight group; blocks until all `world_size` ranks joined or `timeout_s` passed.

    Rank 0 (the publisher) hosts the rendezvous store on master_addr:master_port; ranks 1..
    are generators. With NCCL, set the CUDA device before calling.
    """
    backend = backend or pick_backend()
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, master_port, world_size, rank == PUBLISHER_RANK, timeout=timeout)
    store = dist.PrefixStore("ringrl-weights", store)
    if backend == "nccl":
        pg, device = dist.ProcessGroupNCCL(store, rank, world_size), torch.device("cuda", torch.cuda.current_device())
    else:
        pg, device = dist.ProcessGroupGloo(store, rank, world_size, timeout), torch.device("cpu")
    group = WeightGroup(pg, rank, world_size, device)
    logger.info("joined weight group as rank {}/{} ({}) over {}", rank, world_size, group.role, backend)
    return group


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class BucketEntry:
    """Where one named tensor lives in the flat buckets (offset and numel in elements)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    bucket_index: int
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketPlan:
    """Layout of the named tensors in flat buckets; identical on every rank."""

    entries: list[BucketEntry]
    bucket_dtypes: list[torch.dtype]
    bucket_numels: list[int]

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_numels)

    def bucket_names(self, index: int) -> list[str]:
        return [entry.name for entry in self.entries if entry.bucket_index == index]

    @property
    def total_bytes(self) -> int:
        return sum(numel * dtype.itemsize for numel, dtype in zip(self.bucket_numels, self.bucket_dtypes))

    def to_bytes(self) -> bytes:
        """msgpack encoding (no pickle: subscribers never unpickle what the network sends)."""
        entries = [[e.name, _dtype_name(e.dtype), list(e.shape), e.bucket_index, e.offset, e.numel]
                   for e in self.entries]
        return msgpack.packb({"entries": entries, "bucket_dtypes": [_dtype_name(d) for d in self.bucket_dtypes],
                              "bucket_numels": self.bucket_numels})

    @staticmethod
    def from_bytes(payload: bytes) -> "BucketPlan":
        fields = msgpack.unpackb(payload)
        entries = [BucketEntry(name, _dtype(dtype), tuple(shape), bucket, offset, numel)
                   for name, dtype, shape, bucket, offset, numel in fields["entries"]]
        return BucketPlan(entries, [_dtype(d) for d in fields["bucket_dtypes"]], fields["bucket_numels"])


def plan_buckets(named_tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> BucketPlan:
    """Pack tensors in order into flat buckets of at most `bucket_bytes`, one dtype per bucket.

    A tensor larger than `bucket_bytes` gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes ({bucket_bytes}) must be positive")
    entries: list[BucketEntry] = []
    bucket_dtypes: list[torch.dtype] = []
    bucket_numels: list[int] = []
    for name, tensor in named_tensors:
        fits = bool(bucket_dtypes) and bucket_dtypes[-1] == tensor.dtype and \
            (bucket_numels[-1] + tensor.numel()) * tensor.element_size() <= bucket_bytes
        if not fits:
            bucket_dtypes.append(tensor.dtype)
            bucket_numels.append(0)
        entries.append(BucketEntry(name, tensor.dtype, tuple(tensor.shape), len(bucket_numels) - 1,
                                   bucket_numels[-1], tensor.numel()))
        bucket_numels[-1] += tensor.numel()
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")
    return BucketPlan(entries, bucket_dtypes, bucket_numels)


Fetch = Callable[[list[str]], dict[str, torch.Tensor]]


def fetch_from(named_tensors: list[tuple[str, torch.Tensor]]) -> Fetch:
    """A fetch over tensors already whole in memory."""
    tensors = dict(named_tensors)
    return lambda names: {name: tensors[name] for name in names}


class WeightPublisher:
    """Rank 0 of the weight group: sends the plan once, then one version per `publish`.

    Blocking: the constructor returns once the plan is sent; `publish` returns once every
    bucket's broadcast has completed on this rank, and raises CollectiveTimeout if any step
    (the rendezvous, the header, a bucket) takes longer than `timeout_s`. Nothing is queued.
    `publish` asks `fetch` for one bucket's tensors at a time, so a sharded learner gathers
    one bucket, not the whole model, before each broadcast.
    """

    def __init__(self, group: WeightGroup, named_tensors: list[tuple[str, torch.Tensor]],
                 bucket_bytes: int, timeout_s: float):
        self.group = group
        self.plan = plan_buckets(named_tensors, bucket_bytes)
        self._timeout_s = timeout_s
        self._buckets = _allocate_buckets(self.plan, group.device)
        payload = self.plan.to_bytes()
        size = torch.tensor([len(payload)], dtype=torch.int64, device=group.device)
        # Subscribers wait in their constructor for the plan: its size first, then its bytes.
        _broadcast(group, size, timeout_s, "weight plan size")
        _broadcast(group, torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(group.device),
                   timeout_s, "weight plan")
        logger.info("weight plan sent: {} tensors, {} buckets, {:.1f} MB",
                    len(self.plan.entries), self.plan.num_buckets, self.plan.total_bytes / 1e6)

    def publish(self, version: int, fetch: Fetch) -> dict:
        """Broadcast the plan's tensors, as `fetch` returns them, as `version`.

        Returns {"bytes", "seconds", "buckets"}.
        """
        start = time.perf_counter()
        # Every subscriber enters receive() for this version; meeting here first turns a missing
        # one into a timeout of this rendezvous before any bucket is sent.
        _rendezvous(self.group, self._timeout_s, f"weight broadcast rendezvous of version {version}")
        header = torch.tensor([version, self.plan.num_buckets], dtype=torch.int64, device=self.group.device)
        # Subscribers wait for the header to learn the version and that the buckets follow.
        _broadcast(self.group, header, self._timeout_s, f"weight broadcast header of version {version}")
        for index, bucket in enumerate(self._buckets):
            self._pack(index, fetch(self.plan.bucket_names(index)))
            # Subscribers receive bucket `index` into their flat buffer of the same dtype and size.
            _broadcast(self.group, bucket, self._timeout_s,
                       f"weight broadcast bucket {index + 1}/{len(self._buckets)} of version {version}")
        seconds = time.perf_counter() - start
        logger.debug("published version {}: {:.1f} MB in {} buckets, {:.3f}s",
                     version, self.plan.total_bytes / 1e6, self.plan.num_buckets, seconds)
        return {"bytes": self.plan.total_bytes, "seconds": seconds, "buckets": self.plan.num_buckets}

    def _pack(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        entries = [entry for entry in self.plan.entries if entry.bucket_index == index]
        if tensors.keys() != {entry.name for entry in entries}:
            raise ValueError(f"fetch must return exactly the tensors of bucket {index}")
        with torch.no_grad():
            for entry in entries:
                tensor = tensors[entry.name]
                if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                    raise ValueError(f"{entry.name}: {tensor.dtype} {tuple(tensor.shape)} does not match "
                                     f"the plan's {entry.dtype} {entry.shape}")
                flat = self._buckets[entry.bucket_index][entry.offset:entry.offset + entry.numel]
                flat.copy_(tensor.reshape(-1))


class WeightSubscriber:
    """Rank >= 1 of the weight group: receives the plan once, then one version per `receive`.

    Blocking: the constructor waits for the plan; `receive` waits for the publisher's next
    `publish` and raises CollectiveTimeout if any step takes longer than `timeout_s`. Call it
    when the publisher is known to be publishing (the controller starts both sides together).
    The returned tensors are views into this subscriber's receive buffers: valid until the next
    `receive`, which overwrites them; copy them into the model before receiving again.
    """

    def __init__(self, group: WeightGroup, timeout_s: float):
        self.group = group
        self._timeout_s = timeout_s
        self._last_version: int | None = None
        size = torch.zeros(1, dtype=torch.int64, device=group.device)
        # The publisher sends the plan from its constructor: its size first, then its bytes.
        _broadcast(group, size, timeout_s, "weight plan size")
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
        _broadcast(group, payload, timeout_s, "weight plan")
        self.plan = BucketPlan.from_bytes(payload.cpu().numpy().tobytes())
        self._buckets = _allocate_buckets(self.plan, group.device)
        self._views = {entry.name: self._buckets[entry.bucket_index][entry.offset:entry.offset + entry.numel]
                       .view(entry.shape) for entry in self.plan.entries}

    def receive(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The next published version and its tensors (views, valid until the next receive)."""
        after = f"after version {self._last_version}"
        # The publisher meets all subscribers here at the start of each publish.
        _rendezvous(self.group, self._timeout_s, f"weight broadcast rendezvous ({after})")
        header = torch.zeros(2, dtype=torch.int64, device=self.group.device)
        # The publisher sends [version, num_buckets] before the buckets.
        _broadcast(self.group, header, self._timeout_s, f"weight broadcast header ({after})")
        version, num_buckets = header.tolist()
        if num_buckets != self.plan.num_buckets:
            raise RuntimeError(f"publisher announced {num_buckets} buckets for version {version}, "
                               f"the plan has {self.plan.num_buckets}")
        for index, bucket in enumerate(self._buckets):
            # The publisher broadcasts bucket `index` of this version into this buffer.
            _broadcast(self.group, bucket, self._timeout_s,
                       f"weight broadcast bucket {index + 1}/{num_buckets} of version {version}")
        self._last_version = version
        return version, dict(self._views)


def _allocate_buckets(plan: BucketPlan, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(numel, dtype=dtype, device=device)
            for numel, dtype in zip(plan.bucket_numels, plan.bucket_dtypes)]


def _broadcast(group: WeightGroup, tensor: torch.Tensor, timeout_s: float, operation: str) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = PUBLISHER_RANK
    _wait(group, group.pg.broadcast([tensor], options), timeout_s, operation)


def _rendezvous(group: WeightGroup, timeout_s: float, operation: str) -> None:
    """A barrier as an all-reduce on a tensor of the communication device (explicit on NCCL too)."""
    token = torch.zeros(1, dtype=torch.int32, device=group.device)
    _wait(group, group.pg.allreduce([token]), timeout_s, operation)


def _wait(group: WeightGroup, work: dist.Work, timeout_s: float, operation: str) -> None:
    start = time.monotonic()
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as error:
        elapsed = time.monotonic() - start
        where = f"on rank {group.rank} ({group.role})"
        if elapsed >= timeout_s * 0.99 or "timed out" in str(error).lower():
            raise CollectiveTimeout(f"{operation} timed out after {timeout_s}s {where}") from error
        raise RuntimeError(f"{operation} failed after {elapsed:.2f}s {where}: {error}") from error


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in weight plan")
    return dtype
