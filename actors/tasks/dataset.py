"""Tasks read from a dataset folder: train.jsonl, eval.jsonl and tokenizer.json.

One JSON object per line, with a `prompt` and what the judge checks it against (math: `answer`;
code: `tests`), plus an optional `solution`, the reference completion used as a warm-up
demonstration. `tokenizer.json` is a character tokenizer (model/tokenizer.py) that must spell
every prompt and solution; the folder is checked when the task is built, so a bad record stops
the run at config load, naming the file and line.

Training prompts cycle through train.jsonl in a fresh seeded order each epoch; the held-out
prompts are the first `task.eval_prompts` records of eval.jsonl.
"""
import json
import random
from abc import ABC, abstractmethod
from pathlib import Path

from actors.tasks import Judgment, Prompt
from conf.schema import TaskConfig
from model.tokenizer import load_tokenizer

SHIPPED = Path(__file__).parent / "data"
SCORE_TIMEOUT_S = 10.0  # bound of one `score` call: the generator's greedy evaluation scores in process


def dataset_folder(cfg: TaskConfig) -> Path:
    return Path(cfg.dataset) if cfg.dataset else SHIPPED / cfg.name


def existing(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    return path


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """The records of `path`; ValueError naming the file and line of the first bad one."""
    records = []
    for number, line in enumerate(existing(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        missing = [key for key in required if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing {missing}")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


class DatasetTask(ABC):
    """What math and code share; a subclass names its `required` record fields."""

    required: tuple[str, ...] = ("prompt",)

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        folder = dataset_folder(cfg)
        self.tokenizer = load_tokenizer(existing(folder / "tokenizer.json"))
        self.train = read_jsonl(folder / "train.jsonl", self.required)
        self.held_out = read_jsonl(folder / "eval.jsonl", self.required)[: cfg.eval_prompts]
        self.demonstrations = [r for r in self.train if self.reference_completion(r)]
        self._check_spelling(folder)

    def _check_spelling(self, folder: Path) -> None:
        for split, records in (("train", self.train), ("eval", self.held_out)):
            for index, record in enumerate(records):
                for text in (record["prompt"], self.reference_completion(record)):
                    try:
                        self.tokenizer.encode(text)
                    except ValueError as err:
                        raise ValueError(f"{folder}/{split}.jsonl record {index}: {err}") from None

    @property
    def max_prompt_len(self) -> int:
        return max(len(r["prompt"]) for r in self.train + self.held_out) + 1  # BOS

    @property
    def max_answer_len(self) -> int:
        return max(len(self.reference_completion(r)) for r in self.train + self.held_out) + 1  # EOS

    def _prompt(self, uid: str, record: dict) -> Prompt:
        return Prompt(uid=uid, tokens=self.tokenizer.encode(record["prompt"], bos=True), meta=self.meta(record))

    def train_prompt(self, index: int) -> Prompt:
        """The index-th training prompt: epoch index // n visits every record once, in a seeded order."""
        epoch, position = divmod(index, len(self.train))
        order = list(range(len(self.train)))
        random.Random(f"train-{self.cfg.seed}-{epoch}").shuffle(order)
        return self._prompt(f"train-{index}", self.train[order[position]])

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt(f"eval-{i}", record) for i, record in enumerate(self.held_out)]

    def demonstration(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """(prompt tokens, completion tokens) of a training record's reference solution."""
        if not self.demonstrations:
            raise ValueError("no train.jsonl record has a `solution` to warm up on (set learner.warmup_steps=0)")
        record = rng.choice(self.demonstrations)
        return (self.tokenizer.encode(record["prompt"], bos=True),
                self.tokenizer.encode(self.reference_completion(record), eos=True))

    def score(self, completion_tokens, meta: dict) -> float:
        return self.judge(completion_tokens, meta, SCORE_TIMEOUT_S).reward

    @abstractmethod
    def meta(self, record: dict) -> dict:
        """What travels with the prompt to the judge (msgpack-able str/int/float/bool values)."""

    @abstractmethod
    def reference_completion(self, record: dict) -> str:
        """The record's reference completion ('' if it has none): a warm-up demonstration."""

    @abstractmethod
    def judge(self, completion_tokens, meta: dict, timeout_s: float) -> Judgment:
        """Reward and reason of one completion, returned within about `timeout_s`."""
