"""Group-relative advantages (GRPO).

Shape legend: N prompts (groups), G completions per prompt.

The standard deviation is the sample (unbiased, divide by G - 1) one, as
`torch.std` computes by default and as GRPO and verl use. It is undefined for
a single completion, so groups need G >= 2.
"""
import torch


def grpo_advantages(rewards_NG: torch.Tensor, eps: float = 1e-6,
                    normalize_std: bool = True) -> torch.Tensor:
    """A_i = (R_i - mean(R)) / (std(R) + eps) within each group (row).

    With normalize_std=False the advantage is only centred: R_i - mean(R).
    A group whose rewards are all equal gets zero advantages in both modes.
    """
    if rewards_NG.dim() != 2 or rewards_NG.shape[1] < 2:
        raise ValueError(f"rewards_NG must be [N, G] with G >= 2, got shape {tuple(rewards_NG.shape)}")
    rewards_NG = rewards_NG.float()
    centred_NG = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred_NG
    return centred_NG / (rewards_NG.std(dim=1, unbiased=True, keepdim=True) + eps)


def informative_groups(rewards_NG: torch.Tensor) -> torch.Tensor:
    """Bool [N]: False for groups whose rewards are all equal (zero advantage, no signal)."""
    if rewards_NG.dim() != 2:
        raise ValueError(f"rewards_NG must be [N, G], got shape {tuple(rewards_NG.shape)}")
    return (rewards_NG != rewards_NG[:, :1]).any(dim=1)
