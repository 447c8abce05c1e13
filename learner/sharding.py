"""Sharded learners: one process group of K learner ranks, the model under FSDP2.

Each rank trains on its own share of the batch. FSDP averages gradients over the
ranks, so each rank scales its locally aggregated loss by
`local_count * K / global_count`: the average then equals the gradient of the
loss aggregated over the whole batch, whatever share each rank got.
"""
from datetime import timedelta

import torch
import torch.distributed as dist
from loguru import logger
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor


def init_learner_group(rank: int, world_size: int, addr: str, port: int, timeout_s: float,
                       device: torch.device = torch.device("cpu")) -> None:
    """Join the learners' default process group: NCCL when the model is on CUDA, else gloo."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    logger.info("joined the learner group as rank {}/{} over {}", rank, world_size, backend)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# model methods that the trainer calls besides forward; FSDP must unshard the root around them
ROOT_METHODS = ("hidden_states", "logits", "mtp_logits", "forward_routed")


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the learner group: each block and MTP layer is a unit, then the root."""
    if world_size() == 1:
        return model
    mesh = init_device_mesh(next(model.parameters()).device.type, (world_size(),))
    for unit in list(model.blocks) + list(model.mtp):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in ROOT_METHODS:
        register_fsdp_forward_method(model, method)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather over the learners for a sharded parameter."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def all_reduce_sum(values: list[float]) -> list[float]:
    if world_size() == 1:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(summed)
    return summed.tolist()


def all_reduce_expert_load(model) -> None:
    """Sum expert load over the learners so every rank moves the expert bias alike."""
    if world_size() == 1:
        return
    for moe in model.moe_layers():
        dist.all_reduce(moe.expert_load)


def loss_scale(aggregation: str, local_count: float, global_count: float) -> float:
    """Factor on a rank's locally aggregated loss so that FSDP's gradient average is global.

    A fixed token budget divides every rank's sum by the same Phi, so only the
    average over ranks has to be undone.
    """
    if aggregation == "token_budget":
        return float(world_size())
    return local_count * world_size() / global_count


def _collective_device() -> torch.device:
    """NCCL reduces tensors on the rank's GPU, gloo on the host."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_stats(stats: dict) -> list[dict]:
    """Every rank's stats dict, on every rank."""
    if world_size() == 1:
        return [stats]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, stats)
    return gathered
