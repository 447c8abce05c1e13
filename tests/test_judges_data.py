"""The math and code datasets and config: shipped sets load and are right, bad ones stop at load
naming the file, and the code judge's extraction, partial credit and format reward."""
import json
import os
import random
import shutil

import pytest

from actors.tasks import Judgment
from actors.tasks.code_task import CodeTask, extract_program, outputs_match
from actors.tasks.dataset import SHIPPED
from conf.load import ConfigError, load_config
from conf.schema import SandboxConfig, TaskConfig

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the code sandbox drops each run to its own uid: needs root")


def test_default_task_is_still_carry_add():
    cfg = load_config([])
    assert (cfg.task.name, cfg.model.max_seq_len, cfg.model.vocab_size) == ("carry_add", 32, 15)


@pytest.mark.parametrize("task, max_seq_len", [("math", 64), ("code", 128)])
def test_shipped_sets_load_with_their_tokenizer_json(task, max_seq_len):
    cfg = load_config([f"task={task}"])
    assert cfg.model.vocab_size == 99  # 3 specials + newline + 95 printable ASCII, from tokenizer.json
    assert cfg.model.max_seq_len == max_seq_len


def copy_of_shipped(tmp_path, task: str):
    folder = tmp_path / task
    shutil.copytree(SHIPPED / task, folder)
    return folder


def test_missing_field_stops_at_load_naming_file_and_line(tmp_path):
    folder = copy_of_shipped(tmp_path, "math")
    lines = (folder / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"prompt": "1+1=?"})
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"train\.jsonl:3: missing \['answer'\]"):
        load_config(["task=math", f"task.dataset={folder}"])


def test_character_outside_the_tokenizer_stops_at_load(tmp_path):
    folder = copy_of_shipped(tmp_path, "code")
    record = {"prompt": "Print \u03c0.", "tests": [{"input": "", "output": "3\n"}], "solution": "print(3)"}
    (folder / "eval.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=r"eval\.jsonl record 0: character '\u03c0' is not in the alphabet"):
        load_config(["task=code", f"task.dataset={folder}"])


def test_bad_dataset_folder_and_bad_limits_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["task=math", f"task.dataset={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"task\.format_reward"):
        load_config(["task=math", "task.format_reward=1.5"])
    with pytest.raises(ConfigError, match=r"task\.sandbox\.memory_mb"):
        load_config(["task=code", "task.sandbox.memory_mb=8"])


def test_training_prompts_visit_every_record_once_per_epoch():
    task = CodeTask(TaskConfig(name="code"))
    n = len(task.train)
    epoch = [task.train_prompt(i).tokens for i in range(n)]
    assert sorted(map(tuple, epoch)) == sorted(tuple(task.tokenizer.encode(r["prompt"], bos=True)) for r in task.train)
    assert [task.train_prompt(i).tokens for i in range(n, 2 * n)] != epoch  # a new order next epoch
    assert task.train_prompt(5).tokens == CodeTask(TaskConfig(name="code")).train_prompt(5).tokens
    prompt, completion = task.demonstration(random.Random(0))
    assert prompt[0] == task.tokenizer.bos_id and completion[-1] == task.tokenizer.eos_id


@pytest.mark.parametrize("text, program", [
    ("print(1)", "print(1)"),
    ("Here:\n```python\nprint(2)\n```\nDone.", "print(2)"),
    ("```\nprint(3)\n```", "print(3)"),
    ("```python\nprint(1)\n```\nbetter:\n```py\nprint(4)\n```", "print(4)"),  # the last closed block
    ("```python\nprint(5)", "```python\nprint(5)"),                             # unclosed: the text as is
])
def test_extract_program(text, program):
    assert extract_program(text) == program


def test_outputs_match_ignores_trailing_whitespace_only():
    assert outputs_match("1 2\n3\n", "1 2  \n3")
    assert not outputs_match("1 2\n3\n", "1  2\n3\n")
    assert not outputs_match("3\n", "3\n3\n")


@needs_root
@pytest.mark.timeout(120)
def test_every_shipped_solution_passes_its_tests():
    task = CodeTask(TaskConfig(name="code"))
    for record in task.train + task.held_out:
        tokens = task.tokenizer.encode(record["solution"], eos=True)
        assert task.judge(tokens, task.meta(record), timeout_s=30) == Judgment(1.0, "correct"), record["prompt"]


@needs_root
@pytest.mark.timeout(60)
def test_partial_credit_and_format_reward():
    meta = {"tests": json.dumps([{"input": "1\n", "output": "2\n"}, {"input": "2\n", "output": "4\n"},
                                 {"input": "3\n", "output": "5\n"}])}
    limits = SandboxConfig(cpu_s=1, wall_s=3.0)
    strict = CodeTask(TaskConfig(name="code", format_reward=0.1, sandbox=limits))
    partial = CodeTask(TaskConfig(name="code", partial_credit=True, sandbox=limits))
    doubled = "print(2 * int(input()))"  # passes tests 0 and 1, fails test 2

    def judge(task, program):
        return task.judge(task.tokenizer.encode(program, eos=True), meta, timeout_s=20)

    assert judge(strict, doubled) == Judgment(0.1, "wrong_answer", "test 2: expected '5\\n', got '6\\n'")
    assert judge(strict, "print(") == Judgment(0.0, "syntax_error", judge(strict, "print(").detail)
    assert judge(partial, doubled).reward == pytest.approx(2 / 3)
    assert judge(partial, "print(int(input()) + 1)").reward == pytest.approx(1 / 3)
    assert judge(partial, "") == Judgment(0.0, "no_answer")
