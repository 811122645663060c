"""Word-level caption vocabulary (VATT uses a 2^16-word vocabulary, 16 words per caption).

Ids: 0 = ``<pad>``, 1 = ``<unk>``, then words by decreasing frequency (ties broken
alphabetically, so a build is deterministic). Stored as ``vocab.txt``: one token per
line, line number (from 0) = id.

Text goes through the ``tokenizers`` library: NFKC, lower-casing, punctuation replaced by
spaces (so ``"Don't!"`` becomes the words ``don`` and ``t``), then whitespace splitting,
and a ``WordLevel`` model that maps unknown words to ``<unk>``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from vatt_fast.io import atomic_write

__all__ = ["Vocabulary", "PAD", "UNK", "PAD_ID", "UNK_ID"]

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.WhitespaceSplit()


class Vocabulary:
    """A word-level vocabulary with padding (id 0) and unknown (id 1).

    Args:
        tokens: the id-ordered token list; ``tokens[0]`` must be ``"<pad>"`` and
            ``tokens[1]`` ``"<unk>"``.

    Example:
        >>> v = Vocabulary.build(["A red circle", "a blue square"], max_size=16)
        >>> v.encode("a red square, please", 6)
        [2, 5, 6, 1, 0, 0]
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if len(tokens) < 2 or tokens[0] != PAD or tokens[1] != UNK:
            raise ValueError(
                f"a vocabulary must start with {PAD!r} (id 0) and {UNK!r} (id 1), got {tokens[:2]}; "
                f"build it with Vocabulary.build(texts, max_size)"
            )
        if len(set(tokens)) != len(tokens):
            dup = [t for t, n in Counter(tokens).items() if n > 1][:5]
            raise ValueError(f"duplicate tokens in vocabulary: {dup}")
        self.tokens: List[str] = tokens
        self._tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
        self._tok.normalizer = _normalizer()
        self._tok.pre_tokenizer = _pre_tokenizer()

    # --- construction ---------------------------------------------------------------
    @staticmethod
    def words(text: str) -> List[str]:
        """The normalised words of ``text`` (what the vocabulary counts and looks up)."""
        norm = _normalizer().normalize_str(text)
        return [w for w, _ in _pre_tokenizer().pre_tokenize_str(norm)]

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int = 2 ** 16, min_count: int = 1) -> "Vocabulary":
        """The ``max_size - 2`` most frequent words of ``texts``, after ``<pad>`` and ``<unk>``.

        Args:
            texts: caption texts.
            max_size: size of the vocabulary including the two special tokens (VATT: 2^16;
                keep it at most the model's ``vocab_size``).
            min_count: words seen fewer times are left out (they encode as ``<unk>``).
        """
        if max_size < 3:
            raise ValueError(f"max_size must be at least 3 (pad, unk, one word), got {max_size}")
        counts: Counter = Counter()
        for t in texts:
            counts.update(cls.words(t))
        counts.pop(PAD, None)
        counts.pop(UNK, None)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + ranked[: max_size - 2])

    # --- io ---------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``vocab.txt`` (one token per line, line number = id), atomically."""
        return atomic_write(path, "\n".join(self.tokens) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Vocabulary":
        """Read a ``vocab.txt`` (or the ``vocab.txt`` of a dataset folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.txt"
        if not path.is_file():
            raise FileNotFoundError(f"no vocabulary at {path}; build one with Vocabulary.build(texts).save(path)")
        with open(path, "r", encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        while tokens and tokens[-1] == "":
            tokens.pop()
        return cls(tokens)

    # --- encoding ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: str) -> bool:
        return self._tok.token_to_id(word) is not None

    def id(self, word: str) -> int:
        """The id of one (already normalised) word, ``UNK_ID`` when unknown."""
        i = self._tok.token_to_id(word)
        return UNK_ID if i is None else i

    def encode(self, text: str, length: int) -> List[int]:
        """Token ids of ``text``, truncated or padded with 0 to exactly ``length``."""
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        ids = self._tok.encode(text, add_special_tokens=False).ids[:length]
        return ids + [PAD_ID] * (length - len(ids))

    def encode_batch(self, texts: Sequence[str], length: int) -> np.ndarray:
        """int64 ``[len(texts), length]`` ids (see :meth:`encode`)."""
        out = np.zeros((len(texts), length), dtype=np.int64)
        if len(texts):
            for i, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
                ids = enc.ids[:length]
                out[i, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces, padding dropped."""
        return " ".join(self.tokens[int(i)] for i in ids if int(i) != PAD_ID)

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"
