"""Routing replay (R3) and multi-token prediction in the model."""
import torch

from learner.losses import sequence_logprobs
from model.engine import GenerationEngine, generate
from tests.test_model import tiny_model


def test_replayed_route_uses_the_given_experts_with_router_weights():
    model = tiny_model(num_experts=8, top_k=2, routed_scaling_factor=1.5)
    moe = model.moe_layers()[0]
    x_ND = torch.randn(10, 64)
    replay_NK = torch.randint(0, 8, (10, 2))
    replay_NK[:, 1] = (replay_NK[:, 0] + 1) % 8  # two distinct experts per token
    ids_NK, weights_NK = moe.route(x_ND, replay_NK)
    assert torch.equal(ids_NK, replay_NK)
    scores_NE = torch.sigmoid(x_ND @ moe.router.t())
    picked_NK = scores_NE.gather(1, replay_NK)
    assert torch.allclose(weights_NK, picked_NK / picked_NK.sum(-1, keepdim=True) * 1.5, atol=1e-6)


def test_pi_train_uses_exactly_the_recorded_experts():
    model = tiny_model().eval()
    prompts = [("a", [1, 5, 6, 7]), ("b", [1, 9, 4]), ("c", [1, 3, 3, 3, 3, 8])]
    engine = GenerationEngine(model, max_slots=4, max_len=48, eos_id=2, pad_id=0, max_new_tokens=10,
                              temperature=1.0, seed=5, record_routing=True)
    rollouts = generate(engine, prompts)
    # the learner's router now prefers other experts: only the bias moved, so with the
    # recorded experts the mixing weights, and hence the log-probs, must be unchanged
    for moe in model.moe_layers():
        moe.expert_bias.copy_(torch.randn(8) * 10)
    for r in rollouts:
        full = torch.tensor([r.prompt_tokens + r.completion_tokens])
        inputs, targets, P = full[:, :-1], full[:, 1:], len(r.prompt_tokens)
        recorded = r.routed_experts()[None]
        assert recorded.shape[1] == inputs.shape[1]
        with torch.no_grad():
            free_logits, free_routing = model.forward_routed(inputs)
            replay_logits, replay_routing = model.forward_routed(inputs, replay_BTLK=recorded)
        assert not torch.equal(free_routing, recorded)  # the router alone would have strayed
        assert torch.equal(replay_routing, recorded)
        pi_train = sequence_logprobs(replay_logits, targets)[0, P - 1:]
        assert (pi_train - torch.tensor(r.behavior_logprobs)).abs().max() <= 1e-5


def test_mtp_depths_are_causal_and_trainable():
    model = tiny_model(num_mtp_layers=2)
    tokens = torch.randint(3, 20, (2, 12))
    hidden, _ = model.hidden_states(tokens)
    depth1, depth2 = model.mtp_logits(hidden, tokens)
    assert depth1.shape[1] == 11 and depth2.shape[1] == 10
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 17 + 3
    hidden_changed, _ = model.hidden_states(changed)
    depth1_changed, _ = model.mtp_logits(hidden_changed, changed)
    # depth 1 at position t sees tokens up to t + 1: positions 0..6 cannot see token 8
    assert torch.allclose(depth1[:, :7], depth1_changed[:, :7], atol=1e-6)
    assert not torch.allclose(depth1[:, 7], depth1_changed[:, 7])
    depth1.sum().backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
