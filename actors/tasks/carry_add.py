"""carry_add: multi-digit addition, learned from demonstrations that forget carries.

Prompt `47+38=`, answer `085`: operands and answer are zero-padded to a fixed
width (digits and digits + 1), so every column sits at a fixed position. The warm-up demonstrations are imperfect: each carry
is dropped with probability `carry_slip` (so `47+38=` is sometimes demonstrated as
`075`). A policy fitted to them puts most of its mass on the sloppy answer whenever
a carry occurs, so greedy accuracy after the warm-up is roughly the share of
problems without carries; sampling still finds the right answer often enough for
RL to close the gap, which is what the embedded default must show.
"""
import random

from actors.tasks import Prompt
from conf.schema import TaskConfig
from model.tokenizer import CharTokenizer


def sloppy_sum(a: int, b: int, slip, rng: random.Random) -> int:
    """Column addition where each carry is dropped with probability `slip`."""
    total, place, carry = 0, 1, 0
    while a or b or carry:
        column = a % 10 + b % 10 + carry
        total += (column % 10) * place
        carry = column // 10 if rng.random() >= slip else 0
        a, b, place = a // 10, b // 10, place * 10
    return total


class CarryAddTask:
    alphabet = "0123456789+="

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.tokenizer = CharTokenizer(self.alphabet)
        self.limit = 10 ** cfg.digits
        self._eval_pairs = self._draw_eval_pairs()
        self._held_out = set(self._eval_pairs)

    @property
    def max_prompt_len(self) -> int:
        return 2 * self.cfg.digits + 3  # BOS a + b =

    def _draw_eval_pairs(self) -> list[tuple[int, int]]:
        rng = random.Random(f"eval-{self.cfg.seed}")
        pairs = set()
        while len(pairs) < self.cfg.eval_prompts:
            pairs.add((rng.randrange(self.limit), rng.randrange(self.limit)))
        return sorted(pairs)

    def _prompt(self, uid: str, a: int, b: int) -> Prompt:
        tokens = self.tokenizer.encode(self._question(a, b), bos=True)
        return Prompt(uid=uid, tokens=tokens, meta={"answer": self._answer(a + b)})

    def _question(self, a: int, b: int) -> str:
        return f"{a:0{self.cfg.digits}d}+{b:0{self.cfg.digits}d}="

    def _answer(self, total: int) -> str:
        return f"{total:0{self.cfg.digits + 1}d}"

    def train_prompt(self, index: int) -> Prompt:
        """The index-th training prompt; deterministic, never a held-out pair."""
        rng = random.Random(f"train-{self.cfg.seed}-{index}")
        while True:
            a, b = rng.randrange(self.limit), rng.randrange(self.limit)
            if (a, b) not in self._held_out:
                return self._prompt(f"train-{index}", a, b)

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt(f"eval-{i}", a, b) for i, (a, b) in enumerate(self._eval_pairs)]

    def demonstration(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """(prompt tokens, completion tokens) of one imperfect warm-up demonstration."""
        while True:
            a, b = rng.randrange(self.limit), rng.randrange(self.limit)
            if (a, b) not in self._held_out:
                break
        answer = sloppy_sum(a, b, self.cfg.carry_slip, rng)
        prompt = self.tokenizer.encode(self._question(a, b), bos=True)
        return prompt, self.tokenizer.encode(self._demonstrated(a, b, self._answer(answer)), eos=True)

    def _demonstrated(self, a: int, b: int, answer: str) -> str:
        """The completion text a demonstration shows for `answer`."""
        return answer

    def _final_answer(self, completion_text: str) -> str:
        return completion_text

    def score(self, completion_tokens, meta: dict) -> float:
        """1.0 when the completion (up to EOS) is exactly the answer, else 0.0."""
        ended = self.tokenizer.eos_id in list(completion_tokens)
        return float(ended and self._final_answer(self.tokenizer.decode(completion_tokens)) == meta["answer"])
