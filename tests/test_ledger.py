"""The driver's ledger: every admitted prompt gets exactly one fate; re-issued copies never train twice."""
import pytest

from actors.ledger import Ledger, retry_uid, root_of

G = 4


def prompts(*uids: str) -> list[dict]:
    return [{"uid": uid, "tokens": [1, 2], "meta": {"answer": "3"}} for uid in uids]


def test_fates_add_up_to_what_was_generated():
    ledger = Ledger(G)
    ledger.admit(prompts("p0", "p1", "p2", "p3", "p4"), "generator-0")
    assert ledger.settle({"p0": "trained", "p1": "uninformative", "p2": "purged"}) == 3
    assert ledger.settle({"p3": "run_end", "p4": "unfinished"}) == 2
    totals = ledger.totals()
    assert totals == {"admitted": 20, "unfinished_at_stop": 4, "generated": 16, "trained": 4,
                      "dropped": {"purged": 4, "run_end": 4, "uninformative": 4},
                      "in_flight_at_end": 0, "trained_twice": 0}


def test_a_reissued_copy_replaces_the_lost_one_unless_the_lost_one_turns_up():
    ledger = Ledger(G)
    ledger.admit(prompts("p0", "p1"), "generator-1")
    retries, settled = ledger.reissue(ledger.pending("generator-1"))
    assert settled == 2 and [r["uid"] for r in retries] == ["p0~r1", "p1~r1"]
    assert retries[0]["tokens"] == [1, 2]
    ledger.admit(retries, "generator-0")
    # p0's group was on its way after all: it is trained, its retry is the duplicate
    assert ledger.settle({"p0": "trained", "p0~r1": "duplicate", "p1~r1": "trained"}) == 2
    totals = ledger.totals()
    assert totals["trained"] == 8 and totals["dropped"] == {"actor_lost": 4, "duplicate": 4}
    assert totals["in_flight_at_end"] == 0 and totals["trained_twice"] == 0
    assert totals["generated"] == totals["trained"] + sum(totals["dropped"].values())


def test_a_final_fate_cannot_be_reported_twice_and_unknown_uids_are_refused():
    ledger = Ledger(G)
    ledger.admit(prompts("p0"), "generator-0")
    ledger.settle({"p0": "trained"})
    with pytest.raises(ValueError, match="already 'trained'"):
        ledger.settle({"p0": "run_end"})
    with pytest.raises(ValueError, match="never admitted"):
        ledger.settle({"p9": "trained"})
    with pytest.raises(ValueError, match="admitted twice"):
        ledger.admit(prompts("p0"), "generator-0")


def test_retry_uids_keep_their_root_and_the_ledger_round_trips():
    assert retry_uid("train-7") == "train-7~r1" and retry_uid("train-7~r1") == "train-7~r2"
    assert root_of("train-7~r2") == "train-7" and root_of("train-7") == "train-7"
    ledger = Ledger(G)
    ledger.admit(prompts("p0", "p1"), "generator-0")
    ledger.settle({"p0": "trained"})
    again = Ledger.from_dict(G, ledger.to_dict())
    assert again.totals() == ledger.totals() and again.pending() == ["p1"]
