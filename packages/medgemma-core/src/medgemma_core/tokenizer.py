"""The Gemma 3 tokenizer: SentencePiece BPE with byte fallback, special tokens parsed from text.

A `Tokenizer` comes from a SentencePiece ``tokenizer.model``, from a Hugging Face checkpoint
folder (which may add tokens beyond the SentencePiece model, e.g. ``<image_soft_token>`` = 262144),
or from a GGUF file, whose ``tokenizer.ggml.{tokens,scores,token_type}`` arrays are turned back
into a SentencePiece ``ModelProto``. It encodes the way the reference (``transformers``)
tokenizer does::

    tok = Tokenizer.from_checkpoint("gemma-3-270m.gguf")
    ids = tok.encode("<start_of_turn>user\\nHi<end_of_turn>\\n", add_bos=True)
    text = tok.decode(ids)                      # "<bos><start_of_turn>user\\nHi..."
    stream = tok.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]   # "".join(pieces) == text

Two places where plain SentencePiece and the reference differ are bridged when the model is
loaded (the model written by `save` is the faithful one):

* Every control piece (``<bos>``, ``<start_of_turn>``, ``<unused94>``, ...) and ``<unk>`` written in
  the text is recognised as that one token, as ``transformers`` does; SentencePiece would cut it up.
* Runs of spaces (user-defined pieces ``▁▁`` ... ``▁`` x 31) are ordinary BPE merges in the
  reference, ranked above every other merge, not greedy longest matches: 32 spaces are 16 + 16.
  A Hugging Face ``tokenizer.json`` also matches those pieces whole where the text itself
  contains ``▁`` characters; transformers' GGUF loader does not. Each source gets its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

__all__ = ["StreamDecoder", "Tokenizer", "read_gguf_tokenizer_metadata"]

_Type = sp_pb2.ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    _Type.NORMAL, _Type.UNKNOWN, _Type.CONTROL, _Type.USER_DEFINED, _Type.UNUSED, _Type.BYTE)
SPACE = "\u2581"  # SentencePiece's visible space
_HIDDEN_UNK = "\u2581<medgemma-hidden-unk>\u2581"  # unreachable with byte fallback on
_LITERAL_RUN = re.compile(SPACE + "{2,}")
_NEWLINES = re.compile("\n+")
_CHUNK = 1000  # characters: long texts are encoded in pieces cut after runs of newlines


def read_gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The ``general.architecture`` and every ``tokenizer.*`` key of a GGUF file's metadata.

    Arrays come back as Python lists (``tokenizer.ggml.tokens``: list[str] of length V,
    ``scores``: list[float], ``token_type``: list[int]). Only the header is read, by
    :class:`~medgemma_core.checkpoints.gguf_index.GGUFIndex` (the ``gguf`` package's reader
    builds one numpy view per vocabulary string, about 15 s for Gemma's 262,144).
    """
    from .checkpoints.gguf_index import GGUFIndex

    path = Path(path)
    try:
        meta = GGUFIndex(path, keep_arrays=("tokenizer.",)).metadata
    except ValueError as e:
        raise ValueError(f"{path}: {e}; re-download the file") from None
    return {k: v for k, v in meta.items()
            if k.startswith("tokenizer.") or k == "general.architecture"}


def _proto_from_gguf(meta: Mapping[str, Any], path: Path) -> sp_pb2.ModelProto:
    """A SentencePiece BPE ModelProto with the GGUF vocabulary, scores and piece types."""
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; only SentencePiece "
                         "vocabularies ('llama', which Gemma files use) can be rebuilt")
    try:
        tokens = meta["tokenizer.ggml.tokens"]
        scores = meta["tokenizer.ggml.scores"]
        types = meta["tokenizer.ggml.token_type"]
    except KeyError as e:
        raise ValueError(f"{path}: the GGUF metadata has no {e.args[0]}; it carries no vocabulary") from e
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"{path}: tokenizer.ggml.tokens/scores/token_type differ in length "
                         f"({len(tokens)}/{len(scores)}/{len(types)})")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    proto = sp_pb2.ModelProto()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            raise ValueError(f"{path}: token {i} ({token!r}) has unknown token_type {kind}")
        if kind == USER_DEFINED:  # llama.cpp wrote the spaces of user-defined pieces raw
            token = token.replace(" ", SPACE)
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
        if i == unk:
            piece.type = UNKNOWN
    unk_ids = [i for i, p in enumerate(proto.pieces) if p.type == UNKNOWN]
    if len(unk_ids) != 1:
        raise ValueError(f"{path}: the vocabulary needs exactly one unknown token, found {len(unk_ids)}")
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(p.type == BYTE for p in proto.pieces)
    for name in ("unk", "bos", "eos", "pad"):
        key = "unknown" if name == "unk" else "padding" if name == "pad" else name
        idx = unk_ids[0] if name == "unk" else meta.get(f"tokenizer.ggml.{key}_token_id", -1)
        setattr(spec, f"{name}_id", int(idx))
        if 0 <= idx < len(tokens):
            setattr(spec, f"{name}_piece", proto.pieces[idx].piece)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


def _encoding_proto(proto: sp_pb2.ModelProto, added: Mapping[int, str], special: frozenset[int],
                    *, parse_special: bool) -> sp_pb2.ModelProto:
    """The model SentencePiece encodes with: the reference's behaviour, see the module doc."""
    enc = sp_pb2.ModelProto()
    enc.CopyFrom(proto)
    pieces = enc.pieces
    top = max((p.score for p in pieces if p.type == NORMAL), default=0.0)
    runs = [p for p in pieces if p.type == USER_DEFINED and p.piece and not p.piece.strip(SPACE)]
    for rank, p in enumerate(runs):  # best first, in id order, above every other merge
        p.type, p.score = NORMAL, top + len(runs) - rank
    for i in sorted(added):
        p = pieces.add()
        p.piece, p.score = added[i], 0.0
        p.type = CONTROL if (i in special and not parse_special) else USER_DEFINED
    if parse_special and enc.trainer_spec.byte_fallback:
        for p in pieces:
            if p.type in (CONTROL, UNKNOWN):
                p.type = USER_DEFINED
        hidden = pieces.add()
        hidden.piece, hidden.score, hidden.type = _HIDDEN_UNK, 0.0, UNKNOWN
        enc.trainer_spec.unk_id = len(pieces) - 1
    elif parse_special:  # without byte fallback <unk> must stay the unknown piece
        for p in pieces:
            if p.type == CONTROL:
                p.type = USER_DEFINED
    spec = enc.trainer_spec
    spec.vocab_size = len(pieces)
    spec.bos_id = spec.eos_id = spec.pad_id = -1
    return enc


def _read_model(path: Path) -> sp_pb2.ModelProto:
    if not path.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {path}")
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise ValueError(f"{path} is not a SentencePiece model ({e})") from e
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (it has no pieces)")
    bad = next((i for i, p in enumerate(proto.pieces) if not isinstance(p.piece, str)), None)
    if bad is not None:  # protobuf hands a piece that is not UTF-8 back as bytes
        raise ValueError(f"{path}: piece {bad} is not UTF-8 text; the file is corrupt")
    return proto


def _processor(proto: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except RuntimeError as e:  # SentencePiece's own checks ("byte piece <0 15> is invalid")
        raise ValueError(f"the SentencePiece model is invalid ({e})") from None
    return sp


def _json_value(path: Path, key: str) -> Any:
    """A top-level value of a JSON file, decoding only that value when its key is found (the
    added tokens sit near the top of a 33 MB tokenizer.json; a full parse takes seconds)."""
    text = path.read_text()
    at = text.find(f'"{key}"')
    if at >= 0:
        start = text.find(":", at) + 1
        start += len(text[start:start + 100]) - len(text[start:start + 100].lstrip())
        try:
            return json.JSONDecoder().raw_decode(text, start)[0]
        except json.JSONDecodeError:
            pass
    return json.loads(text).get(key)


def _hf_added_tokens(folder: Path) -> tuple[dict[int, str], set[int]]:
    """``({id: content}, special ids)`` of the added tokens a Hugging Face folder declares."""
    added: dict[int, str] = {}
    special: set[int] = set()
    config, fast = folder / "tokenizer_config.json", folder / "tokenizer.json"
    try:
        if config.is_file() and "added_tokens_decoder" in (data := json.loads(config.read_text())):
            entries = [(int(k), v) for k, v in data["added_tokens_decoder"].items()]
        elif fast.is_file():
            entries = [(int(v["id"]), v) for v in _json_value(fast, "added_tokens") or []]
        else:
            return added, special
        for i, entry in entries:
            added[i] = str(entry["content"])
            if entry.get("special"):
                special.add(i)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder}: cannot read its added tokens ({e}); fix or remove "
                         "tokenizer_config.json / tokenizer.json") from e
    return added, special


class Tokenizer:
    """Gemma 3 tokenizer over a SentencePiece model (262,144 pieces for Gemma 3).

    Args:
      model: a SentencePiece ``ModelProto`` or its serialized bytes (a ``tokenizer.model``).
      added_tokens: ``{id: text}`` for tokens beyond the model's pieces (ids must continue
        the model's, e.g. ``{262144: "<image_soft_token>"}``); ids inside it are checked.
      special_ids: ids ``decode(skip_special_tokens=True)`` drops, on top of the model's
        control and unknown pieces.
      literal_space_runs: match the ``▁▁``... pieces whole where the text itself holds ``▁``
        characters, as a Hugging Face ``tokenizer.json`` does (transformers' GGUF loader does not).
    """

    def __init__(self, model: sp_pb2.ModelProto | bytes, *,
                 added_tokens: Mapping[int, str] | None = None,
                 special_ids: Iterable[int] = (), literal_space_runs: bool = True) -> None:
        if isinstance(model, (bytes, bytearray)):
            proto = sp_pb2.ModelProto()
            proto.ParseFromString(bytes(model))
        else:
            proto = model
        if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
            raise ValueError("the SentencePiece model is not a BPE model; Gemma tokenizers are BPE")
        self._proto = proto
        n = len(proto.pieces)
        pieces = [p.piece for p in proto.pieces]
        added = {}
        for i, text in sorted((added_tokens or {}).items()):
            if i < n:
                if pieces[i] != text:
                    raise ValueError(f"added token {i} is {text!r} but the model's piece {i} is "
                                     f"{pieces[i]!r}; the tokenizer files do not belong together")
                continue
            if i != n + len(added):
                raise ValueError(f"added token ids must continue the model's {n} pieces without "
                                 f"gaps; got {i} ({text!r})")
            added[i] = text
        self._added = added
        self._pieces = pieces + [added[i] for i in sorted(added)]
        kinds = [p.type for p in proto.pieces]
        self._special = frozenset(
            [i for i, k in enumerate(kinds) if k in (CONTROL, UNKNOWN)]
            + [i for i in special_ids if 0 <= i < len(self._pieces)])
        self._sp = _processor(_encoding_proto(proto, added, self._special, parse_special=True))
        self._sp_literal: spm.SentencePieceProcessor | None = None
        # decode tables: the text of each id, and the byte value of <0xNN> pieces (-1 otherwise)
        self._byte = [int(p[3:5], 16) if k == BYTE else -1 for p, k in zip(pieces, kinds)]
        self._byte += [-1] * len(added)
        self._text = [p.replace(SPACE, " ") for p in self._pieces]
        self._lookup: dict[str, int] | None = None
        # "\n" matched whole (user-defined): BPE never merges across it, so a text may be cut
        # after a run of newlines and its pieces encoded apart (much faster on long documents)
        self._cut_at_newlines = any(p == "\n" and k in (USER_DEFINED, CONTROL)
                                    for p, k in zip(pieces[:1000], kinds))
        self._literal_space_runs = literal_space_runs
        self._runs = {len(p): i for i, (p, k) in enumerate(zip(pieces, kinds))
                      if k == USER_DEFINED and p and not p.strip(SPACE)} if literal_space_runs else {}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # picklable, e.g. for data loaders
        return _restore, (self._proto.SerializeToString(), self._added, sorted(self._special),
                          self._literal_space_runs)

    def with_added_tokens(self, tokens: Mapping[int, str], *,
                          special_ids: Iterable[int] = ()) -> Tokenizer:
        """This tokenizer with more tokens beyond the model's pieces (``{id: text}``, ids
        continuing the vocabulary), e.g. ``{262144: "<image_soft_token>"}``."""
        return Tokenizer(self._proto, added_tokens={**self._added, **tokens},
                         special_ids=[*self._special, *special_ids],
                         literal_space_runs=self._literal_space_runs)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model``."""
        return cls(_read_model(Path(path)))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Rebuild the SentencePiece model from a GGUF file's ``tokenizer.ggml.*`` vocabulary."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return cls(_proto_from_gguf(read_gguf_tokenizer_metadata(path), path),
                   literal_space_runs=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face folder (``tokenizer.model`` + added tokens), a ``.gguf`` or ``.model`` file."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.model").is_file():
                added, special = _hf_added_tokens(path)
                return cls(_read_model(path / "tokenizer.model"), added_tokens=added,
                           special_ids=special)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.from_gguf(ggufs[0])
            raise FileNotFoundError(f"{path} has no tokenizer.model (SentencePiece) and no single "
                                    ".gguf file; copy the checkpoint's tokenizer.model there")
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        with open(path, "rb") as f:
            magic = f.read(4)
        return cls.from_gguf(path) if magic == b"GGUF" else cls.from_file(path)

    def save(self, path: str | Path) -> Path:
        """Write the SentencePiece model (``tokenizer.model``; into ``path`` if it is a folder).

        Tokens added beyond the model (`added_tokens`) are not part of that file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        path.write_bytes(self._proto.SerializeToString())
        return path

    @property
    def vocab_size(self) -> int:
        """Number of ids: the model's pieces plus added tokens (262,144 for the Gemma 3 GGUF)."""
        return len(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    @property
    def added_tokens(self) -> dict[int, str]:
        """Tokens beyond the SentencePiece model, ``{id: text}``."""
        return dict(self._added)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids ``decode(skip_special_tokens=True)`` drops (control pieces, ``<unk>``, ...)."""
        return self._special

    def id_to_piece(self, token_id: int) -> str:
        """The piece of an id, in SentencePiece spelling (``▁`` for a space)."""
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._pieces) - 1})")
        return self._pieces[token_id]

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (``▁`` for a space); KeyError if the vocabulary lacks it."""
        if self._lookup is None:
            self._lookup = {p: i for i, p in enumerate(self._pieces)}
        try:
            return self._lookup[piece]
        except KeyError:
            raise KeyError(f"{piece!r} is not in the vocabulary") from None

    def _required(self, piece: str) -> int:
        try:
            return self.piece_to_id(piece)
        except KeyError:
            raise ValueError(f"this vocabulary has no {piece}; it is not a Gemma 3 tokenizer") from None

    def _spec_id(self, name: str, fallback: str) -> int:
        idx = getattr(self._proto.trainer_spec, f"{name}_id")
        return idx if 0 <= idx < len(self._pieces) else self._required(fallback)

    @property
    def pad_id(self) -> int:
        return self._spec_id("pad", "<pad>")

    @property
    def eos_id(self) -> int:
        return self._spec_id("eos", "<eos>")

    @property
    def bos_id(self) -> int:
        return self._spec_id("bos", "<bos>")

    @property
    def unk_id(self) -> int:
        return self._spec_id("unk", "<unk>")

    @property
    def start_of_turn_id(self) -> int:
        return self._required("<start_of_turn>")

    @property
    def end_of_turn_id(self) -> int:
        return self._required("<end_of_turn>")

    @property
    def boi_id(self) -> int:
        """``<start_of_image>`` (255999)."""
        return self._required("<start_of_image>")

    @property
    def eoi_id(self) -> int:
        """``<end_of_image>`` (256000)."""
        return self._required("<end_of_image>")

    @property
    def image_token_id(self) -> int | None:
        """``<image_soft_token>`` (262144) where the checkpoint adds it, else None."""
        try:
            return self.piece_to_id("<image_soft_token>")
        except KeyError:
            return None

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation stops on these: ``<eos>`` and ``<end_of_turn>``."""
        try:
            return frozenset({self.eos_id, self.end_of_turn_id})
        except ValueError:
            return frozenset({self.eos_id})


    def _encoder(self, parse_special: bool) -> spm.SentencePieceProcessor:
        if parse_special:
            return self._sp
        if self._sp_literal is None:
            self._sp_literal = _processor(
                _encoding_proto(self._proto, self._added, self._special, parse_special=False))
        return self._sp_literal

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` (``[T]``); with ``add_bos`` prefixed by ``<bos>``.

        ``parse_special=False`` tokenizes control tokens written in the text as plain text
        (the reference's ``split_special_tokens=True``), for untrusted input.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_batch for lists")
        sp = self._encoder(parse_special)
        if self._runs and SPACE in text:
            ids = self._encode_runs(text, sp)
        elif self._cut_at_newlines and len(text) > 2 * _CHUNK:
            ids = [i for part in sp.Encode(_cut(text), out_type=int) for i in part]
        else:
            ids = sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos else ids

    def _encode_runs(self, text: str, sp: spm.SentencePieceProcessor) -> list[int]:
        """Encode with literal ``▁`` runs taken whole, longest piece first (``tokenizer.json``)."""
        ids: list[int] = []
        pos = 0
        for match in _LITERAL_RUN.finditer(text):
            at, end = match.span()
            while at < end:
                n = max((k for k in self._runs if k <= end - at), default=0)
                if n == 0:  # a lone ▁ left over joins the text after it
                    break
                ids += sp.EncodeAsIds(text[pos:at]) + [self._runs[n]]
                at = pos = at + n
        return ids + sp.EncodeAsIds(text[pos:])

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                     parse_special: bool = True, num_threads: int = -1) -> list[list[int]]:
        """``encode`` of each text (``B`` lists of ``[T_b]``), in SentencePiece's C++ threads."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch takes a list of str, got a {type(t).__name__} in it")
        sp = self._encoder(parse_special)
        batch = sp.Encode(texts, out_type=int, num_threads=num_threads)
        if self._runs:
            batch = [self._encode_runs(t, sp) if SPACE in t else ids for t, ids in zip(texts, batch)]
        return [[self.bos_id, *ids] for ids in batch] if add_bos else batch


    def _ids(self, ids: Iterable[int]) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if ids and not isinstance(ids[0], int):
            raise ValueError("decode takes one sequence of ids [T]; decode each row of a batch")
        if ids and not (0 <= min(ids) and max(ids) < len(self._pieces)):
            bad = next(i for i in ids if not 0 <= i < len(self._pieces))
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{len(self._pieces) - 1})")
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (``[T]``; list or 1-D array): ``▁`` becomes a space, runs of byte
        pieces ``<0xNN>`` are joined into UTF-8 (a run that is not valid UTF-8 gives one U+FFFD
        per byte, as the reference does); control tokens appear as written unless skipped."""
        out: list[str] = []
        run = bytearray()
        byte, text, special = self._byte, self._text, self._special
        for i in self._ids(ids):
            if skip_special_tokens and i in special:
                continue
            if byte[i] >= 0:
                run.append(byte[i])
                continue
            if run:
                out.append(_bytes_text(run))
                run.clear()
            out.append(text[i])
        if run:
            out.append(_bytes_text(run))
        return "".join(out)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh `StreamDecoder` over this vocabulary."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _cut(text: str) -> list[str]:
    """``text`` in pieces of about `_CHUNK` characters, each cut right after a run of newlines."""
    parts, start = [], 0
    while len(text) - start > _CHUNK:
        match = _NEWLINES.search(text, start + _CHUNK)
        if match is None or match.end() == len(text):
            break
        parts.append(text[start:match.end()])
        start = match.end()
    parts.append(text[start:])
    return parts


def _restore(model: bytes, added: dict[int, str], special: list[int], literal: bool) -> Tokenizer:
    return Tokenizer(model, added_tokens=added, special_ids=special, literal_space_runs=literal)


def _bytes_text(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


class StreamDecoder:
    """Turns ids fed one at a time into text pieces; ``"".join(pieces) == tokenizer.decode(ids)``.

    A run of byte pieces is held back until the run ends (a non-byte id or `flush`), since
    the whole run decides whether it is valid UTF-8; so no half character is ever emitted.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._run = bytearray()

    def feed(self, token_id: int) -> str:
        """Text completed by ``token_id`` (often ``""`` while a byte run is open)."""
        tok = self._tok
        token_id = int(token_id)
        if not 0 <= token_id < len(tok._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(tok._pieces) - 1})")
        if self._skip and token_id in tok._special:
            return ""
        b = tok._byte[token_id]
        if b >= 0:
            self._run.append(b)
            return ""
        return self.flush() + tok._text[token_id]

    def flush(self) -> str:
        """Text of a byte run still open (call when the stream ends)."""
        if not self._run:
            return ""
        text = _bytes_text(self._run)
        self._run.clear()
        return text

    def decode(self, ids: Iterable[int]) -> Iterator[str]:
        """Non-empty text pieces of ``ids``, flushing at the end."""
        for i in ids:
            if piece := self.feed(i):
                yield piece
        if piece := self.flush():
            yield piece
