"""Packed training (the model computes only the real positions of a padded batch) equals padded training."""
import numpy as np
import pytest
import torch

from comm.wire import Trajectory
from conf.schema import AlgoConfig, LearnerConfig
from learner.batch import collate, collate_demonstrations, input_lengths
from learner.losses import icepop_loss, sequence_logprobs
from learner.trainer import Trainer
from model.moe import LENGTH_BLOCK, Layout
from tests.test_model import tiny_model


def long_tail_groups(replay: bool, num_groups: int = 3, group_size: int = 4) -> list[list[Trajectory]]:
    """Groups whose completions range from 1 to 20 tokens, so most rows are mostly padding."""
    rng = np.random.default_rng(7)
    groups = []
    for g in range(num_groups):
        prompt = rng.integers(3, 20, int(rng.integers(2, 6)), dtype=np.int32)
        group = []
        for i in range(group_size):
            length = int(rng.choice([1, 3, 20]))
            positions = len(prompt) + length - 1
            routed = np.stack([rng.permutation(8)[:2] for _ in range(positions * 2)]).reshape(positions, 2, 2)
            group.append(Trajectory(
                uid=f"{g}-{i}", prompt_uid=str(g), group=i, prompt_tokens=prompt,
                completion_tokens=rng.integers(3, 20, length, dtype=np.int32),
                behavior_logprobs=-rng.uniform(2.0, 3.5, length).astype(np.float32),
                policy_version=np.zeros(length, dtype=np.int32), finish_reason="stop", reward=float(i % 2),
                routed_experts=routed.astype(np.int16) if replay else None))
        groups.append(group)
    return groups


def make_trainer(aggregation: str, **model_overrides) -> Trainer:
    model = tiny_model(**model_overrides)
    return Trainer(model, LearnerConfig(), AlgoConfig(aggregation=aggregation, token_budget=64), temperature=0.9)


def padded_rl_loss(trainer: Trainer, batch):
    """The IcePop loss computed over every padded position: the reference for the packed rl_loss."""
    trainer.model.train()
    logits_BTV = trainer.model(batch.inputs_BT, replay_BTLK=batch.replay_BTLK)
    logp_new_BT = sequence_logprobs(logits_BTV, batch.targets_BT, trainer.temperature)
    return icepop_loss(logp_new_BT, logp_new_BT.detach(), batch.behavior_logprobs_BT, batch.advantages_B,
                       batch.mask_BT, trainer.params, lag_BT=trainer.version - batch.versions_BT)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_input_lengths_end_at_the_last_completion_target():
    mask_BT = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert input_lengths(mask_BT).tolist() == [4, 5, 0]


def test_attention_takes_rows_of_about_one_length_together():
    lengths_B = torch.tensor([3, 20, 0, 17, 16, 40])
    layout = Layout(len(lengths_B), 40, "cpu", lengths_B)
    x_N = torch.arange(int(lengths_B.sum())).float()
    batches = layout.row_batches(x_N)
    assert [tuple(batch.shape) for batch in batches] == [(2, LENGTH_BLOCK), (2, 2 * LENGTH_BLOCK), (1, 3 * LENGTH_BLOCK)]
    starts_B = (lengths_B.cumsum(0) - lengths_B).tolist()
    for batch, rows in zip(batches, [[0, 4], [1, 3], [5]]):  # the empty row 2 is in none
        for row_tokens, row in zip(batch, rows):
            real = torch.arange(starts_B[row], starts_B[row] + int(lengths_B[row])).float()
            assert torch.equal(row_tokens[: len(real)], real)
            assert (row_tokens[len(real):] == real[-1]).all()  # padded with its last token, after it
    assert torch.equal(layout.from_row_batches(batches), x_N)


@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "token_budget"])
def test_packed_rl_loss_equals_padded(aggregation, replay):
    trainer = make_trainer(aggregation)
    batch = collate(long_tail_groups(replay), pad_id=0)
    assert (batch.replay_BTLK is not None) == replay
    assert batch.lengths_B.sum() < 0.6 * batch.inputs_BT.numel()  # mostly padding: packing matters
    loss, stats = trainer.rl_loss(batch)
    loss.backward()
    packed_grads = gradients(trainer.model)
    reference, reference_stats = padded_rl_loss(trainer, batch)
    reference.backward()
    padded_grads = gradients(trainer.model)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    for name, value in reference_stats.items():
        assert stats[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        relative = (packed_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert relative <= 1e-5, (name, float(relative))


def test_packed_sft_step_equals_padded_cross_entropy():
    pairs = [([1, 5, 6], [7, 8]), ([1, 9], [4, 4, 4, 4, 4, 4, 4, 2]), ([1, 3, 3, 3, 8], [2])]
    inputs_BT, targets_BT, mask_BT = collate_demonstrations(pairs, pad_id=0)
    trainer = make_trainer("seq_mean", num_mtp_layers=1)
    with torch.no_grad():
        hidden_BTD, _ = trainer.model.train().hidden_states(inputs_BT)
        logits_BTV = trainer.model.logits(hidden_BTD)
        (mtp_logits_BTV,) = trainer.model.mtp_logits(hidden_BTD, inputs_BT)
    expected = torch.nn.functional.cross_entropy(logits_BTV[mask_BT], targets_BT[mask_BT])
    mtp_mask_BT = mask_BT[:, 1:]
    expected_mtp = torch.nn.functional.cross_entropy(mtp_logits_BTV[mtp_mask_BT], targets_BT[:, 1:][mtp_mask_BT])
    stats = trainer.sft_step(inputs_BT, targets_BT, mask_BT)
    assert stats["sft_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert stats["mtp1_loss"] == pytest.approx(expected_mtp.item(), rel=1e-5)
