"""A Ling-2.0 (BailingMoeV2) style Mixture-of-Experts causal LM, in one plain file.

Shape legend for tensor names:
  B batch rows, T new tokens per row, L key/value positions (cache length),
  D hidden size, H query heads, G key/value heads, Dh head dim,
  E routed experts, K experts per token, F FFN hidden size, N flattened tokens (B*T).

Blocks: RMSNorm -> grouped-query attention with per-head QK RMSNorm and partial
RoPE -> RMSNorm -> FFN, where the first `first_k_dense` blocks use a dense SwiGLU
FFN and the rest a MoE: sigmoid router scores in fp32, an aux-loss-free per-expert
bias used only to pick experts, group-limited top-k, renormalised top-k weights
times a routed scaling factor, plus shared experts.
"""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from conf.schema import ModelConfig


def profiled(name: str):
    """A `ringrl::<name>` range for torch's profiler (bench/mfu.py splits time by them); a no-op
    context when no profiler runs, so a decode step pays nothing for the labels."""
    return record_function(f"ringrl::{name}") if torch.autograd._profiler_enabled() else nullcontext()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class PartialRotary(nn.Module):
    """RoPE on the first `rotary_fraction` of each head's dims (Llama-style halves)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rot_dim = int(cfg.head_dim * cfg.rotary_fraction) // 2 * 2
        exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.float32) / self.rot_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_base ** exponents), persistent=False)

    def forward(self, x_BTHDh, positions_BT):
        angles_BTR = positions_BT.float()[..., None] * self.inv_freq
        cos = torch.cat([angles_BTR.cos()] * 2, dim=-1)[:, :, None, :].to(x_BTHDh.dtype)
        sin = torch.cat([angles_BTR.sin()] * 2, dim=-1)[:, :, None, :].to(x_BTHDh.dtype)
        rot, passthrough = x_BTHDh[..., : self.rot_dim], x_BTHDh[..., self.rot_dim:]
        first, second = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
        return torch.cat([rotated, passthrough], dim=-1)


class KVCache:
    """Key/value buffers for `slots` sequences of up to `max_len` tokens each.

    Buffers are [layers, slots, max_len, G, Dh]; `lengths[s]` counts the valid
    positions of slot s. The model writes new keys at `lengths[slot] + t`; the caller
    advances `lengths` once it knows how many of the new tokens were real.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        shape = (cfg.num_layers, slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.rotary = PartialRotary(cfg)

    def forward(self, x_BTD, positions_BT, cache: KVCache | None, slots_B):
        with profiled("attention"):
            return self._forward(x_BTD, positions_BT, cache, slots_B)

    def _forward(self, x_BTD, positions_BT, cache: KVCache | None, slots_B):
        B, T, _ = x_BTD.shape
        q = self.q_norm(self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(q, positions_BT), self.rotary(k, positions_BT)
        if cache is None:
            out = self._attend(q, k, v, mask=None)
        else:
            keys, values = self._write_cache(cache, k, v, positions_BT, slots_B)
            key_positions_L = torch.arange(cache.max_len, device=x_BTD.device)
            mask_BTL = key_positions_L[None, None, :] <= positions_BT[:, :, None]
            out = self._attend(q, keys, values, mask=mask_BTL[:, None])
        return self.o_proj(out.reshape(B, T, -1))

    def _write_cache(self, cache, k_BTGDh, v_BTGDh, positions_BT, slots_B):
        layer_keys, layer_values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        layer_keys[slots_B[:, None], positions_BT] = k_BTGDh.detach()
        layer_values[slots_B[:, None], positions_BT] = v_BTGDh.detach()
        return layer_keys[slots_B], layer_values[slots_B]

    def _attend(self, q_BTHDh, k_BLGDh, v_BLGDh, mask):
        repeat = self.num_heads // self.num_kv_heads
        q = q_BTHDh.transpose(1, 2)
        k = k_BLGDh.transpose(1, 2).repeat_interleave(repeat, dim=1)
        v = v_BLGDh.transpose(1, 2).repeat_interleave(repeat, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts (stacked weights) plus shared experts.

    The expert bias is a buffer: it only shifts which experts are picked, never the
    mixing weights, and it moves with expert load during training only
    (`update_expert_bias`), the aux-loss-free balancing of DeepSeek-V3 / Ling-2.0.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, F_ = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size
        self.router = nn.Parameter(torch.empty(E, D))
        self.gate_proj = nn.Parameter(torch.empty(E, F_, D))
        self.up_proj = nn.Parameter(torch.empty(E, F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))
        self.shared = SwiGLU(D, F_ * cfg.num_shared_experts) if cfg.num_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)

    def route(self, x_ND, replay_ids_NK=None):
        """Pick K experts per token: (topk_ids_NK, topk_weights_NK).

        With `replay_ids_NK` (routing replay) the experts are given; only their
        mixing weights are computed, from this router's own scores.
        """
        cfg = self.cfg
        with torch.autocast(x_ND.device.type, enabled=False):  # router scores stay fp32 under bf16 autocast
            scores_NE = torch.sigmoid(x_ND.float() @ self.router.float().t())
        if replay_ids_NK is None:
            choice_NE = scores_NE.detach() + self.expert_bias
            if cfg.num_expert_groups > 1:
                choice_NE = self._limit_to_top_groups(choice_NE)
            topk_ids_NK = choice_NE.topk(cfg.top_k, dim=-1).indices
        else:
            topk_ids_NK = replay_ids_NK.long()
        weights_NK = scores_NE.gather(1, topk_ids_NK)
        weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True) * cfg.routed_scaling_factor
        return topk_ids_NK, weights_NK.to(x_ND.dtype)

    def _limit_to_top_groups(self, choice_NE):
        """Group score = sum of the group's top-2 choice scores; keep the best groups."""
        cfg = self.cfg
        N, E = choice_NE.shape
        grouped = choice_NE.view(N, cfg.num_expert_groups, E // cfg.num_expert_groups)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        top_groups = group_scores.topk(cfg.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)

    def forward(self, x_BTD, replay_ids_BTK=None):
        """(output_BTD, topk_ids_BTK): the layer's output and the experts each token used."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        replay_ids_NK = None if replay_ids_BTK is None else replay_ids_BTK.reshape(B * T, -1)
        with profiled("router"):
            topk_ids_NK, weights_NK = self.route(x_ND, replay_ids_NK)
        if self.training:
            self.expert_load += torch.bincount(topk_ids_NK.flatten(), minlength=self.cfg.num_experts)
        y_ND = self.experts_batched(x_ND, topk_ids_NK, weights_NK)
        if self.shared is not None:
            with profiled("dense_ffn"):
                y_ND = y_ND + self.shared(x_ND)
        return y_ND.view(B, T, D), topk_ids_NK.view(B, T, -1)

    def expert_ffn(self, e: int, x_MD):
        hidden = F.silu(x_MD @ self.gate_proj[e].t()) * (x_MD @ self.up_proj[e].t())
        return hidden @ self.down_proj[e].t()

    def experts_batched(self, x_ND, topk_ids_NK, weights_NK):
        """Sort (token, expert) pairs by expert and run one matmul chain per expert."""
        with profiled("expert_dispatch"):
            K = topk_ids_NK.shape[1]
            flat_ids = topk_ids_NK.flatten()
            order = flat_ids.argsort(stable=True)
            token_of_pair = order // K
            counts = torch.bincount(flat_ids, minlength=self.cfg.num_experts).tolist()
            chunks = x_ND.index_select(0, token_of_pair).split(counts)
        # unbind's backward stacks all experts' gradients once; indexing self.gate_proj[e]
        # instead would write a full-size zero gradient per expert
        with profiled("expert_matmuls"):
            experts = zip(self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0), chunks)
            outputs = [(F.silu(x_MD @ gate.t()) * (x_MD @ up.t())) @ down.t()
                       for gate, up, down, x_MD in experts if x_MD.shape[0]]
        with profiled("expert_dispatch"):
            y_pairs = torch.cat(outputs) * weights_NK.flatten()[order, None]
            return torch.zeros_like(x_ND).index_add_(0, token_of_pair, y_pairs.to(x_ND.dtype))

    def experts_reference(self, x_ND, topk_ids_NK, weights_NK):
        """Per-token, per-choice loop: the test reference for `experts_batched`."""
        y_ND = torch.zeros_like(x_ND)
        for n in range(x_ND.shape[0]):
            for k in range(topk_ids_NK.shape[1]):
                e = int(topk_ids_NK[n, k])
                y_ND[n] += weights_NK[n, k] * self.expert_ffn(e, x_ND[n : n + 1])[0]
        return y_ND

    @torch.no_grad()
    def update_expert_bias(self, rate: float):
        """Raise the bias of under-loaded experts, lower it for over-loaded ones."""
        if self.expert_load.sum() > 0:
            self.expert_bias += rate * torch.sign(self.expert_load.mean() - self.expert_load)
        self.expert_load.zero_()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = layer_idx >= cfg.first_k_dense
        self.ffn = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.dense_ffn_size)

    def forward(self, x_BTD, positions_BT, cache, slots_B, replay_ids_BTK=None):
        """(output_BTD, topk_ids_BTK or None for a dense block)."""
        x_BTD = x_BTD + self.attn(self.input_norm(x_BTD), positions_BT, cache, slots_B)
        if not self.is_moe:
            with profiled("dense_ffn"):
                return x_BTD + self.ffn(self.post_attn_norm(x_BTD)), None
        ffn_out, topk_ids_BTK = self.ffn(self.post_attn_norm(x_BTD), replay_ids_BTK)
        return x_BTD + ffn_out, topk_ids_BTK


class MTPLayer(nn.Module):
    """One multi-token-prediction depth: the previous depth's normed output at t and the
    embedding of token t + depth go through one more block to predict token t + depth + 1.
    As in BailingMoeV2: inputs concatenated [embedding, hidden], outputs normed before
    they feed the next depth."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, hidden_BTD, next_embeds_BTD):
        """The normed output, for the shared lm_head and the next depth."""
        B, T, _ = hidden_BTD.shape
        x_BTD = self.eh_proj(torch.cat([self.embed_norm(next_embeds_BTD), self.hidden_norm(hidden_BTD)], -1))
        x_BTD, _ = self.block(x_BTD, torch.arange(T, device=x_BTD.device).expand(B, T), None, None)
        return self.final_norm(x_BTD)


class MoECausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_layers + i) for i in range(cfg.num_mtp_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                nn.init.normal_(param, std=self.cfg.init_std)
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(param, std=residual_std)

    def forward(self, tokens_BT, cache: KVCache | None = None, slots_B=None, replay_BTLK=None):
        """Logits [B, T, V]; see `hidden_states` for the arguments."""
        hidden_BTD, _ = self.hidden_states(tokens_BT, cache, slots_B, replay_BTLK)
        return self.logits(hidden_BTD)

    def logits(self, hidden_BTD):
        return self.lm_head(self.final_norm(hidden_BTD))

    def forward_routed(self, tokens_BT, cache: KVCache | None = None, slots_B=None, replay_BTLK=None):
        """(logits_BTV, routing_BTLK): also the experts each token used in each of the L MoE layers."""
        hidden_BTD, routing_BTLK = self.hidden_states(tokens_BT, cache, slots_B, replay_BTLK)
        return self.logits(hidden_BTD), routing_BTLK

    def hidden_states(self, tokens_BT, cache=None, slots_B=None, replay_BTLK=None):
        """(hidden_BTD before the final norm, routing_BTLK or None without MoE layers).

        Without a cache the tokens are causal from position 0. With a cache the new
        tokens of row b continue slot `slots_B[b]` at position `cache.lengths[slot]`,
        and their keys/values are written there. `replay_BTLK` (routing replay) gives
        the experts of every token in each MoE layer instead of letting the router pick.
        """
        B, T = tokens_BT.shape
        steps_T = torch.arange(T, device=tokens_BT.device)
        if cache is None:
            positions_BT = steps_T.expand(B, T)
        else:
            positions_BT = cache.lengths[slots_B][:, None] + steps_T
        x_BTD, routing, moe_index = self.embed(tokens_BT), [], 0
        for block in self.blocks:
            replay_BTK = None
            if replay_BTLK is not None and block.is_moe:
                replay_BTK, moe_index = replay_BTLK[:, :, moe_index], moe_index + 1
            x_BTD, topk_ids_BTK = block(x_BTD, positions_BT, cache, slots_B, replay_BTK)
            if topk_ids_BTK is not None:
                routing.append(topk_ids_BTK)
        return x_BTD, torch.stack(routing, dim=2) if routing else None

    def mtp_logits(self, hidden_BTD, tokens_BT) -> list:
        """Logits of each MTP depth k (1-based): position t predicts token t + k + 1, t < T - k."""
        logits, T = [], tokens_BT.shape[1]
        normed_BTD = self.final_norm(hidden_BTD)
        for depth, layer in enumerate(self.mtp, start=1):
            normed_BTD = layer(normed_BTD[:, : T - depth], self.embed(tokens_BT[:, depth:]))
            logits.append(self.lm_head(normed_BTD))
        return logits

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_expert_bias(self):
        for moe in self.moe_layers():
            moe.update_expert_bias(self.cfg.expert_bias_rate)

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
