"""IcePop loss and sequence log-probs against hand-computed values.

Inputs are built from the two ratios the loss sees, k = pi_train(theta_old) / pi_infer
and r = pi_theta / pi_train(theta_old), on top of an arbitrary behaviour log-prob, so
every expected number below is arithmetic on k, r and A.
"""
import math

import pytest
import torch

from learner.losses import IcePopParams, icepop_loss, sequence_logprobs

LN2 = math.log(2)
NAN = float("nan")


def logps_from_ratios(k_BT, r_BT, behavior=-1.5):
    """(logp_new, logp_old, logp_behavior) with exp(old - behavior) = k, exp(new - old) = r.

    nan entries of k or r (padding) give nan log-probs there.
    """
    log_k = torch.tensor(k_BT, dtype=torch.float32).log()
    log_r = torch.tensor(r_BT, dtype=torch.float32).log()
    logp_behavior = torch.full_like(log_k, behavior)
    logp_old = logp_behavior + log_k
    logp_new = (logp_old + log_r).requires_grad_()
    return logp_new, logp_old, logp_behavior


def run_loss(k_BT, r_BT, advantages, mask_BT=None, lag_BT=None, **params):
    logp_new, logp_old, logp_behavior = logps_from_ratios(k_BT, r_BT)
    mask = torch.ones_like(logp_old, dtype=torch.bool) if mask_BT is None else torch.tensor(mask_BT).bool()
    lag = None if lag_BT is None else torch.tensor(lag_BT)
    loss, stats = icepop_loss(logp_new, logp_old, logp_behavior, torch.tensor(advantages),
                              mask, IcePopParams(**params), lag_BT=lag)
    return loss, stats, logp_new


# --- IcePop masking -------------------------------------------------------------------

def test_icepop_mask_drops_tokens_outside_bounds_and_weights_inside_by_k():
    # A = 1, r = 1, so each token's surrogate is 1 and its objective is M(k).
    # k = [0.25, 2, 8], alpha 0.5, beta 5 -> M = [0 (below), 2 (weighted by k), 0 (above)]
    # seq_mean: -(0 + 2 + 0) / 3 = -2/3; the two masked tokens still count in |y| = 3
    # (excluding them would give -2/1).
    loss, _, _ = run_loss([[0.25, 2.0, 8.0]], [[1.0, 1.0, 1.0]], [1.0])
    assert loss.item() == pytest.approx(-2 / 3, rel=1e-6)


def test_icepop_bounds_are_inclusive():
    # k = 1 exactly (log k = 0) with alpha = beta = 1 is kept with weight 1; k = 2 is not.
    # loss = -(1 * 1 * A + 0) / 2 with A = 3 -> -1.5
    loss, _, _ = run_loss([[1.0, 2.0]], [[1.0, 1.0]], [3.0], alpha=1.0, beta=1.0)
    assert loss.item() == pytest.approx(-1.5, rel=1e-6)


# --- PPO clipping ----------------------------------------------------------------------

def test_ppo_clipping_on_both_sides():
    # k = 1 everywhere (no IcePop effect), clip 0.2 -> r is clipped to [0.8, 1.2].
    # seq 0, A = +2, r = [1.5, 0.5, 1.1]:
    #   r=1.5: min(3.0, 1.2*2=2.4) = 2.4   (A > 0, r > 1+eps: clipped)
    #   r=0.5: min(1.0, 0.8*2=1.6) = 1.0   (A > 0, r < 1-eps: unclipped)
    #   r=1.1: min(2.2, 2.2)       = 2.2   (inside)
    #   mean = 5.6 / 3
    # seq 1, A = -1, r = [0.5, 1.5, 0.9]:
    #   r=0.5: min(-0.5, 0.8*-1=-0.8) = -0.8   (A < 0, r < 1-eps: clipped)
    #   r=1.5: min(-1.5, 1.2*-1=-1.2) = -1.5   (A < 0, r > 1+eps: unclipped)
    #   r=0.9: -0.9                             (inside)
    #   mean = -3.2 / 3
    # loss = -(5.6/3 - 3.2/3) / 2 = -0.4; clipped term active on 2 of 6 tokens
    loss, stats, _ = run_loss([[1.0] * 3] * 2, [[1.5, 0.5, 1.1], [0.5, 1.5, 0.9]], [2.0, -1.0])
    assert loss.item() == pytest.approx(-0.4, rel=1e-5)
    assert stats["clip_frac"] == pytest.approx(2 / 6)


def test_asymmetric_clip_bounds():
    # clip_low 0.1, clip_high 0.3 -> r clipped to [0.9, 1.3]
    # seq 0, A = +1, r = 1.5: min(1.5, 1.3) = 1.3
    # seq 1, A = -1, r = 0.5: min(-0.5, -0.9) = -0.9
    # loss = -(1.3 - 0.9) / 2 = -0.2
    loss, _, _ = run_loss([[1.0], [1.0]], [[1.5], [0.5]], [1.0, -1.0], clip_low=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx(-0.2, rel=1e-5)


# --- one mixed batch: aggregation, padding, gradient, stats ----------------------------
# B = 2, T = 4; sequence 1 has two padding positions holding nan.
#   seq 0, A = +1:                              seq 1, A = -2:
#   t0  k=2    r=1.1  M=2  min(1.1, 1.1)=1.1  obj  2.2    t0  k=1  r=0.5   M=1  min(-1.0, -1.6)=-1.6 obj -1.6 (clipped)
#   t1  k=0.25 r=1.0  M=0 (below alpha)       obj  0      t1  k=4  r=1.25  M=4  min(-2.5, -2.4)=-2.5 obj -10
#   t2  k=1    r=1.5  M=1  min(1.5, 1.2)=1.2  obj  1.2 (clipped)   t2, t3 padding
#   t3  k=8    r=0.9  M=0 (above beta)        obj  0
#   sum = 3.4, |y_0| = 4                                  sum = -11.6, |y_1| = 2
MIXED_K = [[2.0, 0.25, 1.0, 8.0], [1.0, 4.0, NAN, NAN]]
MIXED_R = [[1.1, 1.0, 1.5, 0.9], [0.5, 1.25, NAN, NAN]]
MIXED_A = [1.0, -2.0]
MIXED_MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]
MIXED_LAG = [[0, 0, 1, 1], [2, 0, 7, 7]]   # 7 only at padding: must not appear


@pytest.mark.parametrize("aggregation, token_budget, expected", [
    ("seq_mean", 0, -(3.4 / 4 - 11.6 / 2) / 2),   # -(0.85 - 5.8) / 2 = 2.475
    ("token_mean", 0, -(3.4 - 11.6) / 6),        # 6 real tokens -> 8.2 / 6
    ("token_budget", 10, -(3.4 - 11.6) / 10),    # Phi = 10 -> 0.82
])
def test_aggregations_exclude_padding(aggregation, token_budget, expected):
    loss, _, _ = run_loss(MIXED_K, MIXED_R, MIXED_A, MIXED_MASK,
                          aggregation=aggregation, token_budget=token_budget)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("aggregation, divisors", [
    ("seq_mean", [[2 * 4] * 4, [2 * 2] * 4]),   # B * |y_i|
    ("token_mean", [[6] * 4, [6] * 4]),         # real tokens in the batch
])
def test_gradient_wrt_new_logprobs(aggregation, divisors):
    # d(M r A)/d logp_new = M r A where the unclipped term is active, 0 where the clipped
    # term is (clamp is flat there) or M = 0; the loss carries a minus sign and the divisor.
    #   seq 0: t0 -2*1.1*1 = -2.2, t1 0 (below alpha), t2 0 (clipped), t3 0 (above beta)
    #   seq 1: t0 0 (clipped), t1 -4*1.25*(-2) = 10, padding 0
    # seq_mean:   -2.2/8 = -0.275, 10/4 = 2.5;  token_mean: -2.2/6, 10/6
    numerators = torch.tensor([[-2.2, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    loss, _, logp_new = run_loss(MIXED_K, MIXED_R, MIXED_A, MIXED_MASK, aggregation=aggregation)
    loss.backward()
    torch.testing.assert_close(logp_new.grad, numerators / torch.tensor(divisors, dtype=torch.float32))


def test_no_gradient_reaches_old_or_behavior_logprobs():
    logp_new, logp_old, logp_behavior = logps_from_ratios([[2.0, 1.0]], [[1.1, 0.9]])
    logp_old.requires_grad_()
    logp_behavior.requires_grad_()
    loss, _ = icepop_loss(logp_new, logp_old, logp_behavior, torch.tensor([1.0]),
                          torch.ones(1, 2, dtype=torch.bool), IcePopParams())
    loss.backward()
    assert logp_old.grad is None and logp_behavior.grad is None
    assert logp_new.grad is not None


def test_stats_over_real_tokens():
    # real k = [2, 0.25, 1, 8, 1, 4] (6 tokens)
    # below alpha: 0.25 -> 1/6; above beta: 8 -> 1/6
    # |log k| = [ln2, 2ln2, 0, 3ln2, 0, 2ln2] -> mean 8 ln2 / 6
    # k - 1 - ln k = [1 - ln2, -0.75 + 2ln2, 0, 7 - 3ln2, 0, 3 - 2ln2] -> sum 10.25 - 4 ln2
    # clipped term active: seq 0 t2, seq 1 t0 -> 2/6
    _, stats, _ = run_loss(MIXED_K, MIXED_R, MIXED_A, MIXED_MASK)
    assert stats["masked_below_alpha_frac"] == pytest.approx(1 / 6)
    assert stats["masked_above_beta_frac"] == pytest.approx(1 / 6)
    assert stats["mean_abs_log_k"] == pytest.approx(8 * LN2 / 6, rel=1e-5)
    assert stats["mismatch_kl"] == pytest.approx((10.25 - 4 * LN2) / 6, rel=1e-5)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert all(isinstance(value, float) for value in stats.values())
    assert not any(key.startswith("lag/") for key in stats)


def test_stats_split_by_lag():
    # lag 0: k = [2, 0.25, 4] -> 3 tokens, masked 1/3, |log k| (ln2 + 2ln2 + 2ln2) / 3,
    #        kl ((1 - ln2) + (-0.75 + 2ln2) + (3 - 2ln2)) / 3 = (3.25 - ln2) / 3
    # lag 1: k = [1, 8]       -> 2 tokens, masked 1/2, |log k| 3ln2 / 2, kl (7 - 3ln2) / 2
    # lag 2: k = [1]          -> 1 token,  masked 0,   |log k| 0,        kl 0
    # lag 7 sits only at padding and must not appear.
    _, stats, _ = run_loss(MIXED_K, MIXED_R, MIXED_A, MIXED_MASK, lag_BT=MIXED_LAG)
    expected = {
        "lag/0/tokens": 3.0, "lag/0/masked_frac": 1 / 3,
        "lag/0/mean_abs_log_k": 5 * LN2 / 3, "lag/0/mismatch_kl": (3.25 - LN2) / 3,
        "lag/1/tokens": 2.0, "lag/1/masked_frac": 1 / 2,
        "lag/1/mean_abs_log_k": 3 * LN2 / 2, "lag/1/mismatch_kl": (7 - 3 * LN2) / 2,
        "lag/2/tokens": 1.0, "lag/2/masked_frac": 0.0,
        "lag/2/mean_abs_log_k": 0.0, "lag/2/mismatch_kl": 0.0,
    }
    lag_stats = {key: value for key, value in stats.items() if key.startswith("lag/")}
    assert lag_stats.keys() == expected.keys()
    for key, value in expected.items():
        assert lag_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# --- validation --------------------------------------------------------------------

def test_params_reject_unknown_aggregation_and_missing_budget():
    with pytest.raises(ValueError, match="aggregation"):
        IcePopParams(aggregation="sum")
    with pytest.raises(ValueError, match="token_budget"):
        IcePopParams(aggregation="token_budget", token_budget=0)
    with pytest.raises(ValueError, match="alpha"):
        IcePopParams(alpha=2.0, beta=1.0)


def test_loss_rejects_mismatched_shapes_and_empty_mask():
    logp_new, logp_old, logp_behavior = logps_from_ratios([[1.0, 1.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="advantages_B"):
        icepop_loss(logp_new, logp_old, logp_behavior, torch.tensor([1.0, 2.0]),
                    torch.ones(1, 2, dtype=torch.bool), IcePopParams())
    with pytest.raises(ValueError, match="mask_BT shape"):
        icepop_loss(logp_new, logp_old, logp_behavior, torch.tensor([1.0]),
                    torch.ones(1, 3, dtype=torch.bool), IcePopParams())
    with pytest.raises(ValueError, match="no real"):
        icepop_loss(logp_new, logp_old, logp_behavior, torch.tensor([1.0]),
                    torch.zeros(1, 2, dtype=torch.bool), IcePopParams())


# --- sequence_logprobs ---------------------------------------------------------------

def test_sequence_logprobs_with_temperature():
    # position 0: logits [0, 2 ln3, 0]; position 1: logits [0, 0, 2 ln2]
    # T = 2: [0, ln3, 0] -> softmax [1, 3, 1] / 5, target 1 -> ln(3/5)
    #        [0, 0, ln2] -> softmax [1, 1, 2] / 4, target 0 -> ln(1/4)
    # T = 1: [1, 9, 1] / 11 -> ln(9/11);  [1, 1, 4] / 6 -> ln(1/6)
    logits_BTV = torch.tensor([[[0.0, 2 * math.log(3), 0.0], [0.0, 0.0, 2 * LN2]]])
    tokens_BT = torch.tensor([[1, 0]])
    torch.testing.assert_close(sequence_logprobs(logits_BTV, tokens_BT, temperature=2.0),
                               torch.tensor([[math.log(3 / 5), math.log(1 / 4)]]))
    torch.testing.assert_close(sequence_logprobs(logits_BTV, tokens_BT),
                               torch.tensor([[math.log(9 / 11), math.log(1 / 6)]]))


def test_sequence_logprobs_upcasts_to_float32_and_matches_manual():
    generator = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(2, 3, 11, generator=generator).to(torch.bfloat16)
    tokens_BT = torch.randint(0, 11, (2, 3), generator=generator)
    logp_BT = sequence_logprobs(logits_BTV, tokens_BT, temperature=0.7)
    assert logp_BT.dtype == torch.float32
    scaled = logits_BTV.double() / 0.7
    manual = scaled.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)
    torch.testing.assert_close(logp_BT.double(), manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(logits_BTV, tokens_BT, temperature=0.0)
