"""Equivalence tests of the MoE model: batched experts, KV-cache decoding, expert bias."""
import pytest
import torch
import torch.nn.functional as F

from conf.schema import ModelConfig
from model.engine import GenerationEngine, generate
from model.moe import MoECausalLM, decode_attention


def tiny_model(**overrides) -> MoECausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 20, "hidden_size": 64, "num_layers": 3, "first_k_dense": 1,
                         "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "num_experts": 8,
                         "top_k": 2, "expert_ffn_size": 32, "max_seq_len": 48, "init_std": 0.1,
                         **overrides})
    return MoECausalLM(cfg)


def test_batched_experts_equal_per_token_loop():
    model = tiny_model(num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5)
    moe = model.moe_layers()[0]
    x_ND = torch.randn(40, 64)
    topk_ids, weights = moe.route(x_ND)
    assert torch.allclose(weights.sum(-1), torch.full((40,), 2.5), atol=1e-5)
    batched = moe.experts_batched(x_ND, topk_ids, weights)
    reference = moe.experts_reference(x_ND, topk_ids, weights)
    assert (batched - reference).abs().max() <= 1e-5


def test_group_limited_routing_stays_in_top_groups():
    model = tiny_model(num_experts=8, num_expert_groups=4, topk_groups=1)
    moe = model.moe_layers()[0]
    topk_ids, _ = moe.route(torch.randn(64, 64))
    groups = topk_ids // 2  # 4 groups of 2 experts
    assert (groups[:, 0] == groups[:, 1]).all()


# 3 prompts over 2 slots (a slot is reused; every decode step attends in place, over all slots),
# or over 8 (decode steps over 3 or fewer of them copy their keys out of the cache)
@pytest.mark.parametrize("max_slots", [2, 8])
def test_kv_cache_decode_matches_full_forward(max_slots):
    model = tiny_model().eval()
    prompts = [("a", [1, 5, 6, 7]), ("b", [1, 9, 4]), ("c", [1, 3, 3, 3, 3, 8])]
    engine = GenerationEngine(model, max_slots=max_slots, max_len=48, eos_id=2, pad_id=0,
                              max_new_tokens=12, temperature=1.0, seed=3)
    rollouts = generate(engine, prompts)
    for r in rollouts:
        full = r.prompt_tokens + r.completion_tokens
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([full]))[0], dim=-1)
        P = len(r.prompt_tokens)
        expected = logprobs[P - 1 : len(full) - 1].gather(1, torch.tensor(r.completion_tokens)[:, None])[:, 0]
        assert (expected - torch.tensor(r.behavior_logprobs)).abs().max() <= 1e-5


def test_decode_attention_matches_sdpa_on_the_cache_where_it_lies():
    """The CPU decode path reads a strided slice of a head-major cache ([slots, G, max_len, Dh]) and
    must give what SDPA gives, every query head on its key head, padding keys masked out."""
    torch.manual_seed(0)
    slots, G, H, max_len, Dh, live = 6, 2, 4, 40, 16, 24
    keys, values = torch.randn(slots, G, max_len, Dh), torch.randn(slots, G, max_len, Dh)
    q = torch.randn(slots, 1, H, Dh)
    lengths = torch.tensor([1, 5, 24, 17, 9, 2])
    mask = (torch.arange(live) < lengths[:, None])[:, None, None]
    k, v = keys[:, :, :live], values[:, :, :live]
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(decode_attention(q, k, v, mask), expected.transpose(1, 2), atol=1e-6)

def test_expert_bias_moves_only_in_training():
    model = tiny_model(expert_bias_rate=0.01)
    tokens = torch.randint(3, 20, (4, 10))
    model.eval()
    with torch.no_grad():
        model(tokens)
    model.update_expert_bias()
    assert all(torch.all(m.expert_bias == 0) for m in model.moe_layers())
    model.train()
    model(tokens)
    model.update_expert_bias()
    moe = model.moe_layers()[0]
    assert moe.expert_bias.abs().sum() > 0
    assert moe.expert_load.sum() == 0  # the load counter restarts after each update
