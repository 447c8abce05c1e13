"""Where an actor's tensors live, and which path weights take between two ranks.

The one place that decides devices: an actor asks `place` for its device once, at start;
the driver asks `weight_path` which transport the weight group uses, from where every
rank's tensors live (never from `torch.cuda.is_available()` alone):

  nccl / cupy-nccl  every rank has a GPU of its own (NCCL allows one rank per GPU in a
                    communicator); cupy's NCCL when every rank has cupy installed;
  cuda-ipc          every rank is on the same GPU of the same node: the publisher shares
                    CUDA IPC handles of its bucket tensors once, subscribers copy from them;
  gloo              any rank on CPU, or GPUs shared by some ranks but not all: buckets go
                    through host memory (pinned on a rank whose tensors are on CUDA).

Compute dtypes: bf16 weights and activations on CUDA (the learner keeps float32 master
weights under autocast), float32 on CPU, where bf16 matmul is far slower.

CPU cores (`ray.bind_cores`): on each machine, a CPU generator's decode thread is bound to cores
of its own and every other thread there (the actors', the driver's) to the rest (`core_plan`,
`bind_threads`, `BindsCores`).
"""
import importlib.util
import os
import socket
from dataclasses import dataclass

import torch
from loguru import logger

DEVICE_SETTINGS = ("auto", "cpu", "cuda")
WEIGHT_PATHS = ("gloo", "nccl", "cupy-nccl", "cuda-ipc")


@dataclass(frozen=True)
class Placement:
    """Where one rank's tensors live: its node, `cpu` or `cuda`, and the GPU's id on that node."""

    node: str
    device: str
    gpu: str = ""
    has_cupy: bool = False

    @property
    def on_cuda(self) -> bool:
        return self.device == "cuda"

    def torch_device(self) -> torch.device:
        """Ray makes a granted GPU the process's only visible one: it is cuda:0."""
        return torch.device("cuda", 0) if self.on_cuda else torch.device("cpu")

    def describe(self) -> str:
        return f"cuda (GPU {self.gpu} of node {self.node[:8]})" if self.on_cuda else f"cpu (node {self.node[:8]})"


def place(role: str, setting: str, node: str, granted_gpus: list, cuda_usable: bool, has_cupy: bool) -> Placement:
    """The placement of an actor of `role` whose config says `setting` (auto | cpu | cuda).

    auto is cuda when Ray granted the actor a GPU and torch can use it; cuda without either
    is an error naming the role (conf/load.py has checked `setting`).
    """
    wants_cuda = setting == "cuda" or (setting == "auto" and bool(granted_gpus))
    if not wants_cuda:
        return Placement(node, "cpu")
    if not granted_gpus:
        raise RuntimeError(f"{role}.device=cuda but Ray granted this actor no GPU ({role}.num_gpus)")
    if not cuda_usable:
        raise RuntimeError(f"{role} was granted GPU {granted_gpus[0]} but this torch build cannot use CUDA "
                           f"(torch {torch.__version__})")
    return Placement(node, "cuda", str(granted_gpus[0]), has_cupy)


def place_here(role: str, setting: str, node: str, granted_gpus: list) -> Placement:
    """`place` with this process's facts: whether torch can use CUDA, and whether a cupy built
    for torch's CUDA major version is installed (checked only on a GPU)."""
    cuda_usable = bool(granted_gpus) and torch.cuda.is_available()
    placement = place(role, setting, node, granted_gpus, cuda_usable, cuda_usable and _cupy_matches_torch())
    logger.info("placed on {}, computing in {}", placement.describe(),
                str(compute_dtype(placement)).removeprefix("torch."))
    return placement


def _cupy_matches_torch() -> bool:
    """cupy is installed and built for the CUDA major version torch was built for (logged if not)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy
    cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    torch_major = int(torch.version.cuda.split(".")[0])
    if cupy_major != torch_major:
        logger.warning("cupy is built for CUDA {}, torch for CUDA {}: using torch's NCCL", cupy_major, torch_major)
    return cupy_major == torch_major


def compute_dtype(placement: Placement) -> torch.dtype:
    return torch.bfloat16 if placement.on_cuda else torch.float32


def weight_path(publisher: Placement, subscribers: list[Placement]) -> tuple[str, str]:
    """(path, why) for a weight group of `publisher` (rank 0) and `subscribers`."""
    ranks = [publisher, *subscribers]
    if not all(rank.on_cuda for rank in ranks):
        return "gloo", "a rank is on CPU: buckets go through host memory"
    gpus = {(rank.node, rank.gpu) for rank in ranks}
    if len(gpus) == 1:
        return "cuda-ipc", "every rank shares one GPU: CUDA IPC handles, copied in place"
    if len(gpus) == len(ranks):
        if all(rank.has_cupy for rank in ranks):
            return "cupy-nccl", "every rank has a GPU of its own and cupy: cupy's NCCL"
        return "nccl", "every rank has a GPU of its own: torch's NCCL"
    return "gloo", "some ranks share a GPU and some do not (NCCL needs one rank per GPU): host memory"


def wire_dtype(subscribers: list[Placement]) -> torch.dtype:
    """The dtype floating-point parameters travel in: what every subscriber computes in, else float32."""
    dtypes = {compute_dtype(rank) for rank in subscribers}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating parameters to `dtype`; buffers (the expert bias, RoPE frequencies) stay float32."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return model


SHARED = "shared"  # core_plan's key for the cores of every thread but the CPU generators' decode threads
START_CORES = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def core_plan(cores: set[int], generators: dict[str, int]) -> dict[str, set[int]] | None:
    """The cores of one machine for the decode thread of each of its CPU `generators` ({name: torch
    threads}, in rank order) and, under SHARED, for every other thread there; None where the
    generators would leave no core for the rest.

    A CPU generator's decode thread bounds an asynchronous run (the learner has slack). Left to
    the OS, the learner, the judges, the driver and the actors' RPC and sender threads take its
    core now and then; with cores of its own it does not wait for one.
    """
    ordered = sorted(cores)
    if sum(generators.values()) >= len(ordered):
        return None
    plan, first = {}, 0
    for name, threads in generators.items():
        plan[name], first = set(ordered[first : first + threads]), first + threads
    plan[SHARED] = set(ordered[first:])
    return plan


def bind_threads(cores: list[int]) -> list[int]:
    """Bind every thread of this process to `cores` (threads started later inherit it from the thread
    that starts them); returns the calling thread's cores."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return sorted(os.sched_getaffinity(0))


class BindsCores:
    """Actor methods for `ray.bind_cores` (mixed into the Ray actor classes)."""

    def host_cores(self) -> tuple[str, list[int]]:
        """This machine's host name and the cores this process could use when it started."""
        return socket.gethostname(), sorted(START_CORES)

    def bind_cores(self, cores: list[int]) -> list[int]:
        return bind_threads(cores)
