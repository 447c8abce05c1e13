"""GRPO advantages against hand-computed values."""
import math

import pytest
import torch

from learner.advantages import grpo_advantages, informative_groups

REWARDS_NG = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                           [0.0, 1.0, 2.0, 3.0]])


def test_std_normalised_advantages_use_sample_std():
    # row 0: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25],
    #        sum of squares 0.5625 + 3 * 0.0625 = 0.75, sample var 0.75 / 3 = 0.25, std 0.5
    #        -> A = [1.5, -0.5, -0.5, -0.5]
    # row 1: mean 1.5, deviations [-1.5, -0.5, 0.5, 1.5], sum of squares 5,
    #        sample var 5 / 3, std sqrt(5/3) -> A = deviations * sqrt(3/5)
    s = math.sqrt(3 / 5)
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5],
                             [-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s]])
    torch.testing.assert_close(grpo_advantages(REWARDS_NG), expected, rtol=1e-5, atol=1e-5)


def test_eps_is_added_to_std():
    # row 0 again: std 0.5, eps 0.5 -> A_0 = 0.75 / (0.5 + 0.5) = 0.75, others -0.25
    advantages = grpo_advantages(REWARDS_NG[:1], eps=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_centred_only_without_std_normalisation():
    # R - mean: row 0 mean 0.25, row 1 mean 1.5
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25],
                             [-1.5, -0.5, 0.5, 1.5]])
    torch.testing.assert_close(grpo_advantages(REWARDS_NG, normalize_std=False), expected)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_all_equal_group_has_zero_advantage_and_no_signal(normalize_std):
    rewards_NG = torch.tensor([[0.7, 0.7, 0.7, 0.7],
                               [1.0, 0.0, 0.0, 0.0]])
    advantages = grpo_advantages(rewards_NG, normalize_std=normalize_std)
    assert torch.equal(advantages[0], torch.zeros(4))
    assert informative_groups(rewards_NG).tolist() == [False, True]


def test_informative_groups():
    rewards_NG = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [2.0, 1.0, 1.0]])
    assert informative_groups(rewards_NG).tolist() == [False, False, True, True]


def test_single_completion_groups_are_rejected():
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.tensor([[1.0], [0.0]]))
