"""A character-level tokenizer built locally (no downloads).

Ids 0..2 are the specials PAD, BOS, EOS; each character of the alphabet gets one
id after them, so the vocabulary is fully determined by the alphabet string.
"""
PAD, BOS, EOS = 0, 1, 2
_SPECIALS = 3


class CharTokenizer:
    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._id_of = {ch: i + _SPECIALS for i, ch in enumerate(alphabet)}
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + _SPECIALS

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self._id_of[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the alphabet {self.alphabet!r}") from None
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids) -> str:
        """Text of `ids` up to the first EOS; PAD and BOS are skipped."""
        chars = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= _SPECIALS:
                chars.append(self.alphabet[i - _SPECIALS] if i < self.vocab_size else "\ufffd")
        return "".join(chars)
