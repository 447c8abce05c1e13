"""code: write a Python program that reads stdin and prints the answer; judged by running it.

Records: {"prompt", "tests": [{"input", "output"}, ...]} and an optional reference "solution"
(the warm-up demonstration). The completion is the program: the last ``` fenced block if it has
one, else the whole text. Each test runs in its own sandbox (actors/tasks/sandbox.py); output
matches when the lines agree after trailing whitespace is dropped.

Reward (Ring-lite's rule): 1 only if every test passes; with `task.partial_credit` the
fraction of tests passed. A program that ran but failed (for a reason other than a syntax
error or the judge timeout) gets `task.format_reward` if that is higher. The reason is
"correct", or how the first failing test ended: wrong_answer, a sandbox verdict (runtime_error,
syntax_error, time_limit, memory_limit, process_limit, output_limit), or judge_timeout once
the per-sample timeout cuts a run short.
"""
import json
import time
from functools import cached_property

from actors.tasks import Judgment
from actors.tasks.dataset import DatasetTask
from actors.tasks.sandbox import RunResult, Sandbox
from conf.schema import TaskConfig

DETAIL_CHARS = 160


def extract_program(text: str) -> str:
    """The last ``` fenced block (its language tag dropped), else the whole completion."""
    parts = text.split("```")
    if len(parts) < 3:
        return text.strip()
    block = parts[-2] if len(parts) % 2 == 1 else parts[-3]
    first_line, _, rest = block.partition("\n")
    return (rest if first_line.strip().isidentifier() else block).strip()


def outputs_match(expected: str, actual: str) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip().splitlines()]

    return lines(expected) == lines(actual)


class CodeTask(DatasetTask):
    required = ("prompt", "tests")

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        for record in self.train + self.held_out:
            if not record["tests"] or not all({"input", "output"} <= set(t) for t in record["tests"]):
                raise ValueError(f"code record {record['prompt']!r}: tests must be a non-empty list of "
                                 "{input, output}")

    @cached_property
    def sandbox(self) -> Sandbox:
        """Built on first use: only processes that judge need one (it probes the kernel)."""
        return Sandbox(self.cfg.sandbox)

    def meta(self, record: dict) -> dict:
        return {"tests": json.dumps(record["tests"])}

    def reference_completion(self, record: dict) -> str:
        return record.get("solution", "")

    def judge(self, completion_tokens, meta: dict, timeout_s: float) -> Judgment:
        program = extract_program(self.tokenizer.decode(completion_tokens))
        if not program:
            return Judgment(0.0, "no_answer")
        tests = json.loads(meta["tests"])
        deadline = time.monotonic() + timeout_s
        passed, first_failure = 0, None
        for index, test in enumerate(tests):
            failure = self._run_test(program, test, deadline)
            passed += failure is None
            if failure is not None and first_failure is None:
                first_failure = (index, *failure)
                if not self.cfg.partial_credit or failure[0] in ("judge_timeout", "syntax_error"):
                    break
        return self._judgment(passed, len(tests), first_failure)

    def _run_test(self, program: str, test: dict, deadline: float) -> tuple[str, str] | None:
        """None if the test passes, else (reason, detail)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "judge_timeout", "per-sample timeout reached before this test"
        result: RunResult = self.sandbox.run(program, test["input"], wall_s=remaining)
        if result.verdict == "time_limit" and time.monotonic() >= deadline:
            return "judge_timeout", "per-sample timeout cut the run short"
        if result.verdict != "ok":
            return result.verdict, result.detail
        if not outputs_match(test["output"], result.stdout):
            return "wrong_answer", f"expected {test['output'][:40]!r}, got {result.stdout[:40]!r}"
        return None

    def _judgment(self, passed: int, total: int, first_failure: tuple | None) -> Judgment:
        if first_failure is None:
            return Judgment(1.0, "correct")
        index, reason, detail = first_failure
        reward = passed / total if self.cfg.partial_credit else 0.0
        if reason not in ("syntax_error", "judge_timeout"):
            reward = max(reward, self.cfg.format_reward)
        return Judgment(reward, reason, f"test {index}: {detail}"[:DETAIL_CHARS])
