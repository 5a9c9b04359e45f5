"""Offline teacher logits: ``medgemma-train teacher-logits`` writes them, ``distill`` reads them.

::

    medgemma-train teacher-logits --teacher medgemma-27b-text-it/ --data train.jsonl \\
        --seq-len 512 --top-k 64 OUT
    medgemma-train distill --checkpoint student/ --data train.jsonl --seq-len 512 \\
        --set distill.logits=OUT

Every row of ``data.train`` and ``data.eval`` is encoded exactly as the training pipeline
encodes it (the same :class:`~medgemma_train.engine.pipeline.Encoder`, ``data.seq_len``,
``data.mask_prompt`` and ``data.system``), the teacher runs forward, and for each *counted*
position (one whose next token carries a label; prompts and padding are not stored) the
top-k logits and their ids are kept. Shards ``shard-00000.npz`` hold ``logits [N, k]``
(``float32`` or ``--logits-dtype float16``), ``ids [N, k]`` (int32) and the row offsets;
``index.json`` maps each row (``file:line``) to its shard and place, with a CRC of its
tokens, and records the storage per token: ``k * (4 + logit bytes)`` bytes.

Reading: :class:`LogitsSource` is a grain random-access data source (one record per row);
``distill`` fetches each batch's rows through ``grain.MapDataset.source`` and scatters them
back to ``[A, b, T, k]`` at the counted positions of the batch. A row whose tokens or counted
positions differ from what was written (other data, tokenizer or settings) is an error that
says to rerun the command.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LogitsSource", "batch_extras", "check_store", "counted", "write_teacher_logits"]

INDEX = "index.json"
KEYS = ("teacher_logits", "teacher_ids")


def counted(labels: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``[..., T]`` -> bool ``[..., T]``: position t counts when token t+1 is real and labelled
    (the last position never counts)."""
    out = np.zeros(np.shape(labels), bool)
    out[..., :-1] = (np.asarray(labels)[..., 1:] >= 0) & (np.asarray(attention_mask)[..., 1:] != 0)
    return out


def _crc(tokens: np.ndarray, attention: np.ndarray) -> int:
    return zlib.crc32(np.asarray(tokens)[np.asarray(attention) != 0].astype(np.int32).tobytes())


def write_teacher_logits(cfg: Any, teacher: str, out: str | Path, *, top_k: int,
                         logits_dtype: str = "float32", shard_rows: int = 1024,
                         batch_size: int = 8, say: Any = None) -> dict:
    """Write the store (module docstring); returns its summary (rows, tokens, bytes/token)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medgemma_core import Gemma3Multimodal
    from medgemma_core.checkpoints.export import load_any
    from medgemma_core.training import TrainBatch, forward_hidden

    from .data import check_bad_rows, read_source
    from .pipeline import Encoder
    from .sft import _processor

    if top_k < 1:
        raise ValueError("--top-k must be at least 1")
    if logits_dtype not in ("float32", "float16"):
        raise ValueError("--logits-dtype: choose float32 or float16")
    say = say or (lambda text: None)
    path = Path(teacher).expanduser()
    if not path.exists():
        raise ValueError(f"teacher {path} not found; pass an existing checkpoint")
    model = load_any(path, "float32")
    image_text = isinstance(model, Gemma3Multimodal)
    sources = [read_source(s, i) for i, s in enumerate((*cfg.data.train, *cfg.data.eval))]
    check_bad_rows(sources, skip_bad=cfg.data.skip_bad)
    rows = [ex for s in sources for ex in s.examples]
    slots = (cfg.data.image_slots or max([1] + [ex.images for ex in rows])) if image_text else 0
    enc = Encoder(_processor(path, image_text), seq_len=cfg.data.seq_len, slots=slots,
                  image_text=image_text, mask_prompt=cfg.data.mask_prompt,
                  system=cfg.data.system, skip_bad=cfg.data.skip_bad)
    dec = getattr(model, "decoder", model)
    vocab = int(dec.embedding.shape[0])
    k = min(int(top_k), vocab)
    graphdef, state = nnx.split(model)
    cap = dec.config.final_logit_softcapping

    @jax.jit
    def top(state, batch):
        m = nnx.merge(graphdef, state)
        h = forward_hidden(m, batch)
        table = getattr(m, "decoder", m).embedding[...]

        def row(hr):
            logits = jnp.einsum("td,vd->tv", hr, table, preferred_element_type=jnp.float32)
            if cap is not None:
                logits = jnp.tanh(logits / cap) * cap
            return jax.lax.top_k(logits, k)

        return jax.lax.map(row, h)

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, list] = {}
    buf_l, buf_i, offsets, n_tokens, shard_id = [], [], [0], 0, 0

    def flush() -> None:
        nonlocal buf_l, buf_i, offsets, shard_id
        if len(offsets) == 1:
            return
        np.savez(folder / f"shard-{shard_id:05d}.npz",
                 logits=np.concatenate(buf_l).astype(logits_dtype),
                 ids=np.concatenate(buf_i).astype(np.int32), offsets=np.asarray(offsets))
        buf_l, buf_i, offsets, shard_id = [], [], [0], shard_id + 1

    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        arrays = enc(chunk, 1)
        b = {key: v[0] for key, v in arrays.items()}
        vals, ids = map(np.asarray, top(state, TrainBatch(**b)))
        keep = counted(b["labels"], b["attention_mask"])
        for r, ex in enumerate(chunk):
            sel = keep[r]
            buf_l.append(vals[r][sel])
            buf_i.append(ids[r][sel])
            index[ex.where] = [shard_id, len(offsets) - 1, int(sel.sum()),
                               _crc(b["tokens"][r], b["attention_mask"][r])]
            offsets.append(offsets[-1] + int(sel.sum()))
            n_tokens += int(sel.sum())
            if len(offsets) > shard_rows:
                flush()
        say(f"teacher logits: {min(start + batch_size, len(rows))}/{len(rows)} rows")
    flush()
    per_token = k * (4 + np.dtype(logits_dtype).itemsize)
    meta = {"teacher": str(path), "top_k": k, "vocab": vocab, "seq_len": cfg.data.seq_len,
            "mask_prompt": cfg.data.mask_prompt, "system": cfg.data.system,
            "logits_dtype": logits_dtype, "rows": len(rows), "tokens": n_tokens,
            "shards": shard_id, "bytes_per_token": per_token,
            "bytes": int(sum(p.stat().st_size for p in folder.glob("shard-*.npz")))}
    (folder / INDEX).write_text(json.dumps({**meta, "index": index}))
    return meta


class LogitsSource:
    """A grain random-access data source over a store: record ``i`` is the ``i``-th row
    written, ``{"where", "logits" [n, k], "ids" [n, k], "crc"}``; :meth:`find` gives a row's
    record number."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        data = json.loads((self.folder / INDEX).read_text())
        self.meta = {k: v for k, v in data.items() if k != "index"}
        self._rows = list(data["index"].items())
        self._number = {where: i for i, (where, _) in enumerate(self._rows)}
        self._shards: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def find(self, where: str) -> int:
        if where not in self._number:
            raise ValueError(f"{where}: no teacher logits for this row in {self.folder}; rerun "
                             f"medgemma-train teacher-logits on this data")
        return self._number[where]

    def __getitem__(self, i: int) -> dict:
        where, (shard, row, n, crc) = self._rows[int(i)]
        if shard not in self._shards:
            with np.load(self.folder / f"shard-{shard:05d}.npz") as z:
                self._shards[shard] = {key: z[key] for key in ("logits", "ids", "offsets")}
        z = self._shards[shard]
        a, b = int(z["offsets"][row]), int(z["offsets"][row + 1])
        assert b - a == n
        return {"where": where, "logits": z["logits"][a:b], "ids": z["ids"][a:b], "crc": crc}


def check_store(folder: Path, cfg: Any) -> dict:
    """The store's metadata, or a ValueError naming what differs from this run."""
    if not (folder / INDEX).is_file():
        raise ValueError(f"distill.logits={folder}: no {INDEX}; write it with "
                         f"medgemma-train teacher-logits")
    meta = LogitsSource(folder).meta
    for key, value in (("seq_len", cfg.data.seq_len), ("mask_prompt", cfg.data.mask_prompt),
                       ("system", cfg.data.system)):
        if meta.get(key) != value:
            raise ValueError(f"distill.logits={folder} was written with data.{key}="
                             f"{meta.get(key)!r}, this run has {value!r}; use the same setting "
                             f"or rerun teacher-logits")
    return meta


def batch_extras(folder: Path) -> Any:
    """``extras(rows, arrays) -> {"teacher_logits", "teacher_ids"}`` ``[A, b, T, k]`` for the
    batch ``arrays`` (the encoder's) of ``rows``, read through grain."""
    import grain

    source = LogitsSource(folder)
    dataset = grain.MapDataset.source(source)
    k = int(source.meta["top_k"])

    def extras(rows: list, arrays: dict) -> dict:
        a, b, t = arrays["tokens"].shape
        logits = np.zeros((a, b, t, k), np.float32)
        ids = np.zeros((a, b, t, k), np.int32)
        keep = counted(arrays["labels"], arrays["attention_mask"])
        for j, ex in enumerate(rows):
            ai, bi = divmod(j, b)
            sel = keep[ai, bi]
            if not sel.any():  # a dropped (bad) row or an eval filler: no loss
                continue
            rec = dataset[source.find(ex.where)]
            crc = _crc(arrays["tokens"][ai, bi], arrays["attention_mask"][ai, bi])
            if rec["crc"] != crc or len(rec["ids"]) != int(sel.sum()):
                raise ValueError(f"{ex.where}: the teacher logits in {folder} were written "
                                 f"for other tokens (data, tokenizer or settings changed); "
                                 f"rerun medgemma-train teacher-logits")
            logits[ai, bi, sel] = rec["logits"]
            ids[ai, bi, sel] = rec["ids"]
        return {"teacher_logits": logits, "teacher_ids": ids}

    return extras
