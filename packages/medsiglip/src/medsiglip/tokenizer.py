"""The SigLIP text tokenizer over a SentencePiece model (``spiece.model``).

Each text is canonicalized (lower-cased, ASCII punctuation removed, whitespace runs collapsed
to one space, stripped), split into pieces, given a closing ``</s>``, truncated to
``max_length`` (the ``</s>`` kept last) and padded with ``</s>`` to ``max_length``. The ids equal
those of transformers' ``SiglipTokenizer(..)(text, padding="max_length", truncation=True)``,
including its handling of the literal strings ``</s>`` and ``<unk>`` inside a text (they become
their special ids, swallowing the whitespace around them).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

_WORD = "\u2581"  # SentencePiece's word-start marker
_PUNCT = str.maketrans("", "", string.punctuation)
_SPACES = re.compile(r"\s+")


def canonicalize(text: str, *, lower: bool = True) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace, strip."""
    if lower:
        text = text.lower()
    return _SPACES.sub(" ", text.translate(_PUNCT)).strip()


class SiglipTokenizer:
    """``encode(texts) -> int32 [B, max_length]`` ids for the SigLIP text tower."""

    def __init__(self, model_file: str | Path, *, max_length: int = 64, lower: bool = True,
                 eos_token: str = "</s>", unk_token: str = "<unk>"):
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no SentencePiece model; pass the checkpoint's "
                                    "spiece.model (or tokenizer.model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{path}: not a SentencePiece model ({err})") from None
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.lower = lower
        self.eos_token, self.unk_token = eos_token, unk_token
        self.eos_id = self._special_id(eos_token)
        self.unk_id = self._special_id(unk_token)
        self.pad_id = self.eos_id
        self._unk_len = len(self.sp.encode(unk_token))
        specials = sorted({eos_token, unk_token}, key=len, reverse=True)
        self._split = re.compile(r"\s*(" + "|".join(map(re.escape, specials)) + r")\s*")

    def _special_id(self, piece: str) -> int:
        pid = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(pid) != piece:
            raise ValueError(f"the SentencePiece model has no {piece!r} piece: not a SigLIP "
                             "vocabulary")
        return pid

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _segment(self, text: str) -> list[int]:
        """Pieces of one run of text between special tokens, without SentencePiece's implicit
        word-start marker (a leading ``\u2581`` in ``text`` supplies it)."""
        text = canonicalize(text, lower=self.lower)
        ids = self.sp.encode(self.unk_token + text)
        return ids[self._unk_len:] if len(ids) >= self._unk_len else ids

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without ``</s>``, padding or truncation."""
        parts = self._split.split(_WORD + text.replace(_WORD, " "))
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # captured special token
                ids.append(self.eos_id if part == self.eos_token else self.unk_id)
            elif part:
                ids.extend(self._segment(part))
        word = self.sp.piece_to_id(_WORD)
        if len(ids) > 1 and ids[0] == word and ids[1] in (self.eos_id, self.unk_id):
            ids = ids[1:]
        return ids

    def encode_one(self, text: str) -> list[int]:
        """``max_length`` ids: pieces (truncated), ``</s>``, then ``</s>`` padding."""
        ids = self.tokenize(text)[: self.max_length - 1]
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def encode(self, texts: str | Sequence[str]) -> np.ndarray:
        """One text or a list -> ``int32 [B, max_length]``."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        return np.asarray([self.encode_one(t) for t in texts], dtype=np.int32).reshape(
            len(texts), self.max_length
        )

    __call__ = encode

    def decode(self, ids: Sequence[int]) -> str:
        """Pieces back to (canonicalized) text, dropping ``</s>``."""
        return self.sp.decode([int(i) for i in ids if int(i) != self.eos_id])


def find_tokenizer_file(folder: str | Path) -> Path:
    """``spiece.model`` (SigLIP's name) or ``tokenizer.model`` in a checkpoint folder."""
    for name in ("spiece.model", "tokenizer.model"):
        path = Path(folder) / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{folder}: no spiece.model or tokenizer.model; copy the SentencePiece model of the "
        "checkpoint into the folder"
    )
