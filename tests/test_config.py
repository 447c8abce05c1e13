"""Config loading: defaults, overrides, and one-line errors before any actor starts."""
import subprocess
import sys

import pytest

from conf.load import ConfigError, load_config
from tests.conftest import REPO_ROOT


def test_defaults_and_overrides():
    cfg = load_config(["generator.num=3", "learner.lr=3e-4"])
    assert cfg.generator.num == 3 and cfg.learner.lr == 3e-4
    assert cfg.model.vocab_size == 15  # resolved from the carry_add tokenizer


@pytest.mark.parametrize("override, field", [
    ("generator.num=0", "generator.num"),
    ("judge.num=0", "judge.num"),
    ("no_such_key=1", "no_such_key"),
    ("algo.icepop.alpha=6", "algo.icepop.alpha"),
    ("generator.num=abc", "generator.num"),
    ("model.top_k=9", "model.top_k"),
    ("generator.max_new_tokens=64", "model.max_seq_len"),
    ("algo.aggregation=token_budget", "algo.token_budget"),
    ("task.name=chess", "task.name"),
    ("algo.round_token_budget=600", "run.on_actor_failure=stop"),
    ("run.on_actor_failure=retry", "run.on_actor_failure"),
    ("run.resume=/no/such/run", "run.resume"),
])
def test_bad_override_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config([override])


def test_bad_override_exits_before_any_actor_starts():
    result = subprocess.run([sys.executable, "run.py", "algo.icepop.alpha=6"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["config error: algo.icepop.alpha (6.0) must be within 0..algo.icepop.beta (5.0)"]
    assert "Ray" not in result.stdout + result.stderr
