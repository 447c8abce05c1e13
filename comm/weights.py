"""Versioned, bucketed weight broadcast over gloo, torch's NCCL, cupy's NCCL or CUDA IPC.

The weight group holds the publisher (rank 0, learner-0) and the subscribers (ranks 1..,
the generators). It is a process group of its own, built from a TCP store, not the process's
default group: the learners keep the default group for FSDP, and a generator can rejoin a new
weight group without touching it. Tensors travel in flat buckets, one dtype per bucket, one collective per
bucket. The bucket plan (names, dtypes, shapes, offsets) is sent once, when the publisher and
subscribers are built; each publish then sends a small header [version, num_buckets] and the
buckets. Subscribers receive into buffers allocated once from the plan.

The path (comm/placement.py `weight_path`, chosen by the driver from where every rank's
tensors live) decides where buckets are:
  gloo       host memory; pinned on a rank whose model is on CUDA, so the copies to and
             from the device are DMA transfers;
  nccl, cupy-nccl  the rank's GPU (one rank per GPU);
  cuda-ipc   ranks sharing one GPU: the publisher's buckets live on it and subscribers map them
             through CUDA IPC handles sent once with the plan; each publish packs them, meets the
             subscribers ("ready"), lets them copy into their own buffers, and meets them again
             ("copied") before the buckets may be packed anew. The control messages (plan,
             header, rendezvous) go over gloo.

The buckets are pipelined (gloo, NCCL): the publisher packs bucket i+1 into one of two staging
buffers while bucket i is on the wire (at most IN_FLIGHT broadcasts outstanding), and subscribers
post every bucket's receive before waiting on the first.

Every collective is started asynchronously and waited on with a timeout, so a missing or
stuck peer becomes a CollectiveTimeout naming role, rank, operation and version instead of a
hang. A peer that died can leave a live rank waiting for another live rank (gloo does not pass
the failure on), so the driver, which sees the death, can also `abort_weight_group`: a key in the
group's store that every rank checks each WAIT_SLICE_S while it waits, raising CollectiveAborted.
After either the group is unusable: every rank must drop it and join a new one.
"""
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist
from loguru import logger

from comm.placement import WEIGHT_PATHS

PUBLISHER_RANK = 0
STORE_PREFIX = "ringrl-weights"
ABORT_KEY = "abort"
WAIT_SLICE_S = 1.0  # how often a waiting rank looks for an abort
IN_FLIGHT = 2  # bucket broadcasts the publisher keeps outstanding, one staging buffer each


class CollectiveTimeout(TimeoutError):
    """A collective of the weight group that did not complete within its timeout."""


class CollectiveAborted(RuntimeError):
    """A collective of the weight group given up because the driver aborted the group."""


class WeightGroup:
    """A standalone group; rank 0 publishes.

    `broadcast` (from rank 0, in place) and `barrier` start a collective and return a handle
    whose `wait(timeout=timedelta)` blocks until it completed on this rank, or raises
    RuntimeError ("timed out") when it did not in time. Collectives run in the order started.
    """

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self.store: dist.Store | None = None  # the rendezvous store, where an abort is posted
        self.pin_memory = False  # host buckets are pinned (gloo with the model on CUDA)
        self.ipc_device: torch.device | None = None  # cuda-ipc: the shared GPU the buckets live on

    def abort_reason(self) -> str | None:
        """Why the driver aborted this group, or None."""
        if self.store is None or not self.store.check([ABORT_KEY]):
            return None
        return self.store.get(ABORT_KEY).decode()

    def abandon(self) -> None:
        """Release what a timed-out or aborted collective still holds (NCCL: the communicator)."""

    @property
    def role(self) -> str:
        return "learner" if self.rank == PUBLISHER_RANK else "generator"

    def broadcast(self, tensor: torch.Tensor):
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError


class TorchGroup(WeightGroup):
    """torch.distributed's gloo or NCCL process group."""

    def __init__(self, pg: dist.ProcessGroup, rank: int, size: int, device: torch.device):
        super().__init__(rank, size, device)
        self.pg = pg

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        options = dist.BroadcastOptions()
        options.rootRank = PUBLISHER_RANK
        return self.pg.broadcast([tensor], options)

    def barrier(self) -> dist.Work:
        """An all-reduce on a tensor of the communication device (explicit on NCCL too)."""
        return self.pg.allreduce([torch.zeros(1, dtype=torch.int32, device=self.device)])


class CupyNcclGroup(WeightGroup):
    """cupy's NCCL bindings on a CUDA stream of their own, on torch tensors of the current device.

    A collective waits for the work already queued on the current stream (the packing), and
    waiting on it makes the current stream wait for the collective. cupy is imported here only.
    """

    def __init__(self, store: dist.Store, rank: int, size: int):
        from cupy.cuda import nccl
        super().__init__(rank, size, torch.device("cuda", torch.cuda.current_device()))
        self.nccl, self.stream = nccl, torch.cuda.Stream()
        # The store's constructor returned on rank 0 once every rank had connected, so all are alive
        # and NcclCommunicator (which has no timeout) will find them; the others wait for the id.
        if rank == PUBLISHER_RANK:
            store.set("cupy-nccl-id", msgpack.packb(nccl.get_unique_id()))
        unique_id = msgpack.unpackb(store.get("cupy-nccl-id"))
        unique_id = tuple(unique_id) if isinstance(unique_id, list) else unique_id  # cupy < 13: a tuple
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)

    def broadcast(self, tensor: torch.Tensor) -> "_CudaWork":
        self.stream.wait_stream(torch.cuda.current_stream())
        self.comm.broadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel() * tensor.element_size(),
                            self.nccl.NCCL_UINT8, PUBLISHER_RANK, self.stream.cuda_stream)
        return _CudaWork(self, tensor)

    def abandon(self) -> None:
        self.comm.abort()  # frees the stream of the collective that will never complete

    def barrier(self) -> "_CudaWork":
        token = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream())
        self.comm.allReduce(token.data_ptr(), token.data_ptr(), 1, self.nccl.NCCL_INT32, self.nccl.NCCL_SUM,
                            self.stream.cuda_stream)
        return _CudaWork(self, token)


class _CudaWork:
    """A collective queued on a CupyNcclGroup's stream: done when the event recorded after it fired."""

    def __init__(self, group: CupyNcclGroup, tensor: torch.Tensor):
        self.group, self.tensor = group, tensor  # the tensor stays alive until the collective is done
        self.event = torch.cuda.Event()
        self.event.record(group.stream)

    def wait(self, timeout: timedelta) -> None:
        deadline = time.monotonic() + timeout.total_seconds()
        while not self.event.query():
            if time.monotonic() >= deadline:
                raise RuntimeError("NCCL collective timed out")
            time.sleep(1e-4)
        torch.cuda.current_stream().wait_event(self.event)


def init_weight_group(rank: int, world_size: int, master_addr: str, master_port: int,
                      timeout_s: float, backend: str = "gloo",
                      model_device: torch.device = torch.device("cpu")) -> WeightGroup:
    """Join the weight group; blocks until all `world_size` ranks joined or `timeout_s` passed.

    Rank 0 (the publisher) hosts the rendezvous store on master_addr:master_port; ranks 1..
    are generators. `backend` is the path every rank was given (WEIGHT_PATHS); `model_device`
    is where this rank's model lives (the bucket memory follows from both).
    """
    if backend not in WEIGHT_PATHS:
        raise ValueError(f"weight group backend ({backend}) must be one of {', '.join(WEIGHT_PATHS)}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, master_port, world_size, rank == PUBLISHER_RANK, timeout=timeout)
    store = dist.PrefixStore(STORE_PREFIX, store)
    if backend == "cupy-nccl":
        group = CupyNcclGroup(store, rank, world_size)
    elif backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        group = TorchGroup(dist.ProcessGroupNCCL(store, rank, world_size), rank, world_size, device)
    else:
        group = TorchGroup(dist.ProcessGroupGloo(store, rank, world_size, timeout), rank, world_size,
                           torch.device("cpu"))
        group.pin_memory = backend == "gloo" and model_device.type == "cuda"
        group.ipc_device = model_device if backend == "cuda-ipc" else None
    group.store = store
    logger.info("joined weight group as rank {}/{} ({}) over {}{}", rank, world_size, group.role, backend,
                " (pinned host buckets)" if group.pin_memory else "")
    return group


def abort_weight_group(master_addr: str, master_port: int, reason: str, timeout_s: float = 10.0) -> None:
    """From any process: every rank of the group at master_addr:master_port gives up its
    collectives within WAIT_SLICE_S, raising CollectiveAborted(reason)."""
    store = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    dist.PrefixStore(STORE_PREFIX, store).set(ABORT_KEY, reason)


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
    bucket's broadcast has completed on this rank (cuda-ipc: once every subscriber copied the
    buckets), and raises CollectiveTimeout if any step (the rendezvous, the header, a bucket)
    takes longer than `timeout_s`. Nothing is queued across calls. `publish` asks `fetch` for one
    bucket's tensors at a time, in bucket order, so a sharded learner gathers one bucket, not the
    whole model, before each broadcast; it asks for bucket i+1 while bucket i is still being sent.
    Staging memory: IN_FLIGHT of the largest bucket that holds several tensors (cuda-ipc: every
    bucket, on the shared GPU).
    """

    def __init__(self, group: WeightGroup, named_tensors: list[tuple[str, torch.Tensor]],
                 bucket_bytes: int, timeout_s: float):
        self.group = group
        self.plan = plan_buckets(named_tensors, bucket_bytes)
        self._timeout_s = timeout_s
        self._shared: list[torch.Tensor] = []
        if group.ipc_device is not None:
            self._shared = _allocate_buckets(self.plan, group.ipc_device)
        tensors_per_bucket = Counter(entry.bucket_index for entry in self.plan.entries)
        largest = max((self.plan.bucket_numels[index] * self.plan.bucket_dtypes[index].itemsize
                       for index, tensors in tensors_per_bucket.items() if tensors > 1 and not self._shared),
                      default=0)
        self._staging = [torch.empty(largest, dtype=torch.uint8, device=group.device, pin_memory=group.pin_memory)
                         for _ in range(IN_FLIGHT)]
        # Subscribers wait in their constructor for the plan (and, over cuda-ipc, the handles).
        _send_bytes(group, self.plan.to_bytes(), timeout_s, "weight plan")
        if self._shared:
            _send_bytes(group, msgpack.packb([_ipc_handle(bucket) for bucket in self._shared]), timeout_s,
                        "weight IPC handles")
        logger.info("weight plan sent: {} tensors, {} buckets, {:.1f} MB",
                    len(self.plan.entries), self.plan.num_buckets, self.plan.total_bytes / 1e6)

    def publish(self, version: int, fetch: Fetch) -> dict:
        """Send the plan's tensors, as `fetch` returns them, as `version`.

        Returns {"bytes", "seconds", "buckets"}.
        """
        start = time.perf_counter()
        # Every subscriber enters receive() for this version; meeting here first turns a missing
        # one into a timeout of this rendezvous before any bucket is sent.
        _rendezvous(self.group, self._timeout_s, f"weight broadcast rendezvous of version {version}")
        header = torch.tensor([version, self.plan.num_buckets], dtype=torch.int64, device=self.group.device)
        # Subscribers wait for the header to learn the version and that the buckets follow.
        _broadcast(self.group, header, self._timeout_s, f"weight broadcast header of version {version}")
        if self._shared:
            self._fill_shared(version, fetch)
        else:
            self._broadcast_buckets(version, fetch)
        seconds = time.perf_counter() - start
        logger.debug("published version {}: {:.1f} MB in {} buckets, {:.3f}s",
                     version, self.plan.total_bytes / 1e6, self.plan.num_buckets, seconds)
        return {"bytes": self.plan.total_bytes, "seconds": seconds, "buckets": self.plan.num_buckets}

    def _broadcast_buckets(self, version: int, fetch: Fetch) -> None:
        in_flight = []  # (work, operation) of the buckets being sent, oldest first
        for index in range(self.plan.num_buckets):
            if len(in_flight) == IN_FLIGHT:  # the oldest one's staging buffer is packed next
                work, operation = in_flight.pop(0)
                _wait(self.group, work, self._timeout_s, operation)
            bucket = self._pack(index, fetch(self.plan.bucket_names(index)))
            # Subscribers posted a receive for bucket `index` into their flat buffer of the same dtype and size.
            in_flight.append((self.group.broadcast(bucket),
                              f"weight broadcast bucket {index + 1}/{self.plan.num_buckets} of version {version}"))
        for work, operation in in_flight:
            _wait(self.group, work, self._timeout_s, operation)

    def _fill_shared(self, version: int, fetch: Fetch) -> None:
        """cuda-ipc: pack every bucket in place on the shared GPU, then let the subscribers copy."""
        for index, bucket in enumerate(self._shared):
            self._pack_into(bucket, self._entries(index, fetch(self.plan.bucket_names(index))))
        torch.cuda.synchronize(self.group.ipc_device)
        # Subscribers copy the buckets between these two meetings; after the second they may be packed anew.
        _rendezvous(self.group, self._timeout_s, f"weight buckets ready of version {version}")
        _rendezvous(self.group, self._timeout_s, f"weight buckets copied of version {version}")

    def _entries(self, index: int, tensors: dict[str, torch.Tensor]) -> list[tuple["BucketEntry", torch.Tensor]]:
        """Bucket `index`'s plan entries with the tensors `fetch` gave for them, checked against the plan."""
        entries = [entry for entry in self.plan.entries if entry.bucket_index == index]
        if tensors.keys() != {entry.name for entry in entries}:
            raise ValueError(f"fetch must return exactly the tensors of bucket {index}")
        for entry in entries:
            tensor = tensors[entry.name]
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{entry.name}: {tensor.dtype} {tuple(tensor.shape)} does not match "
                                 f"the plan's {entry.dtype} {entry.shape}")
        return [(entry, tensors[entry.name]) for entry in entries]

    def _pack(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bucket `index`: a bucket's only tensor itself, contiguous on the group's device (no copy
        if it already is; the broadcast keeps it alive), else the tensors packed into staging
        buffer index % IN_FLIGHT (which must be free)."""
        entries = self._entries(index, tensors)
        if len(entries) == 1:
            return entries[0][1].detach().to(self.group.device).contiguous().view(-1)
        dtype, numel = self.plan.bucket_dtypes[index], self.plan.bucket_numels[index]
        return self._pack_into(self._staging[index % IN_FLIGHT][:numel * dtype.itemsize].view(dtype), entries)

    @staticmethod
    def _pack_into(bucket: torch.Tensor, entries: list[tuple["BucketEntry", torch.Tensor]]) -> torch.Tensor:
        with torch.no_grad():
            for entry, tensor in entries:
                bucket[entry.offset:entry.offset + entry.numel].copy_(tensor.reshape(-1))
        return bucket


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
        # The publisher sends the plan from its constructor (over cuda-ipc, then its bucket handles).
        self.plan = BucketPlan.from_bytes(_receive_bytes(group, timeout_s, "weight plan"))
        self._buckets = _allocate_buckets(self.plan, group.ipc_device or group.device, group.pin_memory)
        self._shared: list[torch.Tensor] = []
        if group.ipc_device is not None:
            handles = msgpack.unpackb(_receive_bytes(group, timeout_s, "weight IPC handles"))
            self._shared = [_open_ipc_handle(handle, own) for handle, own in zip(handles, self._buckets)]
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
        if self._shared:
            self._copy_shared(version)
        else:
            # The publisher broadcasts the buckets of this version in order, one into each buffer: post all.
            works = [self.group.broadcast(bucket) for bucket in self._buckets]
            for index, work in enumerate(works):
                _wait(self.group, work, self._timeout_s,
                      f"weight broadcast bucket {index + 1}/{num_buckets} of version {version}")
        self._last_version = version
        return version, dict(self._views)

    def _copy_shared(self, version: int) -> None:
        """cuda-ipc: copy the publisher's packed buckets into this rank's own, between its two meetings."""
        _rendezvous(self.group, self._timeout_s, f"weight buckets ready of version {version}")
        for own, shared in zip(self._buckets, self._shared):
            own.copy_(shared)
        torch.cuda.synchronize(self.group.ipc_device)
        _rendezvous(self.group, self._timeout_s, f"weight buckets copied of version {version}")


def _allocate_buckets(plan: BucketPlan, device: torch.device, pin_memory: bool = False) -> list[torch.Tensor]:
    return [torch.empty(numel, dtype=dtype, device=device, pin_memory=pin_memory)
            for numel, dtype in zip(plan.bucket_numels, plan.bucket_dtypes)]


def _ipc_handle(bucket: torch.Tensor) -> list:
    """The CUDA IPC handle of a bucket's storage, as torch.multiprocessing shares one: bytes and
    ints only, so it travels as msgpack (a subscriber never unpickles what the network sends)."""
    return list(bucket.untyped_storage()._share_cuda_())


def _open_ipc_handle(handle: list, like: torch.Tensor) -> torch.Tensor:
    """The publisher's bucket, mapped into this process, with the dtype and size of `like`."""
    storage = torch.UntypedStorage._new_shared_cuda(*handle)
    mapped = torch.empty(0, dtype=torch.uint8, device=like.device).set_(storage)
    return mapped[:like.numel() * like.element_size()].view(like.dtype)


def _send_bytes(group: WeightGroup, payload: bytes, timeout_s: float, operation: str) -> None:
    """Broadcast `payload` from the publisher: its size first, then its bytes."""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=group.device)
    _broadcast(group, size, timeout_s, f"{operation} size")
    _broadcast(group, torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(group.device), timeout_s, operation)


def _receive_bytes(group: WeightGroup, timeout_s: float, operation: str) -> bytes:
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    _broadcast(group, size, timeout_s, f"{operation} size")
    payload = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
    _broadcast(group, payload, timeout_s, operation)
    return payload.cpu().numpy().tobytes()


def _broadcast(group: WeightGroup, tensor: torch.Tensor, timeout_s: float, operation: str) -> None:
    _wait(group, group.broadcast(tensor), timeout_s, operation)


def _rendezvous(group: WeightGroup, timeout_s: float, operation: str) -> None:
    _wait(group, group.barrier(), timeout_s, operation)


def _wait(group: WeightGroup, work, timeout_s: float, operation: str) -> None:
    """Wait in slices of WAIT_SLICE_S: done, or failed, aborted or timed out with a named error."""
    start = time.monotonic()
    where = f"on rank {group.rank} ({group.role})"
    while True:
        remaining = timeout_s - (time.monotonic() - start)
        try:
            work.wait(timeout=timedelta(seconds=max(min(WAIT_SLICE_S, remaining), 1e-3)))
            return
        except RuntimeError as error:
            elapsed = time.monotonic() - start
            if "timed out" not in str(error).lower():
                raise RuntimeError(f"{operation} failed after {elapsed:.2f}s {where}: {error}") from error
            if (reason := group.abort_reason()) is not None:
                group.abandon()
                raise CollectiveAborted(f"{operation} aborted after {elapsed:.2f}s {where}: {reason}") from error
            if elapsed >= timeout_s * 0.99:
                group.abandon()
                raise CollectiveTimeout(f"{operation} timed out after {timeout_s}s {where}") from error


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in weight plan")
    return dtype
