"""MFU figures: model FLOPs against hand counts, and the recorder's utilisation per role and run."""
import json

import pytest

from actors.record import Recorder, mfu
from conf.load import load_config


def totals(generator_flops: float, learner_flops: float, wall: float) -> dict:
    return {"generator_flops": generator_flops, "learner_flops": learner_flops, "generator_peak_flops": 10.0,
            "learner_peak_flops": 30.0, "generated_tokens": 0, "wall": wall}


def test_mfu_per_role_and_for_the_run():
    figures = mfu(totals(100, 1000, wall=0.0), totals(150, 1600, wall=2.0), seconds=2.0)
    assert figures == pytest.approx({"mfu/generator": 50 / (2 * 10), "mfu/learner": 600 / (2 * 30),
                                     "mfu/run": 650 / (2 * 40)})


def test_recorder_counts_rates_from_the_start_of_rl(tmp_path):
    recorder = Recorder(tmp_path, load_config([]))
    recorder.start_rl(totals(0, 0, wall=0.0))
    recorder.rl_start["wall"] -= 4.0  # RL started 4 s ago
    record = recorder.step({"step": 0, "reward": 0.5, **totals(40, 120, wall=0.0)})
    assert record["mfu/run"] == pytest.approx(160 / (4 * 40), rel=0.05)
    recorder.finish("finished", {})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mfu"]["mfu/learner"] == pytest.approx(120 / (4 * 30), rel=0.05)
