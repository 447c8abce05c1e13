"""The driver's ledger: the fate of every prompt admitted to the generators, by uid.

Counters kept inside actors die with them; the ledger does not. Every admitted prompt
(one GRPO group of G samples) is a *copy* with a uid, owned by the generator it was
handed to. Downstream actors report fates by uid: the learner `trained`,
`uninformative` or `duplicate`; a generator `purged` (C3PO++ sigma) or `unfinished`
(still queued or decoding when the run stopped); judges and learners `run_end` (on
their way at the stop). When an actor dies, the copies that may have died with it
are re-issued under a new uid `<root>~r<n>` and the old copy is marked `actor_lost`,
a provisional fate: if the old copy turns up after all, its downstream fate replaces it
(and the learner drops whichever copy of a root comes second as `duplicate`, so no
prompt is trained twice).

Admission control counts a copy as consumed the first time it gets any fate.
"""
from collections import Counter
from dataclasses import dataclass, field

RETRY_MARK = "~r"
PROVISIONAL = "actor_lost"
NOT_GENERATED = "unfinished"


def root_of(uid: str) -> str:
    """The prompt a copy was made from: 'train-7~r2' -> 'train-7'."""
    return uid.split(RETRY_MARK, 1)[0]


def retry_uid(uid: str) -> str:
    root, _, retry = uid.partition(RETRY_MARK)
    return f"{root}{RETRY_MARK}{int(retry or 0) + 1}"


@dataclass
class Ledger:
    group_size: int
    owner: dict[str, str] = field(default_factory=dict)   # copy uid -> generator name
    fate: dict[str, str] = field(default_factory=dict)    # copy uid -> fate
    prompts: dict[str, dict] = field(default_factory=dict)  # copy uid -> the prompt, while it has no fate

    def admit(self, prompts: list[dict], owner: str) -> None:
        for prompt in prompts:
            if prompt["uid"] in self.owner:
                raise ValueError(f"prompt {prompt['uid']} admitted twice")
            self.owner[prompt["uid"]] = owner
            self.prompts[prompt["uid"]] = prompt

    def settle(self, fates: dict[str, str]) -> int:
        """Record downstream fates; returns how many copies got their first fate (admission)."""
        first = 0
        for uid, fate in fates.items():
            if uid not in self.owner:
                raise ValueError(f"fate {fate!r} reported for {uid}, which was never admitted")
            previous = self.fate.get(uid)
            if previous is not None and previous != PROVISIONAL:
                raise ValueError(f"{uid} is already {previous!r}, reported again as {fate!r}")
            first += previous is None
            self.fate[uid] = fate
            self.prompts.pop(uid, None)
        return first

    def pending(self, owner: str | None = None) -> list[str]:
        """Copies without a fate yet (of one generator, or all)."""
        return [uid for uid in self.prompts if owner is None or self.owner[uid] == owner]

    def reissue(self, uids: list[str]) -> tuple[list[dict], int]:
        """Mark `uids` lost with their actor; returns their retries (to admit) and the copies settled."""
        retries = [{**self.prompts[uid], "uid": retry_uid(uid)} for uid in uids]
        return retries, self.settle({uid: PROVISIONAL for uid in uids})

    def totals(self) -> dict:
        """In samples: generated = trained + dropped by reason; in_flight_at_end = copies with no fate."""
        G = self.group_size
        by_fate = Counter(self.fate.values())
        unfinished = by_fate.pop(NOT_GENERATED, 0)
        trained = by_fate.pop("trained", 0)
        trained_roots = Counter(root_of(uid) for uid, fate in self.fate.items() if fate == "trained")
        return {"admitted": G * len(self.owner), "unfinished_at_stop": G * unfinished,
                "generated": G * (len(self.owner) - unfinished - len(self.prompts)),
                "trained": G * trained, "dropped": {reason: G * n for reason, n in sorted(by_fate.items())},
                "in_flight_at_end": G * len(self.prompts),
                "trained_twice": G * sum(n - 1 for n in trained_roots.values())}

    def to_dict(self) -> dict:
        return {"owner": self.owner, "fate": self.fate, "prompts": self.prompts}

    @staticmethod
    def from_dict(group_size: int, state: dict) -> "Ledger":
        return Ledger(group_size, dict(state["owner"]), dict(state["fate"]), dict(state["prompts"]))
