"""A character-level tokenizer built locally (no downloads), backed by a `tokenizers.Tokenizer`.

Ids 0..2 are the specials PAD, BOS, EOS (`<pad>`, `<bos>`, `<eos>`); each character of
the alphabet gets one id after them, so the vocabulary is fully determined by the
alphabet string. The backend (a word-level model over single characters) is what
`save` writes as a Hugging Face `tokenizer.json`; `load_tokenizer` reads one back.
"""
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids PAD, BOS, EOS
_SPECIALS = len(SPECIAL_TOKENS)
_REPLACEMENT = "\ufffd"


def _char_backend(alphabet: str) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: i + _SPECIALS for i, ch in enumerate(alphabet)})
    backend = Tokenizer(models.WordLevel(vocab))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join characters without spaces
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    # "<bos>" in the text is five characters, not BOS (not stored in tokenizer.json)
    backend.encode_special_tokens = True
    return backend


class CharTokenizer:
    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self.backend = _char_backend(alphabet)
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + _SPECIALS

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        unknown = set(text) - set(self.alphabet)
        if unknown:
            raise ValueError(f"character {min(unknown)!r} is not in the alphabet {self.alphabet!r}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids) -> str:
        """Text of `ids` up to the first EOS; PAD and BOS are skipped.

        An id outside the vocabulary (the model's may be larger) reads as U+FFFD, so a
        completion holding one never equals a plain answer string.
        """
        pieces, run = [], []
        for i in map(int, ids):
            if i == EOS:
                break
            if 0 <= i < self.vocab_size:
                run.append(i)
            else:
                pieces += [self.backend.decode(run), _REPLACEMENT]
                run = []
        return "".join(pieces) + self.backend.decode(run)

    def save(self, path) -> None:
        """Write the backend as a Hugging Face tokenizer.json file at `path`."""
        self.backend.save(str(path))


def load_tokenizer(path) -> CharTokenizer:
    """The CharTokenizer saved at `path`; ValueError if that tokenizer.json is not one."""
    vocab = Tokenizer.from_file(str(Path(path))).get_vocab(with_added_tokens=True)
    by_id = sorted(vocab, key=vocab.get)
    if tuple(by_id[:_SPECIALS]) != SPECIAL_TOKENS or sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: ids 0..{_SPECIALS - 1} must be {SPECIAL_TOKENS} and ids contiguous")
    characters = by_id[_SPECIALS:]
    if any(len(token) != 1 for token in characters):
        raise ValueError(f"{path}: not a character tokenizer (tokens {characters[:5]}...)")
    return CharTokenizer("".join(characters))
