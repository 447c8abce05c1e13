"""Built-in verifiable tasks: prompts, warm-up demonstrations and the reward rule."""
from dataclasses import dataclass, field

from conf.schema import TaskConfig


@dataclass
class Prompt:
    uid: str
    tokens: list[int]
    meta: dict = field(default_factory=dict)  # what the judge needs, e.g. {"answer": "85"}


def build_task(cfg: TaskConfig):
    from actors.tasks.carry_add import CarryAddTask
    from actors.tasks.carry_add_longtail import LongTailCarryAddTask

    tasks = {"carry_add": CarryAddTask, "carry_add_longtail": LongTailCarryAddTask}
    if cfg.name not in tasks:
        raise ValueError(f"task.name ({cfg.name!r}) must be one of {sorted(tasks)}")
    return tasks[cfg.name](cfg)
