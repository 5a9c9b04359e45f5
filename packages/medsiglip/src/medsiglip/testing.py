"""Helpers for tests of medsiglip and of packages built on it: a SentencePiece model with
SigLIP's special pieces, trained in a second on a few sentences, for tiny checkpoints."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

__all__ = ["train_sentencepiece"]


def train_sentencepiece(folder: str | Path, corpus: Sequence[str], *, vocab_size: int = 90,
                        shuffled_lines: int = 400, words_per_line: int = 8,
                        seed: int = 0) -> Path:
    """Train a unigram model on ``corpus`` (ten copies) plus ``shuffled_lines`` lines of its
    words in random order; write ``folder/spiece.model`` and return its path.

    The pieces follow SigLIP's tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no ``<s>``.
    ``vocab_size`` is a soft limit (the corpus may not support that many pieces).
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = [w for line in corpus for w in line.split()]
    lines = list(corpus) * 10 + [" ".join(rng.choice(words) for _ in range(words_per_line))
                                 for _ in range(shuffled_lines)]
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"),
        vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    return folder / "spiece.model"
