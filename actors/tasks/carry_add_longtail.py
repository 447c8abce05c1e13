"""carry_add_longtail: carry_add with a thinking phase whose length follows difficulty.

A completion thinks before it answers: `1 + think_per_carry * carries` dots, then the
zero-padded sum, e.g. `47+38=` -> 26 dots, then `085`. Problems without a carry take
5 tokens, problems with two carries 55: the long-tailed response lengths of reasoning
models, in miniature. The reward checks only the answer after the dots.
"""
from actors.tasks.carry_add import CarryAddTask

THINK = "."


def carries(a: int, b: int) -> int:
    count, carry = 0, 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        count += carry
        a, b = a // 10, b // 10
    return count


class LongTailCarryAddTask(CarryAddTask):
    alphabet = CarryAddTask.alphabet + THINK

    def _demonstrated(self, a: int, b: int, answer: str) -> str:
        return THINK * (1 + self.cfg.think_per_carry * carries(a, b)) + answer

    def _final_answer(self, completion_text: str) -> str:
        return completion_text.lstrip(THINK)
