"""The actors' timelines: phase clocks and each role's share of time per phase."""
import time

import pytest

from actors.phases import PhaseClock
from actors.record import phase_shares


def test_phases_and_the_rest_make_up_the_wall_time():
    clock = PhaseClock()
    with clock.phase("decoding"):
        time.sleep(0.05)
    time.sleep(0.02)
    with clock.phase("idle"):
        time.sleep(0.03)
    seconds = clock.seconds()
    assert seconds["decoding"] >= 0.05 and seconds["idle"] >= 0.03 and seconds["unaccounted"] >= 0.02
    assert seconds["decoding"] + seconds["idle"] + seconds["unaccounted"] == pytest.approx(seconds["wall"])


def test_shares_per_role_between_two_steps():
    before = {"phases/generator/decoding": 10.0, "phases/generator/idle": 2.0, "phases/generator/wall": 12.0,
              "phases/learner/training": 5.0, "phases/learner/wall": 12.0}
    after = {"phases/generator/decoding": 13.0, "phases/generator/idle": 3.0, "phases/generator/wall": 16.0,
             "phases/learner/training": 6.0, "phases/learner/waiting": 3.0, "phases/learner/wall": 16.0}
    assert phase_shares(before, after) == {"share/generator/decoding": 0.75, "share/generator/idle": 0.25,
                                           "share/learner/training": 0.25, "share/learner/waiting": 0.75}
