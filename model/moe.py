"""A Ling-2.0 (BailingMoeV2) style Mixture-of-Experts causal LM, in one plain file.

Shape legend for tensor names:
  B batch rows, T new tokens per row, N tokens the layers compute (B * T, or only the real
  ones of a packed batch), L key/value positions (or MoE layers, in routing_*LK),
  D hidden size, H query heads, G key/value heads, Dh head dim, R rotary dims,
  E routed experts, K experts per token, M (token, expert) pairs, F FFN hidden size, V vocabulary.

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

    def rotation(self, positions_N, dtype):
        """(cos_N1R, sin_N1R) of the tokens' positions, for `forward`."""
        angles_NR = positions_N.float()[:, None] * self.inv_freq
        angles_NR = torch.cat([angles_NR, angles_NR], dim=-1)[:, None, :]
        return angles_NR.cos().to(dtype), angles_NR.sin().to(dtype)

    def forward(self, x_NHDh, rotation):
        cos_N1R, sin_N1R = rotation
        rot, passthrough = x_NHDh[..., : self.rot_dim], x_NHDh[..., self.rot_dim:]
        first, second = rot.chunk(2, dim=-1)
        rotated = rot * cos_N1R + torch.cat([-second, first], dim=-1) * sin_N1R
        return torch.cat([rotated, passthrough], dim=-1)


class KVCache:
    """Key/value buffers for `slots` sequences of up to `max_len` tokens each.

    Buffers are [layers, slots, G, max_len, Dh], head-major as attention reads them: a slot's
    keys of one head lie together, so the live part of every row and head is one strided batch
    of matrices, read where it lies. `lengths[s]` counts the valid positions of slot s. The model
    writes new keys at `lengths[slot] + t`; the caller advances `lengths` once it knows how many
    of the new tokens were real.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.slots, self.max_len = slots, max_len


# the live keys read from a KV cache are rounded up to this many: with a key count off this
# multiple, CPU bf16 attention takes a tail path whose rounding drifts from the full forward's
# (measured: decode vs full-forward log-probs 0.26 max apart instead of 0.06, tests/test_devices.py)
KEY_BLOCK = 16
# without a cache, attention runs the rows of a packed batch in batches of rows of about one length,
# each padded to its rows' length rounded up to this many positions, not all to the longest row's:
# long-tail rows (12 to 62 positions in bench/async_vs_sync.py) then cost about their own squared
# length each (bench/RESULTS.md, "Learner attention by length")
LENGTH_BLOCK = 16


class Layout:
    """Where the N tokens that every token-wise layer works on sit in the B rows of T positions
    that attention sees, and the position of each.

    Dense: all B * T tokens are real and rows <-> tokens is a reshape. Packed (`lengths_B`):
    row b holds lengths_B[b] real tokens, then padding; the N real tokens alone go through the
    projections, norms, router, experts and LM head, and attention alone puts them back into
    rows (causal masking keeps padding, which sits after every real token, out of them): without
    a cache, rows of about one length together (`row_batches`), each batch padded to its own length.
    With a KV cache, row b continues slot slots_B[b] from position cache.lengths[slot], and
    attention reads only the `live_len` first positions of the cache (rounded up to KEY_BLOCK).
    A decode step (T = 1) over at least half of the cache's slots attends in place: every slot
    is a row of attention, which reads the cache where it lies instead of copying the B rows'
    keys and values out of it (per layer a copy as large as the live cache, the decode step's
    main memory traffic); the idle slots' rows are computed and dropped.
    """

    def __init__(self, B: int, T: int, device, lengths_B=None, cache: KVCache | None = None, slots_B=None):
        self.B, self.T = B, T
        steps_T = torch.arange(T, device=device)
        self.index_N = None if lengths_B is None else (steps_T < lengths_B[:, None]).flatten().nonzero().squeeze(1)
        starts_B = torch.zeros(B, dtype=torch.long, device=device) if cache is None else cache.lengths[slots_B]
        self.positions_BT = starts_B[:, None] + steps_T
        self.positions_N = self.tokens(self.positions_BT)
        self.slots_B = slots_B
        self.slots_N = None if cache is None else self.tokens(slots_B[:, None].expand(B, T))
        self.in_place = cache is not None and T == 1 and 2 * B >= cache.slots
        packed_without_cache = self.index_N is not None and cache is None
        self.row_groups, self.places_N = _row_groups(lengths_B) if packed_without_cache else (None, None)
        if cache is not None:
            live_len = int(self.positions_BT.max()) + 1
            self.live_len = min(cache.max_len, -(-live_len // KEY_BLOCK) * KEY_BLOCK)
            key_positions_L = torch.arange(self.live_len, device=device)
            # the query positions of attention's rows: in place, each slot's next one (for the rows
            # of slots_B their token's position; for idle slots any, their row is dropped)
            query_positions_RT = cache.lengths[:, None] if self.in_place else self.positions_BT
            self.key_mask_R1TL = (key_positions_L <= query_positions_RT[:, :, None])[:, None]
        self._rotation = None

    def tokens(self, x_BT_):
        """[B, T, ...] -> [N, ...]: the real tokens, row after row."""
        x_N_ = x_BT_.reshape(self.B * self.T, *x_BT_.shape[2:])
        return x_N_ if self.index_N is None else x_N_.index_select(0, self.index_N)

    def rows(self, x_N_):
        """[N, ...] -> [B, T, ...], zeros at padding."""
        if self.index_N is not None:
            x_N_ = x_N_.new_zeros(self.B * self.T, *x_N_.shape[1:]).index_copy(0, self.index_N, x_N_)
        return x_N_.view(self.B, self.T, *x_N_.shape[1:])

    def row_batches(self, x_N_) -> list:
        """[N, ...] -> attention's batches of rows, [n, Tb, ...] each: without a cache, one of all B
        rows when dense, else one per length (rounded up to LENGTH_BLOCK) of a packed batch's rows."""
        if self.row_groups is None:
            return [self.rows(x_N_)]
        return [x_N_.index_select(0, gather).view(n, T, *x_N_.shape[1:]) for gather, n, T in self.row_groups]

    def from_row_batches(self, batches: list):
        """`row_batches`'s inverse: [N, ...] from the batches' rows (their padding left out)."""
        if self.row_groups is None:
            return self.tokens(batches[0])
        laid_out = torch.cat([batch.reshape(-1, *batch.shape[2:]) for batch in batches])
        return laid_out.index_select(0, self.places_N)

    def cached(self, layer_cache_SGLD):
        """The keys (or values) of attention's rows out of one layer's cache, [R, G, live_len, Dh]."""
        live = layer_cache_SGLD[:, :, : self.live_len]
        return live if self.in_place else live.index_select(0, self.slots_B)

    def query_rows(self, x_BTHD):
        """[B, T, ...] -> attention's rows: in place one per slot (zeros for the idle ones)."""
        if not self.in_place:
            return x_BTHD
        return x_BTHD.new_zeros(self.key_mask_R1TL.shape[0], *x_BTHD.shape[1:]).index_copy(0, self.slots_B, x_BTHD)

    def batch_rows(self, x_RTHD):
        """Attention's rows -> [B, T, ...]."""
        return x_RTHD.index_select(0, self.slots_B) if self.in_place else x_RTHD

    def rotation(self, rotary: PartialRotary, dtype):
        """The tokens' RoPE cos/sin: made by the first layer, reused by the others (all alike)."""
        if self._rotation is None:
            self._rotation = rotary.rotation(self.positions_N, dtype)
        return self._rotation


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

    def forward(self, x_ND, layout: Layout, cache: KVCache | None):
        with profiled("attention"):
            N = x_ND.shape[0]
            rotation = layout.rotation(self.rotary, x_ND.dtype)
            q = self.rotary(self.q_norm(self.q_proj(x_ND).view(N, self.num_heads, self.head_dim)), rotation)
            k = self.rotary(self.k_norm(self.k_proj(x_ND).view(N, self.num_kv_heads, self.head_dim)), rotation)
            v = self.v_proj(x_ND).view(N, self.num_kv_heads, self.head_dim)
            if cache is None:
                out_NHDh = layout.from_row_batches([
                    self._attend(q_nTHDh, k_nTGDh.transpose(1, 2), v_nTGDh.transpose(1, 2), mask=None)
                    for q_nTHDh, k_nTGDh, v_nTGDh in zip(*map(layout.row_batches, (q, k, v)))])
            else:
                keys, values = self._write_cache(cache, k, v, layout)
                out_RTHDh = self._attend(layout.query_rows(layout.rows(q)), keys, values, mask=layout.key_mask_R1TL)
                out_NHDh = layout.tokens(layout.batch_rows(out_RTHDh))
            return self.o_proj(out_NHDh.reshape(N, -1))

    def _write_cache(self, cache: KVCache, k_NGDh, v_NGDh, layout: Layout):
        """Write the new keys/values; return the live part of attention's rows, [R, G, live_len, Dh]."""
        layer_keys, layer_values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        # through a [slots, max_len, G, Dh] view: each token's G heads go to its (slot, position)
        layer_keys.transpose(1, 2).index_put_((layout.slots_N, layout.positions_N), k_NGDh.detach())
        layer_values.transpose(1, 2).index_put_((layout.slots_N, layout.positions_N), v_NGDh.detach())
        return layout.cached(layer_keys), layout.cached(layer_values)

    def _attend(self, q_BTHDh, k_BGLDh, v_BGLDh, mask):
        """Grouped-query attention; keys/values are shared by heads without copying them per head."""
        if mask is not None and q_BTHDh.shape[1] == 1 and q_BTHDh.device.type == "cpu" \
                and q_BTHDh.dtype == torch.float32:  # a CPU decode step (bf16 stays with SDPA's rounding)
            return decode_attention(q_BTHDh, k_BGLDh, v_BGLDh, mask)
        q, k, v = q_BTHDh.transpose(1, 2), k_BGLDh, v_BGLDh
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)


def _row_groups(lengths_B) -> tuple[list[tuple[torch.Tensor, int, int]], torch.Tensor]:
    """A packed batch's rows grouped by their length rounded up to LENGTH_BLOCK (rows without a
    token left out): per group (gather, n, Tb), where gather [n * Tb] picks its n rows' tokens among
    the N packed ones, each row padded to Tb with copies of its last token (causal masking keeps
    them out of the real tokens' attention, and their outputs are dropped); and, for each of the
    N tokens, where its output lies among the groups' rows laid end to end."""
    starts_B = lengths_B.cumsum(0) - lengths_B
    rounded_B = -(-lengths_B // LENGTH_BLOCK) * LENGTH_BLOCK
    groups, place_N, laid_out = [], torch.empty(int(lengths_B.sum()), dtype=torch.long, device=lengths_B.device), 0
    for T in rounded_B.unique().tolist():
        if T == 0:
            continue
        rows = (rounded_B == T).nonzero().squeeze(1)
        steps_nT = torch.arange(T, device=lengths_B.device).expand(len(rows), T)
        real_nT = steps_nT < lengths_B[rows, None]
        tokens_nT = starts_B[rows, None] + torch.minimum(steps_nT, lengths_B[rows, None] - 1)
        place_N[tokens_nT[real_nT]] = laid_out + torch.arange(len(rows) * T, device=lengths_B.device)[real_nT.flatten()]
        groups.append((tokens_nT.flatten(), len(rows), T))
        laid_out += len(rows) * T
    return groups, place_N


def decode_attention(q_B1HDh, k_BGLDh, v_BGLDh, mask_B11L):
    """A decode step's attention on the CPU: each row's one query against its cached keys, as two
    batched matmuls over (row, key head) with the H / G query heads of a key head as one matrix.

    Reads the cache's live part where it lies. With bench/async_vs_sync.py's model (256 rows, 32
    to 80 live keys, one thread) torch's CPU SDPA took 1.2 to 2.2x as long, and attention is a
    quarter to a third of a decode step (bench/RESULTS.md, fifth pass; the tests check that both
    give the same outputs).
    """
    B, _, H, Dh = q_B1HDh.shape
    G, L = k_BGLDh.shape[1], k_BGLDh.shape[2]
    q = q_B1HDh.reshape(B * G, H // G, Dh)
    k, v = k_BGLDh.reshape(B * G, L, Dh), v_BGLDh.reshape(B * G, L, Dh)
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(Dh ** -0.5).view(B, G, H // G, L)
    scores.masked_fill_(~mask_B11L, float("-inf"))
    out = torch.bmm(scores.softmax(-1).view(B * G, H // G, L), v)
    return out.view(B, 1, H, Dh)


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

    def forward(self, x_ND, replay_ids_NK=None):
        """(output_ND, topk_ids_NK): the layer's output and the experts each token used."""
        with profiled("router"):
            topk_ids_NK, weights_NK = self.route(x_ND, replay_ids_NK)
        if self.training:
            self.expert_load += torch.bincount(topk_ids_NK.flatten(), minlength=self.cfg.num_experts)
        y_ND = self.experts_batched(x_ND, topk_ids_NK, weights_NK)
        if self.shared is not None:
            with profiled("dense_ffn"):
                y_ND = y_ND + self.shared(x_ND)
        return y_ND, topk_ids_NK

    def expert_ffn(self, e: int, x_MD):
        hidden = F.silu(x_MD @ self.gate_proj[e].t()) * (x_MD @ self.up_proj[e].t())
        return hidden @ self.down_proj[e].t()

    def experts_batched(self, x_ND, topk_ids_NK, weights_NK):
        """Sort the M = N * K (token, expert) pairs by expert and run one matmul chain per expert."""
        with profiled("expert_dispatch"):
            flat_ids_M = topk_ids_NK.flatten()
            order_M = flat_ids_M.argsort(stable=True)
            token_M = order_M // topk_ids_NK.shape[1]
            counts = torch.bincount(flat_ids_M, minlength=self.cfg.num_experts).tolist()
            x_MD = x_ND.index_select(0, token_M)
            weights_M1 = weights_NK.flatten().index_select(0, order_M)[:, None].to(x_ND.dtype)
        with profiled("expert_matmuls"):
            y_MD = self._expert_matmuls(x_MD, weights_M1, counts)
        with profiled("expert_dispatch"):
            return torch.zeros_like(x_ND).index_add_(0, token_M, y_MD.to(x_ND.dtype))  # bf16 under autocast

    def _expert_matmuls(self, x_MD, weights_M1, counts: list[int]):
        """Each expert's SwiGLU on its contiguous run of pairs; the routing weight scales the
        F-wide hidden (cheaper than the D-wide output). unbind's backward stacks the experts'
        gradients once; indexing self.gate_proj[e] would write a full-size zero gradient per expert."""
        experts = zip(self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0),
                      x_MD.split(counts), weights_M1.split(counts))
        return torch.cat([(F.silu(x @ gate.t()) * (x @ up.t()) * w) @ down.t()
                          for gate, up, down, x, w in experts if x.shape[0]])

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

    def forward(self, x_ND, layout: Layout, cache: KVCache | None, replay_NK=None):
        """(output_ND, topk_ids_NK or None for a dense block)."""
        x_ND = x_ND + self.attn(self.input_norm(x_ND), layout, cache)
        if not self.is_moe:
            with profiled("dense_ffn"):
                return x_ND + self.ffn(self.post_attn_norm(x_ND)), None
        ffn_out, topk_ids_NK = self.ffn(self.post_attn_norm(x_ND), replay_NK)
        return x_ND + ffn_out, topk_ids_NK


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
        B, T, D = hidden_BTD.shape
        x_BTD = self.eh_proj(torch.cat([self.embed_norm(next_embeds_BTD), self.hidden_norm(hidden_BTD)], -1))
        x_ND, _ = self.block(x_BTD.reshape(B * T, D), Layout(B, T, x_BTD.device), None)
        return self.final_norm(x_ND.view(B, T, D))


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

    def forward(self, tokens_BT, cache: KVCache | None = None, slots_B=None, replay_BTLK=None, lengths_B=None):
        """Logits [B, T, V] ([N, V] with `lengths_B`); see `hidden_states` for the arguments."""
        hidden, _ = self.hidden_states(tokens_BT, cache, slots_B, replay_BTLK, lengths_B)
        return self.logits(hidden)

    def logits(self, hidden_D):
        """LM-head logits of hidden states of any leading shape: [..., D] -> [..., V]."""
        return self.lm_head(self.final_norm(hidden_D))

    def forward_routed(self, tokens_BT, cache: KVCache | None = None, slots_B=None, replay_BTLK=None,
                       lengths_B=None):
        """(logits_BTV, routing_BTLK): also the experts each token used in each of the L MoE layers."""
        hidden, routing = self.hidden_states(tokens_BT, cache, slots_B, replay_BTLK, lengths_B)
        return self.logits(hidden), routing

    def hidden_states(self, tokens_BT, cache=None, slots_B=None, replay_BTLK=None, lengths_B=None):
        """(hidden_BTD before the final norm, routing_BTLK or None without MoE layers).

        Without a cache the tokens are causal from position 0. With a cache the new
        tokens of row b continue slot `slots_B[b]` at position `cache.lengths[slot]`,
        and their keys/values are written there. `replay_BTLK` (routing replay) gives
        the experts of every token in each MoE layer instead of letting the router pick.
        With `lengths_B` only the first lengths_B[b] tokens of row b are real: no layer
        computes the padding after them, and the results are packed, hidden_ND and
        routing_NLK over the N real tokens, row after row.
        """
        B, T = tokens_BT.shape
        layout = Layout(B, T, tokens_BT.device, lengths_B, cache, slots_B)
        x_ND = self.embed(layout.tokens(tokens_BT))
        replay_NLK = None if replay_BTLK is None else layout.tokens(replay_BTLK)
        routing, moe_index = [], 0
        for block in self.blocks:
            replay_NK = None
            if replay_NLK is not None and block.is_moe:
                replay_NK, moe_index = replay_NLK[:, moe_index], moe_index + 1
            x_ND, topk_ids_NK = block(x_ND, layout, cache, replay_NK)
            if topk_ids_NK is not None:
                routing.append(topk_ids_NK)
        routing_NLK = torch.stack(routing, dim=1) if routing else None
        if lengths_B is not None:
            return x_ND, routing_NLK
        return x_ND.view(B, T, -1), None if routing_NLK is None else routing_NLK.view(B, T, *routing_NLK.shape[1:])

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
