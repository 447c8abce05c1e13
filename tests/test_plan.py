"""The plan (run.mode=plan): meta-device parameter counts, shard bytes and the printed report."""
import re
import subprocess
import sys

import pytest
import torch

from conf.load import ConfigError, load_config
from conf.schema import Config, ModelConfig
from model.moe import MoECausalLM
from model.plan import active_counts, count_parameters, shard_plans, sharded_weight_sync, weight_sync
from tests.conftest import REPO_ROOT

TINY = dict(vocab_size=20, hidden_size=64, num_layers=3, first_k_dense=1, num_heads=4, num_kv_heads=2,
            head_dim=16, dense_ffn_size=256, num_experts=8, top_k=2, expert_ffn_size=32, num_shared_experts=1)


def tiny_config(**overrides) -> Config:
    return Config(model=ModelConfig(**{**TINY, **overrides}))


def test_ring_1t_counts_are_in_range():
    cfg = load_config(["model=ring_1t", "run.mode=plan"])
    counts = count_parameters(cfg)
    assert 0.99e12 <= sum(counts.values()) <= 1.01e12
    assert 50e9 <= sum(active_counts(cfg, counts).values()) <= 52e9


@pytest.mark.parametrize("mtp_layers", [0, 1])
def test_meta_count_equals_materialised_model(mtp_layers):
    cfg = tiny_config(num_mtp_layers=mtp_layers)
    torch.manual_seed(0)
    assert sum(count_parameters(cfg).values()) == MoECausalLM(cfg.model).count_parameters()


def test_tiny_counts_by_hand():
    counts = count_parameters(tiny_config())
    D, V, F_dense, E, F_expert = 64, 20, 256, 8, 32
    attention = D * 4 * 16 + 2 * D * 2 * 16 + 4 * 16 * D + 2 * 16  # q, k+v, o, q/k norms = 12,320
    expected = {"embedding": V * D,                       # 1,280
                "attention": 3 * attention,               # 36,960
                "dense_ffn": 3 * D * F_dense,             # 1 dense block: 49,152
                "router": 2 * E * D,                      # 2 MoE blocks: 1,024
                "routed_experts": 2 * E * 3 * D * F_expert,  # 98,304
                "shared_experts": 2 * 3 * D * F_expert,   # 12,288
                "norms": 3 * 2 * D + D,                   # 2 per block + final: 448
                "lm_head": V * D,                         # 1,280
                "mtp_layers": 0}
    assert counts == expected
    assert sum(counts.values()) == 200_736
    # active: every count but routed experts, of which top-2 of 8: 98,304 * 2/8 = 24,576
    assert sum(active_counts(tiny_config(), counts).values()) == 200_736 - 98_304 + 24_576


def test_fsdp_bytes_per_rank_are_total_over_ranks():
    cfg = tiny_config()
    cfg.learner.num = 4
    counts = count_parameters(cfg)
    total = sum(counts.values())
    fsdp = shard_plans(cfg, counts)["FSDP"]
    assert fsdp["param_bytes"] == total * cfg.plan.param_bytes / 4
    assert fsdp["grad_bytes"] == total * cfg.plan.grad_bytes / 4
    assert fsdp["optimizer_bytes"] == total * cfg.plan.optimizer_bytes_per_param / 4


def test_expert_parallel_keeps_whole_experts_per_rank():
    cfg = tiny_config()
    cfg.learner.num, cfg.plan.expert_parallel = 4, 2
    counts = count_parameters(cfg)
    routed, total = counts["routed_experts"], sum(counts.values())
    ep = shard_plans(cfg, counts)["FSDP+EP2"]
    assert ep["params"] == routed / 2 + (total - routed) / 4
    cfg.plan.expert_parallel = 3
    with pytest.raises(ValueError, match=r"plan\.expert_parallel \(3\)"):
        shard_plans(cfg, counts)


def test_weight_sync_time_from_link_and_efficiency():
    cfg = tiny_config()
    cfg.generator.num, cfg.plan.link_gbps, cfg.plan.bucket_efficiency = 4, 8.0, 0.5
    sync = weight_sync(cfg, total_params=1_000_000)
    assert sync["replica_bytes"] == 2_000_000 and sync["total_bytes"] == 8_000_000
    assert sync["seconds"] == pytest.approx(2_000_000 / (8e9 / 8 * 0.5))


def sharded_config(gpus_per_replica: int) -> Config:
    """Links of 8 Gbit/s at efficiency 0.5 (5e8 B/s), replica GPUs of 1.2 MB, 4 learner ranks, 3 replicas."""
    cfg = tiny_config()
    cfg.learner.num, cfg.generator.num = 4, 3
    cfg.plan.link_gbps, cfg.plan.bucket_efficiency, cfg.plan.gpu_memory_gb = 8.0, 0.5, 0.0012
    cfg.plan.gpus_per_replica = gpus_per_replica
    return cfg


def test_sharded_sync_by_hand():
    # 1M parameters at 2 B: 2 MB per replica, over 2 GPUs: 1 MB per receive link in 1e6 / 5e8 = 2 ms;
    # each of 4 learner ranks holds 0.5 MB and sends it to 3 replicas: 1.5 MB per send link in 3 ms
    sync = sharded_weight_sync(sharded_config(gpus_per_replica=2), total_params=1_000_000)
    assert sync["gpus_per_replica"] == 2
    assert sync["receive_bytes"] == 1_000_000 and sync["shard_bytes"] == 500_000
    assert sync["send_bytes"] == 1_500_000
    assert sync["headroom_bytes"] == pytest.approx(200_000)  # 1.2 MB GPU - 1 MB shard
    assert sync["receive_seconds"] == pytest.approx(0.002) and sync["send_seconds"] == pytest.approx(0.003)
    assert sync["seconds"] == pytest.approx(0.003)  # the send side binds
    one_replica = sharded_config(gpus_per_replica=2)
    one_replica.generator.num = 1  # 0.5 MB per send link in 1 ms: now the receive side binds
    assert sharded_weight_sync(one_replica, total_params=1_000_000)["seconds"] == pytest.approx(0.002)
    # auto: 2 MB of weights need ceil(2 / 1.2) = 2 GPUs of 1.2 MB
    assert sharded_weight_sync(sharded_config(gpus_per_replica=0), total_params=1_000_000)["gpus_per_replica"] == 2


def test_sharded_sync_refuses_a_replica_too_small_for_its_shard():
    with pytest.raises(ConfigError, match=r"plan\.gpus_per_replica \(1\).*at least 2 GPUs per replica"):
        sharded_weight_sync(sharded_config(gpus_per_replica=1), total_params=1_000_000)
    with pytest.raises(ConfigError, match=r"plan\.gpus_per_replica \(-1\) must be >= 0"):
        sharded_weight_sync(sharded_config(gpus_per_replica=-1), total_params=1_000_000)


def test_ring_1t_sharded_sync_within_six_seconds():
    # 256 learner GPUs, 16 replicas of 16 H200s (141 GB), 400 Gbit/s links: published systems sync
    # a 1T version in about 6 s (1.3 s with RDMA point-to-point)
    cfg = load_config(["model=ring_1t", "run.mode=plan", "learner.num=256", "generator.num=16",
                       "plan.gpus_per_replica=16"])
    total = sum(count_parameters(cfg).values())
    sync = sharded_weight_sync(cfg, total)
    assert sync["receive_bytes"] == total * 2 / 16 and sync["send_bytes"] == total * 2 / 256 * 16
    assert sync["seconds"] == pytest.approx(total * 2 / 16 / (400e9 / 8 * cfg.plan.bucket_efficiency))
    assert sync["seconds"] <= 6.0
    assert 120e9 <= sync["receive_bytes"] <= 141e9 - 10e9  # the shard fits with room left for the KV cache
    cfg.plan.gpus_per_replica = 14  # 2 TB over 14 GPUs: 142.8 GB each
    with pytest.raises(ConfigError, match=r"plan\.gpus_per_replica \(14\).*at least 15 GPUs per replica"):
        sharded_weight_sync(cfg, total)


def test_plan_mode_refuses_a_replica_too_small_in_one_line():
    result = subprocess.run([sys.executable, "run.py", "model=ring_1t", "run.mode=plan", "learner.num=256",
                             "plan.gpus_per_replica=14"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: plan.gpus_per_replica (14): each replica GPU would hold 142.82 GB of the 1,999.41 GB of "
        "weights, more than plan.gpu_memory_gb (141); the weights need at least 15 GPUs per replica"]


def test_plan_mode_prints_totals_without_ray():
    result = subprocess.run([sys.executable, "run.py", "model=ring_1t", "run.mode=plan", "learner.num=256",
                             "generator.num=64"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^  total +999\.705B", result.stdout, re.MULTILINE)
    assert re.search(r"^  active per token +51\.054B", result.stdout, re.MULTILINE)
    assert "all 64 replicas" in result.stdout
    assert "Ray" not in result.stdout + result.stderr
    # the sync time uses the measured bucket efficiency (plan.bucket_efficiency's default)
    replica_gb = re.search(r"^  per generator replica +([\d,.]+) GB", result.stdout, re.MULTILINE).group(1)
    projected = re.search(r"^  projected time +([\d.]+) s at 400 Gbit/s per replica x bucket efficiency ([\d.]+) ",
                          result.stdout, re.MULTILINE)
    efficiency = Config().plan.bucket_efficiency
    assert float(projected.group(2)) == efficiency
    assert float(projected.group(1)) == pytest.approx(float(replica_gb.replace(",", "")) / (400 / 8 * efficiency),
                                                      abs=0.05)
    # the sharded path: 15 GPUs per replica by default (the fewest of 141 GB that hold 2 TB); 64 replicas
    # x 15 GPUs outnumber the 256 learner ranks, so each rank's link carries its 7.81 GB shard 64 times
    sharded = re.search(r"^  send link per rank +([\d,.]+) GB in ([\d.]+) s \(7\.81 GB shard x 64 replicas\)",
                        result.stdout, re.MULTILINE)
    assert float(sharded.group(2)) == pytest.approx(float(sharded.group(1).replace(",", "")) / (400 / 8 * efficiency),
                                                    abs=0.01)
    assert re.search(r"^  projected time +11\.36 s \(the send side binds", result.stdout, re.MULTILINE)


def test_unknown_run_mode_is_rejected():
    with pytest.raises(ValueError, match=r"run\.mode \(serve\) must be one of \('train', 'plan', 'eval'\)"):
        load_config(["run.mode=serve"])
