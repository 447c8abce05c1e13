"""Collate scored GRPO groups into padded training tensors.

Shape legend: B sequences, T positions of the shifted sequence (prompt + completion - 1),
N real input positions of all rows, packed row after row (padding left out).
Position t of the inputs predicts token t + 1; only positions whose target is a
completion token are real (`mask_BT`), so prompt and padding carry no loss.
The model runs on the N real positions only (`input_lengths`, the packed layout of
MoECausalLM.hidden_states), so a long-tail batch costs its tokens, not B times its longest.
"""
from dataclasses import dataclass, fields

import numpy as np
import torch

from learner.advantages import grpo_advantages, informative_groups


@dataclass
class TrainBatch:
    inputs_BT: torch.Tensor           # int64 tokens fed to the model
    targets_BT: torch.Tensor          # int64 tokens to score (inputs shifted by one)
    mask_BT: torch.Tensor             # bool, target is a completion token
    behavior_logprobs_BT: torch.Tensor
    versions_BT: torch.Tensor         # int64 policy version each target was sampled under
    advantages_B: torch.Tensor
    rewards_B: torch.Tensor
    replay_BTLK: torch.Tensor | None = None  # routing replay: experts of each input position

    @property
    def num_tokens(self) -> int:
        return int(self.mask_BT.sum())

    @property
    def lengths_B(self) -> torch.Tensor:
        return input_lengths(self.mask_BT)

    def to(self, device: torch.device) -> "TrainBatch":
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrainBatch(**{name: None if value is None else value.to(device) for name, value in moved.items()})


def input_lengths(mask_BT: torch.Tensor) -> torch.Tensor:
    """Real input positions of each row: through its last completion target (P + C - 1), 0 without one."""
    T = mask_BT.shape[1]
    last_B = T - 1 - mask_BT.flip(1).int().argmax(1)
    return torch.where(mask_BT.any(1), last_B + 1, 0)


def packed_mask(mask_BT: torch.Tensor) -> torch.Tensor:
    """mask_BT over the N packed real positions: which of them have a completion target."""
    real_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device) < input_lengths(mask_BT)[:, None]
    return mask_BT[real_BT]


def unpack(values_N_: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """[N, ...] packed real positions -> [B, T, ...], zeros at padding."""
    real_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device) < input_lengths(mask_BT)[:, None]
    return values_N_.new_zeros(*mask_BT.shape, *values_N_.shape[1:]).index_put((real_BT,), values_N_)


def group_rewards(groups) -> torch.Tensor:
    return torch.tensor([[t.reward for t in group] for group in groups], dtype=torch.float32)


def select_informative(groups) -> tuple[list, list]:
    """(groups with unequal rewards, groups whose rewards are all equal and so carry no signal)."""
    keep = informative_groups(group_rewards(groups)).tolist()
    return [g for g, k in zip(groups, keep) if k], [g for g, k in zip(groups, keep) if not k]


def collate(groups, pad_id: int, normalize_std: bool = True) -> TrainBatch:
    advantages_B = grpo_advantages(group_rewards(groups), normalize_std=normalize_std).flatten()
    trajectories = [t for group in groups for t in group]
    T = max(len(t.prompt_tokens) + len(t.completion_tokens) for t in trajectories) - 1
    B = len(trajectories)
    tokens = np.full((B, T + 1), pad_id, dtype=np.int64)
    behavior = np.zeros((B, T), dtype=np.float32)
    versions = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for row, t in enumerate(trajectories):
        P, C = len(t.prompt_tokens), len(t.completion_tokens)
        tokens[row, :P] = t.prompt_tokens
        tokens[row, P : P + C] = t.completion_tokens
        behavior[row, P - 1 : P - 1 + C] = t.behavior_logprobs
        versions[row, P - 1 : P - 1 + C] = t.policy_version
        mask[row, P - 1 : P - 1 + C] = True
    tokens_t = torch.from_numpy(tokens)
    return TrainBatch(inputs_BT=tokens_t[:, :-1], targets_BT=tokens_t[:, 1:],
                      mask_BT=torch.from_numpy(mask), behavior_logprobs_BT=torch.from_numpy(behavior),
                      versions_BT=torch.from_numpy(versions), advantages_B=advantages_B,
                      rewards_B=group_rewards(groups).flatten(), replay_BTLK=_replay(trajectories, T))


def _replay(trajectories, T: int) -> torch.Tensor | None:
    """[B, T, L, K] recorded experts per input position (zeros past a sequence's end), or None."""
    if any(t.routed_experts is None for t in trajectories):
        return None
    _, L, K = trajectories[0].routed_experts.shape
    replay = np.zeros((len(trajectories), T, L, K), dtype=np.int64)
    for row, t in enumerate(trajectories):
        replay[row, : len(t.routed_experts)] = t.routed_experts
    return torch.from_numpy(replay)


def collate_demonstrations(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """(inputs_BT, targets_BT, mask_BT) for supervised warm-up on (prompt, completion) pairs."""
    T = max(len(p) + len(c) for p, c in pairs) - 1
    tokens = np.full((len(pairs), T + 1), pad_id, dtype=np.int64)
    mask = np.zeros((len(pairs), T), dtype=bool)
    for row, (prompt, completion) in enumerate(pairs):
        tokens[row, : len(prompt) + len(completion)] = prompt + completion
        mask[row, len(prompt) - 1 : len(prompt) - 1 + len(completion)] = True
    tokens_t = torch.from_numpy(tokens)
    return tokens_t[:, :-1], tokens_t[:, 1:], torch.from_numpy(mask)
