"""Generation engine: in-flight weight updates and paused-then-resumed rollouts (C3PO++)."""
import pytest
import torch

from model.engine import GenerationEngine, generate
from tests.test_model import tiny_model

PROMPTS = [("a", [1, 5, 6, 7]), ("b", [1, 9, 4]), ("c", [1, 3, 3, 3, 3, 8])]


def make_engine(model, temperature=1.0, seed=3, max_new_tokens=12, eos_id=2):
    return GenerationEngine(model, max_slots=4, max_len=48, eos_id=eos_id, pad_id=0,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def perturbed_state(model, scale=0.05):
    torch.manual_seed(11)
    return {name: t + scale * torch.randn_like(t) if t.is_floating_point() else t
            for name, t in model.state_dict().items()}


def greedy_engine_after(model, steps: int) -> tuple[GenerationEngine, dict]:
    """A greedy engine that has decoded PROMPTS for `steps` steps, and the rollouts finished by then."""
    engine = make_engine(model, temperature=0.0)
    for uid, prompt in PROMPTS:
        engine.add(uid, prompt)
    done = {}
    for _ in range(steps):
        done.update({r.uid: r for r in engine.step()})
    return engine, done


def full_forward_logprobs(model, rollout, start: int):
    """Log-probs of the completion tokens from index `start`, by one full forward."""
    full = torch.tensor([rollout.prompt_tokens + rollout.completion_tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(full)[0], dim=-1)
    P = len(rollout.prompt_tokens)
    targets = torch.tensor(rollout.completion_tokens[start:])
    return logprobs[P - 1 + start : P - 1 + len(rollout.completion_tokens)].gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("refresh", ["keep", "recompute"])
def test_in_flight_update_switches_versions_exactly_at_the_switch(refresh):
    model = tiny_model().eval()
    engine = make_engine(model, max_new_tokens=10, eos_id=-1)  # no EOS: every rollout runs 10 tokens
    for uid, prompt in PROMPTS:
        engine.add(uid, prompt)
    for _ in range(4):
        assert engine.step() == []
    engine.load_weights(perturbed_state(model), version=1)
    if refresh == "recompute":
        engine.recompute_cache()
    finished = []
    while engine.num_active:
        finished += engine.step()
    assert len(finished) == 3
    for r in finished:
        assert r.policy_versions == [0] * 4 + [1] * 6
        after_switch = full_forward_logprobs(model, r, start=4)
        error = (after_switch - torch.tensor(r.behavior_logprobs[4:])).abs().max()
        if refresh == "recompute":  # every key/value was rebuilt under the new weights
            assert error <= 1e-5
        else:  # the cache still holds keys/values of the old weights for the first positions
            assert error > 1e-5


def test_paused_then_resumed_rollout_continues_the_same_sequence():
    model = tiny_model().eval()
    uninterrupted = generate(make_engine(model, temperature=0.0), PROMPTS)
    engine, done = greedy_engine_after(model, steps=3)
    paused = engine.pause_all()
    assert engine.free_slots == 4 and all(r.pauses == 1 for r in paused)
    for r in paused:
        engine.add_rollout(r)
    while engine.num_active:
        done.update({r.uid: r for r in engine.step()})
    for expected in uninterrupted:
        resumed = done[expected.uid]
        assert resumed.completion_tokens == expected.completion_tokens
        assert resumed.behavior_logprobs == pytest.approx(expected.behavior_logprobs, abs=1e-5)


def test_cut_rollouts_keep_their_slots_and_kv_and_evicted_ones_free_theirs():
    """C3PO++ with the KV kept: a round's end counts a cut and nothing is fed again; an evicted
    rollout (its group purged) leaves its slot and decodes no more."""
    model = tiny_model().eval()
    reference = make_engine(model, temperature=0.0)
    uninterrupted = {r.uid: r for r in generate(reference, PROMPTS)}
    engine, done = greedy_engine_after(model, steps=3)
    cut = engine.cut_all()
    assert {r.uid for r in cut} == set(uninterrupted) - set(done) and all(r.pauses == 1 for r in cut)
    assert engine.free_slots == 4 - len(cut)
    purged, kept = cut[0], [r.uid for r in cut[1:]]
    assert kept  # the test needs one of each
    engine.evict([purged])
    assert engine.free_slots == 4 - len(cut) + 1 and purged.slot == -1
    while engine.num_active:
        done.update({r.uid: r for r in engine.step()})
    assert purged.uid not in done
    assert len(purged.completion_tokens) < len(uninterrupted[purged.uid].completion_tokens)
    for uid in kept:
        assert done[uid].completion_tokens == uninterrupted[uid].completion_tokens
        assert done[uid].behavior_logprobs == pytest.approx(uninterrupted[uid].behavior_logprobs, abs=1e-5)
    assert engine.model_flops < reference.model_flops  # nothing fed again, and the evicted one stopped early
