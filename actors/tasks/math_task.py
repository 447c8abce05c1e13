"""math: questions with one final answer, checked for mathematical equivalence (math-verify).

Records: {"prompt", "answer"} with the answer in LaTeX (`\\frac{3}{4}`, `\\{-2,2\\}`, `(0,1]`),
and an optional "solution"; without one the warm-up demonstration is `\\boxed{<answer>}`.
Reward 1 if the completion's final answer (actors/tasks/math_answer.py) equals the reference,
else `task.format_reward` if it stated a final answer at all, else 0. The comparison runs in a
killable worker process, so an answer that sends sympy into an endless computation costs one
timeout and scores 0 (reason judge_timeout).
"""
from actors.tasks import Judgment
from actors.tasks.dataset import DatasetTask
from actors.tasks.killable import KillableWorker, WorkerFailure
from actors.tasks.math_answer import extract_final_answer
from conf.schema import TaskConfig

DETAIL_CHARS = 80


class MathTask(DatasetTask):
    required = ("prompt", "answer")

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self.verifier = KillableWorker("actors.tasks.math_answer")  # started by the first comparison

    def meta(self, record: dict) -> dict:
        return {"answer": record["answer"]}

    def reference_completion(self, record: dict) -> str:
        return record.get("solution") or f"\\boxed{{{record['answer']}}}"

    def judge(self, completion_tokens, meta: dict, timeout_s: float) -> Judgment:
        answer = extract_final_answer(self.tokenizer.decode(completion_tokens))
        if answer is None:
            return Judgment(0.0, "no_answer")
        detail = f"answer {answer[:DETAIL_CHARS]!r}"
        try:
            reply = self.verifier.request({"reference": meta["answer"], "answer": answer}, timeout_s)
        except WorkerFailure as failure:
            return Judgment(0.0, failure.reason, detail)
        if "reference_error" in reply:  # the dataset is wrong, not the completion: stop loudly
            raise ValueError(reply["reference_error"])
        if reply["match"]:
            return Judgment(1.0, "correct", detail)
        return Judgment(self.cfg.format_reward, "wrong_answer", detail)

    def close(self) -> None:
        """Stop the comparison worker (it also dies with the thread that started it)."""
        self.verifier.close()
