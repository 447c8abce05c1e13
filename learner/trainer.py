"""One learner shard's optimisation: supervised warm-up steps and IcePop RL steps.

Each RL batch is one optimizer step, so theta_old (the weights before the update)
are exactly the weights of the step's own forward pass: pi_train(theta_old) is the
detached forward, no second pass needed. The policy version counts optimizer steps.

A batch may reach the step in micro-batches (`accumulate`, then `finish_step`): the
learner computes the groups that have arrived while it waits for the rest. Each
micro-batch's loss is backpropagated in its summed form (the aggregate times its count),
so the gradients add up whatever the split; `finish_step` divides by the whole batch's
count, known only once it is all there.

On CUDA the forward runs under bf16 autocast while parameters, gradients and AdamW state
stay float32 (master weights); log-probabilities, IcePop ratios and advantages are float32.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from conf.schema import AlgoConfig, LearnerConfig
from learner.batch import TrainBatch, input_lengths, packed_mask, unpack
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.losses import IcePopParams, icepop_loss, sequence_logprobs
from learner.sharding import all_reduce_expert_load
from learner.staleness import lag_histogram


def icepop_params(algo: AlgoConfig) -> IcePopParams:
    return IcePopParams(alpha=algo.icepop.alpha, beta=algo.icepop.beta, clip_low=algo.clip_low,
                        clip_high=algo.clip_high, aggregation=algo.aggregation,
                        token_budget=algo.token_budget)


class Trainer:
    def __init__(self, model, learner: LearnerConfig, algo: AlgoConfig, temperature: float):
        self.model = model
        self.cfg = learner
        self.params = icepop_params(algo)
        self.temperature = temperature if temperature > 0 else 1.0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learner.lr,
                                           weight_decay=learner.weight_decay)
        self.version = 0

    def _autocast(self):
        """bf16 autocast for the forward on CUDA; float32 throughout on CPU."""
        device = next(self.model.parameters()).device
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def _optimizer_step(self, loss, lr: float) -> float:
        self.discard_gradients()
        loss.backward()
        return self._apply_gradients(lr)

    def _apply_gradients(self, lr: float) -> float:
        """Clip, step and clear the gradients; move the expert bias by the step's expert load."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.discard_gradients()
        all_reduce_expert_load(self.model)
        self.model.update_expert_bias()
        return float(grad_norm)

    def sft_step(self, inputs_BT, targets_BT, mask_BT) -> dict:
        """Cross-entropy on the completion tokens of warm-up demonstrations (+ weighted MTP losses)."""
        self.model.train()
        with self._autocast():  # packed: the model computes the real positions only, the LM head the targets
            hidden_ND, _ = self.model.hidden_states(inputs_BT, lengths_B=input_lengths(mask_BT))
            logits_MV = self.model.logits(hidden_ND[packed_mask(mask_BT)])
            mtp_logits_list = (self.model.mtp_logits(unpack(hidden_ND, mask_BT), inputs_BT)
                               if self.model.cfg.num_mtp_layers else [])
        loss = F.cross_entropy(logits_MV.float(), targets_BT[mask_BT])
        stats = {"sft_loss": loss.item()}
        for depth, mtp_logits in enumerate(mtp_logits_list, start=1):
            mtp_mask = mask_BT[:, depth:]
            if mtp_mask.any():
                mtp_loss = F.cross_entropy(mtp_logits[mtp_mask].float(), targets_BT[:, depth:][mtp_mask])
                loss = loss + self.cfg.mtp_loss_weight * mtp_loss
                stats[f"mtp{depth}_loss"] = mtp_loss.item()
        stats["grad_norm"] = self._optimizer_step(loss, self.cfg.warmup_lr)
        return stats

    def rl_step(self, batch: TrainBatch, loss_scale: float = 1.0) -> dict:
        """One IcePop update on the whole `batch`; the version advances by one.

        `loss_scale` multiplies the loss before backward (sharded learners use it to
        make the gradient average over ranks equal the whole batch's gradient).
        """
        stats = self.accumulate(batch)
        stats["grad_norm"] = self.finish_step(loss_scale / self.aggregation_count(batch))
        return stats

    def accumulate(self, batch: TrainBatch, weight: float = 1.0) -> dict:
        """Add the gradient of `batch`'s summed loss (times `weight`) to the step's; its statistics.

        A rank with nothing to learn passes weight 0: it still joins FSDP's collectives.
        """
        loss, stats = self.rl_loss(batch)
        (loss * (weight * self.aggregation_count(batch))).backward()
        return stats

    def finish_step(self, grad_scale: float) -> float:
        """The optimizer step on the accumulated gradients times `grad_scale` (1 / the batch's
        aggregation count, or a sharded rank's loss_scale over it); the version advances by one.
        Returns the gradient norm before clipping."""
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.mul_(grad_scale)
        grad_norm = self._apply_gradients(self.cfg.lr)
        self.version += 1
        return grad_norm

    def step_loss(self, parts: list[tuple[float, float]], uninformative_count: float = 0.0) -> float:
        """The whole batch's loss from its micro-batches' (loss, aggregation count): their summed
        forms add up, as their gradients do. `uninformative_count`: what the groups left out for
        carrying no signal add to the divisor (their loss is zero)."""
        summed = sum(loss * count for loss, count in parts)
        if self.params.aggregation == "token_budget":
            return summed
        return summed / (sum(count for _, count in parts) + uninformative_count)

    def discard_gradients(self) -> None:
        """Forget what `accumulate` added since the last step (a batch that will not be trained)."""
        self.optimizer.zero_grad(set_to_none=True)

    def rl_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict]:
        """The IcePop loss of `batch` under the current weights, and its statistics."""
        self.model.train()
        with self._autocast():  # packed: the model computes the real positions only, the LM head the targets
            hidden_ND, _ = self.model.hidden_states(batch.inputs_BT, replay_BTLK=batch.replay_BTLK,
                                                    lengths_B=batch.lengths_B)
            logits_MV = self.model.logits(hidden_ND[packed_mask(batch.mask_BT)])
        logp_new_M = sequence_logprobs(logits_MV, batch.targets_BT[batch.mask_BT], self.temperature)
        logp_new_BT = logp_new_M.new_zeros(batch.mask_BT.shape).masked_scatter(batch.mask_BT, logp_new_M)
        lag_BT = self.version - batch.versions_BT
        loss, stats = icepop_loss(logp_new_BT, logp_new_BT.detach(), batch.behavior_logprobs_BT,
                                  batch.advantages_B, batch.mask_BT, self.params, lag_BT=lag_BT)
        stats["loss"] = loss.item()
        stats["lag_histogram"] = lag_histogram(lag_BT, batch.mask_BT)
        stats["trained_tokens"] = batch.num_tokens
        return loss, stats

    def aggregation_count(self, batch: TrainBatch) -> int:
        """What the loss aggregation divides by, on this batch (1 for the fixed token budget)."""
        return {"seq_mean": batch.mask_BT.shape[0], "token_mean": batch.num_tokens,
                "token_budget": 1}[self.params.aggregation]

    def uninformative_count(self, groups: list) -> int:
        """What `groups`, left out of the forward pass for carrying no signal (rewards all equal,
        so advantages and loss zero), add to the aggregation's divisor. Counted, they leave the
        gradient as it would be had they been computed: the filter only saves compute. Nothing
        under the fixed token budget, whose divisor Phi does not depend on the batch."""
        completions = [t for group in groups for t in group]
        return {"seq_mean": len(completions), "token_mean": sum(len(t.completion_tokens) for t in completions),
                "token_budget": 0}[self.params.aggregation]

    def save(self, directory) -> None:
        save_checkpoint(directory, self.model, self.optimizer, {"version": self.version})

    def load(self, directory) -> None:
        self.discard_gradients()
        self.version = load_checkpoint(directory, self.model, self.optimizer, {"version": 0})["version"]
