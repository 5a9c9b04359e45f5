"""Builders the training tests share: tiny checkpoints (our Orbax layout, Gemma 3's real
tokenizer) and small chat data sets. Imported by the test modules (not a conftest, so the
evaluation tests keep theirs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
       "PYTHONHASHSEED": "0"}


_SMALL: dict[str, Any] = {}


def small_tokenizer() -> Any:
    """Gemma 3's tokenizer cut to about 4,300 pieces: its special, byte and user-defined
    pieces (chat markers, ``<start_of_image>``, newlines), the 3,500 best-ranked merges and the
    ASCII characters. It encodes any text (byte fallback) and keeps the chat format, while a
    tiny model's vocabulary projection shrinks 60-fold: the 262,144-row one dominates a tiny
    model's step on the CPU. Built with sentencepiece's own ``ModelProto``."""
    if "tok" not in _SMALL:
        import tempfile

        from sentencepiece import sentencepiece_model_pb2 as pb

        from medgemma_core import Tokenizer
        from medgemma_core.testing import gemma3_tokenizer

        with tempfile.TemporaryDirectory() as d:
            proto = pb.ModelProto()
            proto.ParseFromString(Path(gemma3_tokenizer().save(d)).read_bytes())
        normal = pb.ModelProto.SentencePiece.Type.NORMAL
        first = next(i for i, p in enumerate(proto.pieces) if p.type == normal)
        kept = [p for i, p in enumerate(proto.pieces)
                if i < first + 3500 or p.type == pb.ModelProto.SentencePiece.Type.USER_DEFINED
                or (p.type == normal and len(p.piece) == 1 and (p.piece.isascii()
                                                                or p.piece == "\u2581"))]
        small = pb.ModelProto()
        small.CopyFrom(proto)
        del small.pieces[:]
        small.pieces.extend(kept)
        _SMALL["tok"] = Tokenizer(small)
    return _SMALL["tok"]


def _vocab(tok: Any) -> int:
    return -(-(tok.vocab_size + 1) // 64) * 64


def tiny_text_checkpoint(folder: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """A random tiny Gemma 3 text model over :func:`small_tokenizer` (our Orbax layout)."""
    from flax import nnx

    from medgemma_core import Gemma3, Gemma3Config, save_decoder

    tok = small_tokenizer()
    model = Gemma3(Gemma3Config.tiny(vocab_size=_vocab(tok), num_layers=layers),
                   rngs=nnx.Rngs(seed))
    save_decoder(model, folder)
    tok.save(folder)
    return folder


def tiny_mm_config(**text: Any) -> Any:
    from medgemma_core import Gemma3Config, MultimodalConfig

    tok = small_tokenizer()
    base = MultimodalConfig.tiny()
    return MultimodalConfig(Gemma3Config.tiny(vocab_size=_vocab(tok), **text), base.vision,
                            mm_tokens_per_image=base.mm_tokens_per_image,
                      image_token_id=tok.vocab_size, boi_token_id=tok.boi_id,
                      eoi_token_id=tok.eoi_id)


def tiny_mm_checkpoint(folder: Path, *, seed: int = 0, **text: Any) -> Path:
    """A random tiny image-text model (32 px images, 4 soft tokens) as an Orbax folder, over
    :func:`small_tokenizer` plus ``<image_soft_token>``."""
    from flax import nnx

    from medgemma_core import Gemma3Multimodal
    from medgemma_core.checkpoints.multimodal import save_multimodal

    cfg = tiny_mm_config(**text)
    tok = small_tokenizer().with_added_tokens({cfg.image_token_id: "<image_soft_token>"})
    save_multimodal(Gemma3Multimodal(cfg, rngs=nnx.Rngs(seed)), folder, tokenizer=tok)
    return folder


def chat_rows(n: int, seed: int = 0, *, answers: list[str] | None = None) -> list[dict]:
    """Short text conversations ("What comes after 12?" -> "13")."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(0, 90))
        answer = answers[i % len(answers)] if answers else str(k + 1)
        rows.append({"messages": [{"role": "user", "content": f"What comes after {k}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def metrics(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def run_cli(args: list[str], *, env: dict | None = None, timeout: int = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """``medgemma-train ARGS`` in a fresh Python (its own JAX devices)."""
    full = {**os.environ, **ENV, **(env or {})}
    out = subprocess.run([sys.executable, "-m", "medgemma_train.cli", *args], env=full,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}: {out.stderr[-3000:]}")
    return out
