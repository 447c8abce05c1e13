"""MFU figures: model FLOPs against hand counts, and the recorder's utilisation per role and run."""
import json

import pytest

from actors.record import Recorder, mfu
from conf.load import load_config
from model.engine import GenerationEngine, generate
from model.flops import generation_flops, matmul_params_per_token, training_flops
from tests.test_model import tiny_model


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
    record = recorder.step({"step": 0, "reward": 0.5, **totals(40, 120, wall=0.0), "rl_s": 4.0})  # 4 s of RL
    assert record["mfu/run"] == pytest.approx(160 / (4 * 40))
    recorder.finish("finished", {})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mfu"]["mfu/learner"] == pytest.approx(120 / (4 * 30))


def test_model_flops_by_hand():
    cfg = tiny_model().cfg  # D 64, 3 layers (1 dense), 4 heads, 2 kv heads, Dh 16, 8 experts top-2, F 32, V 20
    attention = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64          # q, k, v and o projections
    dense = 3 * 64 * cfg.dense_ffn_size
    moe = 64 * 8 + 3 * 64 * 32 * (2 + 1)                       # router, top-2 routed + 1 shared expert
    params = 3 * attention + dense + 2 * moe + 64 * 20         # + the LM head
    assert matmul_params_per_token(cfg) == params
    # a sequence of 5 positions: 5 tokens through the weights, 1 + 2 + ... + 5 = 15 keys attended
    assert training_flops(cfg, [5]) == 3 * (2 * params * 5 + 4 * 4 * 16 * 3 * 15)


def test_engine_counts_the_flops_of_what_it_generated():
    model = tiny_model().eval()
    engine = GenerationEngine(model, max_slots=2, max_len=48, eos_id=-1, pad_id=0, max_new_tokens=6, temperature=1.0)
    rollouts = generate(engine, [("a", [1, 5, 6, 7]), ("b", [1, 9, 4]), ("c", [1, 3, 3, 3, 3, 8])])
    expected = sum(generation_flops(model.cfg, len(r.prompt_tokens), len(r.completion_tokens)) for r in rollouts)
    assert engine.model_flops == pytest.approx(expected)
