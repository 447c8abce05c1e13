"""Parameter counts, learner shard sizes and weight-sync volume of a config (`run.mode=plan`).

The model is built on PyTorch's meta device: every parameter has its shape and no
storage, so the 1T preset is counted in seconds and a few hundred MB.

Definitions used throughout:
- total: every parameter of `MoECausalLM`, MTP layers included.
- active per token: every parameter a token's forward pass through the main model
  touches: the input embedding (the whole matrix, as published active counts do,
  though a token reads one row), attention, dense FFNs, routers, shared experts,
  top_k of the num_experts routed experts of each MoE layer, the norms and lm_head.
  MTP layers are excluded (they serve training and speculative decoding only).
  "active without embedding" drops the input embedding.
- bytes: parameters, gradients and optimizer state at `plan.param_bytes`,
  `plan.grad_bytes` and `plan.optimizer_bytes_per_param` per parameter; FSDP
  padding, activations and communication buffers are not counted. GB = 1e9 bytes.
- weight sync: one policy version at `plan.param_bytes` per parameter, on links of
  `plan.link_gbps` at `plan.bucket_efficiency`. Today's path: each generator replica
  receives the whole model through one link. The sharded point-to-point path: each
  replica spread over `plan.gpus_per_replica` GPUs with a link each, every learner rank
  sending its FSDP shard straight to the replica GPUs that hold it, all links at once.
"""
import math

import torch

from conf.load import ConfigError
from conf.schema import Config
from model.moe import Attention, MoE, MoECausalLM, RMSNorm, SwiGLU

COMPONENTS = ("embedding", "attention", "dense_ffn", "router", "routed_experts", "shared_experts",
              "norms", "lm_head", "mtp_layers")


def build_meta_model(cfg: Config) -> MoECausalLM:
    """The model with shapes only: nothing is allocated or initialised."""
    with torch.device("meta"):
        return MoECausalLM(cfg.model)


def component_of(model: MoECausalLM, name: str) -> str:
    """The plan component a parameter (by its `named_parameters` name) belongs to."""
    path = name.split(".")
    top_level = {"embed": "embedding", "lm_head": "lm_head", "mtp": "mtp_layers"}
    if path[0] in top_level:
        return top_level[path[0]]
    owners = [model.get_submodule(".".join(path[:i])) for i in range(1, len(path))]
    if any(isinstance(m, Attention) for m in owners):
        return "attention"
    if isinstance(owners[-1], MoE):
        return "router" if path[-1] == "router" else "routed_experts"
    if any(isinstance(m, MoE) for m in owners):
        return "shared_experts"
    if isinstance(owners[-1], RMSNorm):
        return "norms"
    if any(isinstance(m, SwiGLU) for m in owners):
        return "dense_ffn"
    raise ValueError(f"parameter {name} belongs to no plan component: extend model.plan.component_of")


def count_parameters(cfg: Config) -> dict[str, int]:
    """Parameters per component (keys: COMPONENTS), counted on the meta device."""
    model = build_meta_model(cfg)
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        counts[component_of(model, name)] += param.numel()
    return counts


def active_counts(cfg: Config, counts: dict[str, int]) -> dict[str, int]:
    """Parameters per component that one token uses (see the module docstring)."""
    m = cfg.model
    active = {**counts, "mtp_layers": 0}
    active["routed_experts"] = counts["routed_experts"] * m.top_k // m.num_experts
    return active


def expert_parallel_degree(cfg: Config) -> int:
    """`plan.expert_parallel`, or by default the largest degree dividing both the learner
    ranks and the experts (every EP group then holds an equal share of every MoE layer)."""
    ranks, experts = cfg.learner.num, cfg.model.num_experts
    ep = cfg.plan.expert_parallel or math.gcd(ranks, experts)
    if ranks % ep or experts % ep:
        raise ValueError(f"plan.expert_parallel ({ep}) must divide learner.num ({ranks}) "
                         f"and model.num_experts ({experts})")
    return ep


def rank_bytes(cfg: Config, params_per_rank: float) -> dict[str, float]:
    """Parameter, gradient and optimizer-state bytes of one learner rank."""
    p = cfg.plan
    return {"params": params_per_rank, "param_bytes": params_per_rank * p.param_bytes,
            "grad_bytes": params_per_rank * p.grad_bytes,
            "optimizer_bytes": params_per_rank * p.optimizer_bytes_per_param}


def shard_plans(cfg: Config, counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """Bytes per learner rank under FSDP and under FSDP + expert parallelism.

    FSDP shards every parameter over all learner.num = K ranks. FSDP+EP splits each MoE
    layer's routed experts over EP ranks, whole experts per rank, replicated across the
    K / EP expert groups, and FSDP-shards the rest over all K.
    """
    ranks, total = cfg.learner.num, sum(counts.values())
    ep = expert_parallel_degree(cfg)
    routed = counts["routed_experts"]
    return {"FSDP": rank_bytes(cfg, total / ranks),
            f"FSDP+EP{ep}": rank_bytes(cfg, routed / ep + (total - routed) / ranks)}


def weight_sync(cfg: Config, total_params: int) -> dict[str, float]:
    """Bytes and time of publishing one policy version to the generator replicas.

    Each replica receives the whole model at `plan.param_bytes` per parameter. The time
    assumes a pipelined broadcast (each replica on its own `plan.link_gbps` link, all
    in parallel), so it does not grow with the number of replicas, at `plan.bucket_efficiency`
    of the link: the bandwidth of our bucketed broadcast over that of one flat broadcast of
    the same bytes, as bench/weight_sync.py measures it (bench/RESULTS.md).
    """
    replica_bytes = total_params * cfg.plan.param_bytes
    return {"replica_bytes": replica_bytes, "total_bytes": replica_bytes * cfg.generator.num,
            "buckets": math.ceil(replica_bytes / (cfg.comm.bucket_mb * 2**20)),
            "seconds": replica_bytes / link_bytes_per_s(cfg)}


def link_bytes_per_s(cfg: Config) -> float:
    """What one weight-sync link carries: `plan.link_gbps` at `plan.bucket_efficiency`."""
    return cfg.plan.link_gbps * 1e9 / 8 * cfg.plan.bucket_efficiency


def replica_gpus(cfg: Config, replica_bytes: float) -> int:
    """`plan.gpus_per_replica`, or by default the fewest GPUs whose memory holds the replica's
    weights; raises ConfigError when a GPU cannot hold its shard of the weights alone."""
    p = cfg.plan
    gpu_bytes = p.gpu_memory_gb * 1e9
    if p.gpus_per_replica < 0 or gpu_bytes <= 0:
        raise ConfigError(f"plan.gpus_per_replica ({p.gpus_per_replica}) must be >= 0 and plan.gpu_memory_gb "
                          f"({p.gpu_memory_gb:g}) > 0")
    fewest = math.ceil(replica_bytes / gpu_bytes)
    gpus = p.gpus_per_replica or fewest
    if replica_bytes / gpus > gpu_bytes:
        raise ConfigError(f"plan.gpus_per_replica ({gpus}): each replica GPU would hold {_gb(replica_bytes / gpus)} "
                          f"GB of the {_gb(replica_bytes)} GB of weights, more than plan.gpu_memory_gb "
                          f"({p.gpu_memory_gb:g}); the weights need at least {fewest} GPUs per replica")
    return gpus


def sharded_weight_sync(cfg: Config, total_params: int) -> dict[str, float]:
    """Bytes per link and time of one policy version over the sharded point-to-point path.

    Each replica GPU receives replica_bytes / gpus_per_replica over its own link; each of the
    learner.num ranks sends its FSDP shard (replica_bytes / learner.num) to every one of the
    generator.num replicas over its own link. All links run at once, so a version takes the
    slower side. Links run at `link_bytes_per_s`, as in `weight_sync`; no per-bucket latency.
    """
    replica_bytes = total_params * cfg.plan.param_bytes
    gpus = replica_gpus(cfg, replica_bytes)
    receive_bytes, shard_bytes = replica_bytes / gpus, replica_bytes / cfg.learner.num
    send_bytes = shard_bytes * cfg.generator.num
    receive_s, send_s = receive_bytes / link_bytes_per_s(cfg), send_bytes / link_bytes_per_s(cfg)
    return {"gpus_per_replica": gpus, "receive_bytes": receive_bytes, "shard_bytes": shard_bytes,
            "send_bytes": send_bytes, "headroom_bytes": cfg.plan.gpu_memory_gb * 1e9 - receive_bytes,
            "receive_seconds": receive_s, "send_seconds": send_s, "seconds": max(receive_s, send_s)}


def _b(n: float) -> str:
    """A parameter count in B (1e9) or, below a billion, M (1e6)."""
    return f"{n / 1e9:,.3f}B" if n >= 1e9 else f"{n / 1e6:,.3f}M"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f}"


def _parameter_lines(cfg: Config, counts: dict[str, int]) -> list[str]:
    m, active = cfg.model, active_counts(cfg, counts)
    total, active_total = sum(counts.values()), sum(active.values())
    lines = ["parameters (B = 1e9, M = 1e6)",
             f"  total                     {_b(total):>12}  ({total:,})",
             f"  active per token          {_b(active_total):>12}  ({active_total:,}): embedding, attention, "
             f"dense FFNs, routers, shared experts, top-{m.top_k} of {m.num_experts} routed experts, "
             f"norms, lm_head; not MTP",
             f"  active without embedding  {_b(active_total - active['embedding']):>12}",
             f"  {'component':<24}{'total':>13}{'active':>13}"]
    lines += [f"  {name:<24}{_b(counts[name]):>13}{_b(active[name]):>13}" for name in COMPONENTS]
    return lines


def _shard_lines(cfg: Config, counts: dict[str, int]) -> list[str]:
    p = cfg.plan
    lines = [f"learner memory per rank, learner.num={cfg.learner.num} (GB = 1e9 bytes; params "
             f"{p.param_bytes} B, grads {p.grad_bytes} B, optimizer {p.optimizer_bytes_per_param} B per "
             f"parameter; no activations or FSDP padding)",
             f"  {'plan':<12}{'params':>12}{'params GB':>11}{'grads GB':>10}{'optim GB':>10}{'total GB':>10}"]
    for plan, b in shard_plans(cfg, counts).items():
        rank_total = b["param_bytes"] + b["grad_bytes"] + b["optimizer_bytes"]
        lines.append(f"  {plan:<12}{_b(b['params']):>12}{_gb(b['param_bytes']):>11}{_gb(b['grad_bytes']):>10}"
                     f"{_gb(b['optimizer_bytes']):>10}{_gb(rank_total):>10}")
    ep = expert_parallel_degree(cfg)
    lines.append(f"  EP{ep}: each rank holds {cfg.model.num_experts // ep} of the {cfg.model.num_experts} routed "
                 f"experts of every MoE layer; each expert lives on {cfg.learner.num // ep} rank(s); "
                 f"set plan.expert_parallel to change")
    return lines


def _sync_lines(cfg: Config, total_params: int) -> list[str]:
    p, sync = cfg.plan, weight_sync(cfg, total_params)
    return [f"weight sync per policy version ({p.param_bytes} B per parameter), today's path: each generator "
            f"replica receives the whole model through one link",
            f"  per generator replica     {_gb(sync['replica_bytes'])} GB in {sync['buckets']:,} buckets "
            f"of {cfg.comm.bucket_mb:g} MiB (the bytes on each replica's link)",
            f"  {f'all {cfg.generator.num} replicas':<26}{_gb(sync['total_bytes'])} GB",
            f"  projected time            {sync['seconds']:.1f} s at {p.link_gbps:g} Gbit/s per replica x "
            f"bucket efficiency {p.bucket_efficiency:g} (replicas in parallel)"]


def _sharded_sync_lines(cfg: Config, total_params: int) -> list[str]:
    p, today, sync = cfg.plan, weight_sync(cfg, total_params), sharded_weight_sync(cfg, total_params)
    gpus, ranks, replicas = sync["gpus_per_replica"], cfg.learner.num, cfg.generator.num
    binds = ("the receive side binds" if sync["receive_seconds"] >= sync["send_seconds"] else
             f"the send side binds: {replicas} replicas x {gpus} GPUs outnumber the {ranks} learner ranks")
    return [f"sharded point-to-point weight sync per policy version: {replicas} replicas of {gpus} GPUs "
            f"(plan.gpus_per_replica{'' if p.gpus_per_replica else ', auto: the fewest that hold the weights'}); "
            f"each of the {ranks} learner ranks sends its shard straight to the GPUs that hold it; one "
            f"{p.link_gbps:g} Gbit/s link x bucket efficiency {p.bucket_efficiency:g} per GPU and per rank, "
            f"all at once",
            f"  receive link per GPU      {_gb(sync['receive_bytes'])} GB in {sync['receive_seconds']:.2f} s; "
            f"{_gb(sync['headroom_bytes'])} GB of the GPU's {p.gpu_memory_gb:g} GB left beside the weights",
            f"  send link per rank        {_gb(sync['send_bytes'])} GB in {sync['send_seconds']:.2f} s "
            f"({_gb(sync['shard_bytes'])} GB shard x {replicas} replicas)",
            f"  projected time            {sync['seconds']:.2f} s ({binds}; today's path {today['seconds']:.1f} s)"]


def plan_report(cfg: Config) -> str:
    """The printed plan: parameter counts, per-rank learner memory, weight-sync volume and time on
    today's path and the sharded one; raises ConfigError when a replica GPU cannot hold its shard."""
    m, counts = cfg.model, count_parameters(cfg)
    total = sum(counts.values())
    header = (f"plan for model.preset={m.preset}: {m.num_layers} layers ({m.first_k_dense} dense), "
              f"hidden {m.hidden_size}, {m.num_experts} experts top-{m.top_k} + {m.num_shared_experts} shared, "
              f"vocab {m.vocab_size}, {m.num_mtp_layers} MTP layers")
    sections = [[header], _parameter_lines(cfg, counts), _shard_lines(cfg, counts),
                _sync_lines(cfg, total), _sharded_sync_lines(cfg, total)]
    return "\n\n".join("\n".join(lines) for lines in sections)
