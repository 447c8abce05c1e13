"""The math judge: answer extraction by hand, agreement with 253 hand-labelled answer pairs,
the shipped set's references, the format reward, and a timeout that kills a hung comparison."""
import json
import time
from pathlib import Path

import pytest

from actors.tasks import Judgment
from actors.tasks.killable import KillableWorker, WorkerTimeout
from actors.tasks.math_answer import extract_final_answer, last_boxed
from actors.tasks.math_task import MathTask
from conf.schema import TaskConfig

PAIRS = Path(__file__).parent / "data" / "math_pairs.jsonl"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def verifier():
    worker = KillableWorker("actors.tasks.math_answer")
    yield worker
    worker.close()


@pytest.fixture
def math_task():
    task = MathTask(TaskConfig(name="math", format_reward=0.1))
    yield task
    task.close()


def completion(task: MathTask, text: str) -> list[int]:
    return task.tokenizer.encode(text, eos=True)


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\{1,2\\}}", "\\{1,2\\}"),       # the last box, nested braces kept
    ("\\boxed{2} and \\boxed{3", "2"),                          # an unclosed box does not count
    ("x = 4\nAnswer: $x=4$.", "x=4"),                           # the answer line, delimiters stripped
    ("The answer is 0.75", "0.75"),
    ("work\n#### 18", "18"),
    ("Answer: 3\nFinal answer: \\(5\\)", "5"),                 # the last stated answer
    ("I think it is 7", None),
    ("\\boxed{}", None),
])
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert last_boxed("no box") is None


def test_agrees_with_hand_labelled_pairs(verifier):
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert len(pairs) >= 200
    kinds = {p["kind"] for p in pairs}
    assert {"fraction", "decimal", "expression", "set", "interval"} <= kinds
    assert 0.3 < sum(p["equivalent"] for p in pairs) / len(pairs) < 0.7  # both labels well represented
    disagreements = []
    for pair in pairs:
        reply = verifier.request({"reference": pair["reference"], "answer": pair["answer"]}, timeout_s=10)
        if reply.get("match") != pair["equivalent"]:
            disagreements.append((pair, reply))
    agreement = 1 - len(disagreements) / len(pairs)
    assert agreement >= 0.99, disagreements


def test_every_shipped_reference_parses_and_its_demonstration_scores_one(math_task):
    for record in math_task.train + math_task.held_out:
        reference = math_task.reference_completion(record)
        judgment = math_task.judge(completion(math_task, reference), math_task.meta(record), timeout_s=10)
        assert judgment.reason == "correct", (record, judgment)


def test_rewards_and_reasons(math_task):
    meta = {"answer": "\\frac{3}{4}"}
    judge = lambda text: math_task.judge(completion(math_task, text), meta, timeout_s=10)  # noqa: E731
    assert judge("\\boxed{0.75}") == Judgment(1.0, "correct", "answer '0.75'")
    assert judge("Answer: 6/8") == Judgment(1.0, "correct", "answer '6/8'")
    assert judge("\\boxed{4/3}") == Judgment(0.1, "wrong_answer", "answer '4/3'")  # the format reward
    assert judge("three quarters") == Judgment(0.0, "no_answer")


def test_timeout_kills_a_hung_comparison_within_twice_its_setting(math_task):
    meta = {"answer": "1"}
    assert math_task.judge(completion(math_task, "\\boxed{1}"), meta, timeout_s=10).reason == "correct"  # warm
    timeout_s = 1.0
    start = time.monotonic()
    judgment = math_task.judge(completion(math_task, "\\boxed{9^{9^{9}}}"), meta, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert (judgment.reward, judgment.reason) == (0.0, "judge_timeout")
    assert timeout_s <= elapsed < 2 * timeout_s
    # the next sample gets a fresh worker
    assert math_task.judge(completion(math_task, "\\boxed{1}"), meta, timeout_s=10).reason == "correct"
    assert math_task.verifier.starts == 2


def test_worker_timeout_is_raised_to_the_caller(verifier):
    with pytest.raises(WorkerTimeout):
        verifier.request({"reference": "1", "answer": "9^{9^{9}}"}, timeout_s=0.5)
    assert verifier.request({"reference": "2", "answer": "1+1"}, timeout_s=10) == {"match": True}
