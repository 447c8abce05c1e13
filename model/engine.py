"""A torch generation engine with continuous batching and a slot KV cache.

Each call to `step` emits exactly one token for every running rollout: newly added
rollouts are prefilled together (their next token comes from the prefill), the
others take one cached decode step. A finished rollout frees its slot at once, so
the caller can refill it before the next step. New weights are loaded between
steps (`load_weights`) without draining: tokens sampled afterwards carry the new
`version`; the KV cache of running rollouts is kept, or recomputed under the new
weights with `recompute_cache`. `pause_all` takes every rollout out with its tokens,
behaviour log-probs and versions; `add_rollout` resumes one (C3PO++ partial rollouts).
"""
from dataclasses import dataclass, field

import torch

from model.flops import forward_flops, sequence_forward_flops
from model.moe import KVCache, MoECausalLM, profiled


@dataclass
class Rollout:
    uid: str
    prompt_tokens: list[int]
    completion_tokens: list[int] = field(default_factory=list)
    behavior_logprobs: list[float] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    finish_reason: str = ""
    slot: int = -1
    routing: list = field(default_factory=list)  # [positions, L, K] chunks, when recorded
    pauses: int = 0  # times this rollout was cut at a round's end and resumed later

    def routed_experts(self) -> torch.Tensor:
        """[P + C - 1, L, K]: the experts of every position fed through the model."""
        return torch.cat(self.routing)

    def to_state(self) -> dict:
        """Plain values (msgpack): what a checkpoint keeps of an unfinished rollout."""
        routed = self.routed_experts() if self.routing else None
        return {"uid": self.uid, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "behavior_logprobs": self.behavior_logprobs, "policy_versions": self.policy_versions,
                "finish_reason": self.finish_reason, "pauses": self.pauses, "routing": None if routed is None else
                {"shape": list(routed.shape), "data": routed.to(torch.int16).cpu().numpy().tobytes()}}

    @staticmethod
    def from_state(state: dict) -> "Rollout":
        routing = state["routing"]
        chunks = [] if routing is None else [torch.frombuffer(bytearray(routing["data"]), dtype=torch.int16)
                                             .view(routing["shape"]).long()]
        return Rollout(state["uid"], list(state["prompt_tokens"]), list(state["completion_tokens"]),
                       list(state["behavior_logprobs"]), list(state["policy_versions"]), state["finish_reason"],
                       routing=chunks, pauses=state["pauses"])


def sample_tokens(logits_BV, temperature: float, generator: torch.Generator | None):
    """(tokens_B, logprobs_B) from softmax(logits / T); T = 0 is greedy (logprobs at T = 1)."""
    if temperature == 0:
        logprobs_BV = torch.log_softmax(logits_BV.float(), dim=-1)
        tokens_B = logprobs_BV.argmax(-1)
    else:
        logprobs_BV = torch.log_softmax(logits_BV.float() / temperature, dim=-1)
        tokens_B = torch.multinomial(logprobs_BV.exp(), 1, generator=generator).squeeze(1)
    return tokens_B, logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1)


class GenerationEngine:
    """Runs on the model's device, in the model's parameter dtype (bf16 on CUDA, float32 on CPU):
    the KV cache, the token and slot tensors, the sampling RNG and the routing records live
    there; sampling's log-probs are float32. One host synchronisation per step: the sampled
    tokens and their log-probs, which the rollouts keep as Python lists."""

    def __init__(self, model: MoECausalLM, max_slots: int, max_len: int, eos_id: int, pad_id: int,
                 max_new_tokens: int, temperature: float, seed: int = 0, record_routing: bool = False):
        self.model = model.eval()
        weight = model.embed.weight
        self.device = weight.device
        self.record_routing = record_routing
        self.cache = KVCache(model.cfg, max_slots, max_len, device=self.device, dtype=weight.dtype)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.version = 0
        self.model_flops = 0.0  # forward FLOPs of every prefill and decode step so far (the generator's MFU)
        self._free = list(range(max_slots - 1, -1, -1))
        self._pending: list[Rollout] = []
        self._running: list[Rollout] = []

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def num_active(self) -> int:
        return len(self._pending) + len(self._running)

    @property
    def active(self) -> list[Rollout]:
        """The unfinished rollouts in the slots (read only)."""
        return self._running + self._pending

    def add(self, uid: str, prompt_tokens: list[int]) -> None:
        self.add_rollout(Rollout(uid, list(prompt_tokens)))

    def add_rollout(self, rollout: Rollout) -> None:
        """Start a new rollout, or resume a paused one where it stopped (its KV is rebuilt)."""
        if not self._free:
            raise RuntimeError("no free slot: check free_slots before add")
        if len(rollout.prompt_tokens) + self.max_new_tokens > self.cache.max_len:
            raise ValueError(f"prompt of {len(rollout.prompt_tokens)} tokens + max_new_tokens "
                             f"({self.max_new_tokens}) exceeds the cache ({self.cache.max_len})")
        rollout.slot = self._free.pop()
        self._pending.append(rollout)

    def pause_all(self) -> list[Rollout]:
        """Take every unfinished rollout out of its slot, keeping what it generated so far."""
        paused = self.cut_all()
        self.evict(paused)
        return paused

    def cut_all(self) -> list[Rollout]:
        """Count a round's end on every unfinished rollout, which stays in its slot with its KV."""
        cut = self.active
        for r in cut:
            r.pauses += bool(r.completion_tokens)
        return cut

    def evict(self, rollouts: list[Rollout]) -> None:
        """Take these unfinished rollouts out of their slots (what they generated stays with them)."""
        leaving = {id(r) for r in rollouts}
        self._running = [r for r in self._running if id(r) not in leaving]
        self._pending = [r for r in self._pending if id(r) not in leaving]
        for r in rollouts:
            self._free.append(r.slot)
            r.slot = -1

    def recompute_cache(self) -> None:
        """Rebuild the running rollouts' KV under the current weights (at the next step)."""
        for rollout in self.pause_all():
            rollout.pauses -= bool(rollout.completion_tokens)  # not a cut, only a refresh
            self.add_rollout(rollout)

    @torch.no_grad()
    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> None:
        state = self.model.state_dict()
        for name, tensor in named_tensors.items():
            state[name].copy_(tensor)
        self.version = version

    @torch.no_grad()
    def step(self) -> list[Rollout]:
        """Emit one token for every running rollout; return those that finished."""
        emitted = []
        if self._running:
            emitted += self._decode(self._running)
        if self._pending:
            emitted += self._prefill(self._pending)
            self._running += self._pending
            self._pending = []
        finished = [r for r in emitted if r.finish_reason]
        if finished:
            self._running = [r for r in self._running if not r.finish_reason]
            self._free += [r.slot for r in finished]
        return finished

    def _prefill(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Feed each rollout's whole sequence so far (a resumed one has completion tokens too)."""
        sequences = [r.prompt_tokens + r.completion_tokens for r in rollouts]
        lengths = [len(seq) for seq in sequences]
        rows = [seq + [self.pad_id] * (max(lengths) - len(seq)) for seq in sequences]
        tokens_BT = torch.tensor(rows, device=self.device)
        lengths_B = torch.tensor(lengths, device=self.device)
        slots_B = torch.tensor([r.slot for r in rollouts], device=self.device)
        self.model_flops += sequence_forward_flops(self.model.cfg, lengths)
        self.cache.lengths[slots_B] = 0
        hidden_ND, routing_NLK = self.model.hidden_states(tokens_BT, self.cache, slots_B, lengths_B=lengths_B)
        self.cache.lengths[slots_B] = lengths_B
        if self.record_routing:
            for r, routing_LK in zip(rollouts, routing_NLK.split(lengths)):
                r.routing = [routing_LK]
        last_B = lengths_B.cumsum(0) - 1  # each sequence's last token among the packed N
        return self._append(rollouts, self.model.logits(hidden_ND.index_select(0, last_B)))

    def _decode(self, rollouts: list[Rollout]) -> list[Rollout]:
        tokens_B1 = torch.tensor([[r.completion_tokens[-1]] for r in rollouts], device=self.device)
        slots_B = torch.tensor([r.slot for r in rollouts], device=self.device)
        # each fed token sits at position len(sequence) - 1 and attends over len(sequence) keys
        attended = sum(len(r.prompt_tokens) + len(r.completion_tokens) for r in rollouts)
        self.model_flops += forward_flops(self.model.cfg, len(rollouts), attended)
        hidden_B1D, routing_B1LK = self.model.hidden_states(tokens_B1, self.cache, slots_B)
        self.cache.lengths[slots_B] += 1
        if self.record_routing:
            for r, routing_1LK in zip(rollouts, routing_B1LK.unbind(0)):
                r.routing.append(routing_1LK)
        return self._append(rollouts, self.model.logits(hidden_B1D[:, 0]))

    def _append(self, rollouts: list[Rollout], logits_BV) -> list[Rollout]:
        with profiled("sampling"):
            tokens_B, logprobs_B = sample_tokens(logits_BV, self.temperature, self.rng)
            tokens, logprobs = tokens_B.tolist(), logprobs_B.tolist()
        for r, token, logprob in zip(rollouts, tokens, logprobs):
            r.completion_tokens.append(token)
            r.behavior_logprobs.append(logprob)
            r.policy_versions.append(self.version)
            if token == self.eos_id:
                r.finish_reason = "stop"
            elif len(r.completion_tokens) >= self.max_new_tokens:
                r.finish_reason = "length"
        return rollouts


def generate(engine: GenerationEngine, prompts: list[tuple[str, list[int]]]) -> list[Rollout]:
    """Run `prompts` to completion with continuous batching; results in prompt order."""
    queue, done = list(prompts), {}
    while queue or engine.num_active:
        while queue and engine.free_slots:
            engine.add(*queue.pop(0))
        for rollout in engine.step():
            done[rollout.uid] = rollout
    return [done[uid] for uid, _ in prompts]
