"""IcePop policy loss and per-token log-probabilities.

Shape legend: B sequences, T completion positions, V vocabulary.
Log-probabilities per token:
  logp_new      pi_theta, the weights being optimised (carries the gradient);
  logp_old      pi_train under theta_old, the learner's weights before this update;
  logp_behavior pi_infer, what the generator sampled with.
mask_BT marks real completion tokens (True) against padding (False).

IcePop weighs each token by k = pi_train(theta_old) / pi_infer when k lies in
[alpha, beta] and drops it otherwise, so tokens where training and inference
disagree badly (a common case in MoE RL) do not steer the update.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AGGREGATIONS = ("seq_mean", "token_mean", "token_budget")


@dataclass(frozen=True)
class IcePopParams:
    alpha: float = 0.5        # lower bound on k; tokens with k below it are masked
    beta: float = 5.0         # upper bound on k; tokens with k above it are masked
    clip_low: float = 0.2     # PPO clip: r is kept >= 1 - clip_low
    clip_high: float = 0.2    # PPO clip: r is kept <= 1 + clip_high
    aggregation: str = "seq_mean"   # "seq_mean" | "token_mean" | "token_budget"
    token_budget: int = 0     # Phi, the C3PO fixed divisor; used only by "token_budget"

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation ({self.aggregation!r}) must be one of {AGGREGATIONS}")
        if self.aggregation == "token_budget" and self.token_budget <= 0:
            raise ValueError(f"token_budget ({self.token_budget}) must be > 0 with token_budget aggregation")
        if not 0 <= self.alpha <= self.beta:
            raise ValueError(f"need 0 <= alpha ({self.alpha}) <= beta ({self.beta})")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"need 0 <= clip_low ({self.clip_low}) < 1 and clip_high ({self.clip_high}) >= 0")


def sequence_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at the target tokens, in float32.

    tokens_BT are the targets already aligned with logits_BTV (the caller shifts).
    The softmax runs in float32 because bf16 log-probs are too coarse for ratios
    that sit within a few percent of 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    logp_BTV = F.log_softmax(logits_BTV.float() / temperature, dim=-1)
    return logp_BTV.gather(-1, tokens_BT.long().unsqueeze(-1)).squeeze(-1)


def icepop_loss(logp_new_BT: torch.Tensor, logp_old_BT: torch.Tensor,
                logp_behavior_BT: torch.Tensor, advantages_B: torch.Tensor,
                mask_BT: torch.Tensor, params: IcePopParams,
                lag_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """IcePop loss -(aggregate of M(k) * min(r A, clip(r) A)) and its per-step stats.

    "seq_mean" divides each sequence's sum by its count of real tokens, IcePop-masked
    ones included, then averages over all B rows (an all-padding row adds a zero);
    "token_mean" divides the whole sum by the count of real tokens; "token_budget"
    divides it by the fixed Phi. Padding contributes to nothing, neither loss nor stats.
    """
    _check_shapes(logp_new_BT, logp_old_BT, logp_behavior_BT, advantages_B, mask_BT, lag_BT)
    real_BT = mask_BT.bool()
    if not real_BT.any():
        raise ValueError("mask_BT has no real completion tokens")
    # zeroing the log-ratios at padding keeps garbage there (inf, nan) out of the gradient
    log_k_BT = torch.where(real_BT, logp_old_BT - logp_behavior_BT, 0.0).detach()
    k_BT = log_k_BT.exp()
    kept_BT = (k_BT >= params.alpha) & (k_BT <= params.beta)
    weight_BT = torch.where(kept_BT, k_BT, 0.0)

    ratio_BT = torch.where(real_BT, logp_new_BT - logp_old_BT.detach(), 0.0).exp()
    adv_B1 = advantages_B.detach().unsqueeze(1).to(ratio_BT.dtype)
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = ratio_BT.clamp(1 - params.clip_low, 1 + params.clip_high) * adv_B1
    surrogate_BT = torch.minimum(unclipped_BT, clipped_BT)
    objective_BT = torch.where(real_BT, weight_BT * surrogate_BT, 0.0)
    loss = -_aggregate(objective_BT, real_BT, params)

    stats = _mismatch_stats(log_k_BT, real_BT, params)
    stats["clip_frac"] = (clipped_BT < unclipped_BT)[real_BT].double().mean().item()
    if lag_BT is not None:
        stats.update(_stats_by_lag(log_k_BT, real_BT, lag_BT, params))
    return loss, stats


def _aggregate(objective_BT: torch.Tensor, real_BT: torch.Tensor, params: IcePopParams) -> torch.Tensor:
    if params.aggregation == "seq_mean":
        lengths_B = real_BT.sum(dim=1).clamp(min=1)
        return (objective_BT.sum(dim=1) / lengths_B).mean()
    if params.aggregation == "token_mean":
        return objective_BT.sum() / real_BT.sum()
    return objective_BT.sum() / params.token_budget


def _mismatch_stats(log_k_BT: torch.Tensor, real_BT: torch.Tensor,
                   params: IcePopParams) -> dict[str, float]:
    """Training-inference mismatch over the real tokens, from log k = log pi_train - log pi_infer.

    mismatch_kl is the k3 estimator of KL(pi_infer || pi_train) from tokens sampled by
    pi_infer: mean of k - 1 - log k, unbiased and never negative.
    """
    log_k = log_k_BT.detach()[real_BT].double()
    k = log_k.exp()
    return {
        "masked_below_alpha_frac": (k < params.alpha).double().mean().item(),
        "masked_above_beta_frac": (k > params.beta).double().mean().item(),
        "mean_abs_log_k": log_k.abs().mean().item(),
        "mismatch_kl": (k - 1 - log_k).mean().item(),
    }


def _stats_by_lag(log_k_BT: torch.Tensor, real_BT: torch.Tensor, lag_BT: torch.Tensor,
                  params: IcePopParams) -> dict[str, float]:
    """The mismatch stats split by policy lag, under keys "lag/<lag>/<name>"."""
    stats = {}
    for lag in torch.unique(lag_BT[real_BT]).tolist():
        in_lag_BT = real_BT & (lag_BT == lag)
        part = _mismatch_stats(log_k_BT, in_lag_BT, params)
        stats[f"lag/{lag}/tokens"] = float(in_lag_BT.sum().item())
        stats[f"lag/{lag}/masked_frac"] = part["masked_below_alpha_frac"] + part["masked_above_beta_frac"]
        stats[f"lag/{lag}/mean_abs_log_k"] = part["mean_abs_log_k"]
        stats[f"lag/{lag}/mismatch_kl"] = part["mismatch_kl"]
    return stats


def _check_shapes(logp_new_BT, logp_old_BT, logp_behavior_BT, advantages_B, mask_BT, lag_BT) -> None:
    shape = tuple(logp_new_BT.shape)
    named = {"logp_old_BT": logp_old_BT, "logp_behavior_BT": logp_behavior_BT, "mask_BT": mask_BT}
    if lag_BT is not None:
        named["lag_BT"] = lag_BT
    for name, tensor in named.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != logp_new_BT shape {shape}")
    if len(shape) != 2 or tuple(advantages_B.shape) != shape[:1]:
        raise ValueError(f"advantages_B shape {tuple(advantages_B.shape)} must be [B] for logp_new_BT {shape}")
