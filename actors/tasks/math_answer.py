"""Math answers: find the final answer in a completion, and decide if it equals the reference.

Extraction (cheap string scanning, done by the caller): the last `\\boxed{...}` with balanced
braces; failing that, the last line that states the answer ("Answer: ...", "Final answer: ...",
"The answer is ...", "#### ..."). Math delimiters (`$`, `\\(`, `\\[`) and a trailing full stop
are removed.

Equivalence runs in a killable worker (`python -m actors.tasks.math_answer`, see
actors/tasks/killable.py): math-verify parses both sides (LaTeX through latex2sympy, or plain
expressions) into sympy and compares them: numbers exactly or after rounding a decimal,
expressions symbolically, sets and intervals as sets, relations and equations by their sides.
Parsing can blow up on hostile input (`9^{9^{9}}` never finishes), so its own signal-based
timeouts are off and the caller's per-sample timeout kills the worker instead.
"""
import re
import resource

from actors.tasks.killable import serve

WORKER_MEMORY_BYTES = 4 << 30  # sympy on a hostile answer may grow without bound; fail with MemoryError
_ANSWER_LINE = re.compile(r"^\s*(?:final answer|answer|the (?:final )?answer is|####)\s*[:=]?\s*(.+?)\s*$",
                          re.IGNORECASE)
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        content = _balanced(text, start + len("\\boxed{"))
        if content is not None:
            return content
        start = text.rfind("\\boxed{", 0, start)
    return None


def _balanced(text: str, begin: int) -> str | None:
    depth = 1
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def strip_delimiters(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    for left, right in _DELIMITERS:
        if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            return answer[len(left):-len(right)].strip()
    return answer


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer (see the module docstring), or None if it states none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return strip_delimiters(boxed) or None
    for line in reversed(text.splitlines()):
        match = _ANSWER_LINE.match(line)
        if match:
            return strip_delimiters(match.group(1)) or None
    return None


def _normalized(answer: str) -> str:
    return re.sub(r"\s+", "", answer)


def _readings(answer: str) -> list[str]:
    """The answer as written and, for a percentage, its value too (`25\\%` also reads as 1/4)."""
    answer = answer.replace("\\varnothing", "\\emptyset")  # a spelling latex2sympy does not know
    percent = re.fullmatch(r"(.+?)\s*\\?%", answer)
    return [answer] if percent is None else [answer, f"\\frac{{{percent.group(1)}}}{{100}}"]


def _parse(answer: str) -> list:
    """math-verify's parse, with set operations carried out (it leaves `A \\cap B` unevaluated)."""
    # imported here: the judge imports this module for extraction and must not load sympy
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from sympy import Set

    parsed = parse(f"${answer}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                   parsing_timeout=None)
    return [item.doit() if isinstance(item, Set) else item for item in parsed]


def compare(reference: str, answer: str) -> dict:
    """{"match": bool} (with "error" when the answer broke the parser), or {"reference_error"}."""
    if _normalized(reference) == _normalized(answer):
        return {"match": True}
    from math_verify import verify

    golds = [_parse(reading) for reading in _readings(reference)]
    if not golds[0]:
        return {"reference_error": f"reference answer {reference!r} does not parse"}
    try:
        candidates = (_parse(reading) for reading in _readings(answer))
        return {"match": any(c and verify(gold, c, timeout_seconds=None) for c in candidates for gold in golds)}
    except Exception as err:  # sympy fails in many ways on malformed input: such an answer is wrong
        return {"match": False, "error": f"{type(err).__name__}: {err}"[:200]}


def handle(request: dict) -> dict:
    return compare(request["reference"], request["answer"])


def main() -> None:
    import logging

    import math_verify  # noqa: F401  (import before announcing readiness: the import is the slow part)

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warnings: we kill instead
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    serve(handle)


if __name__ == "__main__":
    main()
