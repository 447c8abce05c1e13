"""The character tokenizer: hand-computed ids, decode rules, tokenizer.json round trip."""
import json

import pytest
from tokenizers import Tokenizer, models

from actors.tasks.carry_add import CarryAddTask
from conf.schema import TaskConfig
from model.tokenizer import BOS, EOS, PAD, CharTokenizer, load_tokenizer

ALPHABET = CarryAddTask.alphabet  # "0123456789+="


def test_specials_and_hand_computed_ids():
    tok = CharTokenizer(ALPHABET)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS) == (0, 1, 2)
    assert tok.vocab_size == 15
    assert tok.encode("47+38=", bos=True) == [1, 7, 10, 13, 6, 11, 14]
    assert tok.encode("085", eos=True) == [3, 11, 8, 2]
    with pytest.raises(ValueError, match="'x' is not in the alphabet"):
        tok.encode("4x")


def test_decode_stops_at_eos_skips_specials_and_marks_unknown_ids():
    tok = CharTokenizer(ALPHABET)
    assert tok.decode([1, 3, 0, 11, 8, 2, 4, 4]) == "085"
    assert tok.decode([3, 15, 4, 1000]) == "0\ufffd1\ufffd"  # ids past the vocabulary do not crash
    assert tok.decode([]) == ""


def test_text_that_spells_a_special_token_stays_characters():
    tok = CharTokenizer("<bos>")
    assert tok.encode("<bos>") == [3, 4, 5, 6, 7]


def test_tokenizer_json_round_trip(tmp_path):
    tok = CharTokenizer(ALPHABET)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    saved = json.loads(path.read_text())
    assert {t["content"]: t["id"] for t in saved["added_tokens"]} == {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    assert saved["model"]["vocab"]["0"] == 3 and saved["model"]["vocab"]["="] == 14

    loaded = load_tokenizer(path)
    assert loaded.alphabet == ALPHABET and loaded.vocab_size == tok.vocab_size
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    for text in ["47+38=", "085", "0123456789+=", "99+99=198"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert loaded.encode(text, bos=True, eos=True) == ids
        assert loaded.decode(ids) == tok.decode(ids) == text


def test_carry_add_task_prompts_decode_to_their_questions():
    task = CarryAddTask(TaskConfig(digits=2, eval_prompts=4))
    prompt = task.train_prompt(0)
    assert prompt.tokens[0] == BOS
    question = task.tokenizer.decode(prompt.tokens)
    assert len(question) == 6 and question[2] == "+" and question.endswith("=")
    answer = prompt.meta["answer"]
    assert task.tokenizer.decode(task.tokenizer.encode(answer, eos=True)) == answer


def test_tokenizer_json_reads_in_plain_tokenizers(tmp_path):
    """The file stands alone: the `tokenizers` library encodes and decodes as we do."""
    tok = CharTokenizer(ALPHABET)
    tok.save(tmp_path / "tokenizer.json")
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert plain.encode("47+38=085", add_special_tokens=False).ids == tok.encode("47+38=085")
    assert plain.decode(tok.encode("12+3=", bos=True, eos=True)) == "12+3="


def test_load_rejects_a_tokenizer_that_is_not_character_level(tmp_path):
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "ab": 3}
    Tokenizer(models.WordLevel(vocab, unk_token="<pad>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a character tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")
