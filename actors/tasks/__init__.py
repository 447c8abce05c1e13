"""Verifiable tasks: prompts, warm-up demonstrations and the reward rule.

Built in: carry_add and carry_add_longtail (arithmetic made here). From JSONL datasets: math
(final answers checked by math-verify) and code (programs run against tests in a sandbox).

Every task has `score(completion_tokens, meta) -> float`. Tasks whose scoring can hang (math,
code) also have `judge(completion_tokens, meta, timeout_s) -> Judgment`, which runs that work in
a process it kills when `timeout_s` runs out and says why the reward is what it is.
"""
from dataclasses import dataclass, field

from conf.schema import TaskConfig


@dataclass
class Prompt:
    uid: str
    tokens: list[int]
    meta: dict = field(default_factory=dict)  # what the judge needs, e.g. {"answer": "85"}


@dataclass
class Judgment:
    """A judge's verdict on one completion: the reward and the reason, which the judge actor counts."""

    reward: float
    reason: str  # correct | wrong_answer | no_answer | judge_timeout | a sandbox verdict (time_limit, ...)
    detail: str = ""  # one short line: the extracted answer, the failing test, the error


def judge_completion(task, completion_tokens, meta: dict, timeout_s: float) -> Judgment:
    """The task's judgment of one completion, bounded by `timeout_s`.

    A task without `judge` (carry_add) only compares a few digits, which cannot hang: it is
    scored in place and its reason says right or wrong.
    """
    if hasattr(task, "judge"):
        return task.judge(completion_tokens, meta, timeout_s)
    reward = task.score(completion_tokens, meta)
    return Judgment(reward, "correct" if reward == 1.0 else "wrong_answer")


def build_task(cfg: TaskConfig):
    from actors.tasks.carry_add import CarryAddTask
    from actors.tasks.carry_add_longtail import LongTailCarryAddTask
    from actors.tasks.code_task import CodeTask
    from actors.tasks.math_task import MathTask

    tasks = {"carry_add": CarryAddTask, "carry_add_longtail": LongTailCarryAddTask, "math": MathTask,
             "code": CodeTask}
    if cfg.name not in tasks:
        raise ValueError(f"task.name ({cfg.name!r}) must be one of {sorted(tasks)}")
    return tasks[cfg.name](cfg)
