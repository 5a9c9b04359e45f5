"""The ``distill`` stage: a student learns from a teacher's next-token distributions.

The loss of each counted token (a position whose next label is ``>= 0`` and whose next token is
real by the attention mask; padding, prompt and image positions never count, unlike a plain
mean over every position)::

    alpha * T**2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, label)

with ``p_T = softmax(logits / T)``. It returns ``(sum over counted tokens, their number)``,
so the engine's per-token weighting, accumulation and data parallelism apply unchanged.
Both models project ``model.loss_chunk`` tokens at a time onto the vocabulary inside a
rematerialised ``lax.scan``: neither ``[B, T, V]`` logits tensor is ever held.

**Online teacher** (``distill.teacher``: any checkpoint medgemma-core loads, sharing the
student's vocabulary): :class:`Distill` holds the student and the frozen teacher, so the
engine's split puts the teacher in the frozen ``rest`` (sharded by the same logical-axis
rules as the student, never differentiated); its forward runs in the same step.

**Offline teacher** (``distill.logits``: a folder written by ``medgemma-train
teacher-logits``): the teacher's top-k logits and their ids per counted token, read back
through grain into each batch (:mod:`medgemma_train.engine.teacher_logits`).

**Top-k and the tail.** With ``top_k = k > 0`` (offline files always; online when set) the
teacher distribution is its top-k logits renormalised over those k ids:
``p_i = exp(u_i / T) / sum_{j in topk} exp(u_j / T)`` for the k ids, 0 elsewhere (the tail's
mass is dropped and the rest rescaled to sum to 1). The student side keeps its full softmax
over the vocabulary, so ``KL = sum_{i in topk} p_i (log p_i - log q_i)``: the student is
pulled to put its mass on the teacher's top-k. With ``k = V`` this is exactly the full KL.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .stages import DataSpec, Prepared, StageSpec, hookimpl

__all__ = ["DISTILL", "Distill", "DistillSettings", "distill_loss", "kd_chunk", "prepare"]


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """``teacher``: the online teacher's checkpoint; ``logits``: a ``teacher-logits`` folder
    (offline; then no teacher is loaded); ``alpha``: the KL's share of the loss (1 = pure
    distillation); ``temperature``: T of both softmaxes (the KL is scaled by T**2, so its
    gradients keep their size across T); ``top_k``: online only, keep the teacher's top-k
    (0 = the full distribution); ``teacher_dtype``: the teacher's parameter dtype."""

    teacher: str = ""
    logits: str = ""
    alpha: float = 0.5
    temperature: float = 1.0
    top_k: int = 0
    teacher_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha={self.alpha}: choose a value in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature}: must be positive")
        if self.top_k < 0:
            raise ValueError("distill.top_k must be 0 (full distribution) or positive")
        if self.teacher and self.logits:
            raise ValueError("set distill.teacher (online) or distill.logits (offline), not both")


class Distill(nnx.Module):
    """The student and its frozen teacher in one module (the engine trains ``student/...``)."""

    def __init__(self, student: nnx.Module, teacher: nnx.Module | None):
        self.student = student
        self.teacher = teacher

    @property
    def config(self) -> Any:  # the engine reads the decoder's shape for the FLOPs count
        return self.student.config


def _table(model: Any) -> tuple[jax.Array, float | None]:
    dec = getattr(model, "decoder", model)
    return dec.embedding[...], dec.config.final_logit_softcapping


def _chunk_logits(h: jax.Array, table: jax.Array, softcap: float | None) -> jax.Array:
    raw = jnp.einsum("nd,vd->nv", h, table.astype(h.dtype), preferred_element_type=jnp.float32)
    return raw if softcap is None else jnp.tanh(raw / softcap) * softcap


def kd_chunk(student: jax.Array, targets: jax.Array, teacher: jax.Array,
             teacher_ids: jax.Array | None, *, alpha: float, temperature: float) -> jax.Array:
    """Summed loss of one chunk: ``student [n, V]`` logits, ``targets [n]`` (< 0: no loss),
    the teacher's logits ``[n, V]`` (``teacher_ids`` None) or its top-k ``[n, k]`` with their
    ids ``[n, k]`` (renormalised over the k, as the module docstring says)."""
    t = float(temperature)
    valid = targets >= 0
    logq = jax.nn.log_softmax(student / t, axis=-1)
    if teacher_ids is not None:
        logq = jnp.take_along_axis(logq, jnp.maximum(teacher_ids, 0), axis=-1)
    logp = jax.nn.log_softmax(teacher.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    loss = alpha * t * t * kl
    if alpha < 1.0:
        lse = jax.nn.logsumexp(student, axis=-1)
        picked = jnp.take_along_axis(student, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
        loss = loss + (1.0 - alpha) * (lse - picked)
    return jnp.sum(jnp.where(valid, loss, 0.0))


def _shift(x: jax.Array) -> jax.Array:
    """Positions 0..T-2 of ``[B, T, ...]`` flattened to ``[B*(T-1), ...]``."""
    return x[:, :-1].reshape(-1, *x.shape[2:])


def distill_loss(model: Distill, batch: Any, cfg: Any) -> tuple[jax.Array, jax.Array]:
    """``(loss_sum, n_tokens)`` of the module docstring's loss on one batch."""
    from medgemma_core.training import IGNORE_INDEX, TrainBatch, forward_hidden

    from .teacher_logits import KEYS

    s: DistillSettings = cfg.options
    dtype = cfg.model.compute_dtype or None
    extras: dict = {}
    if isinstance(batch, dict):  # the stage's encoder's arrays (DataSpec)
        extras = {k: batch[k] for k in KEYS if k in batch}
        batch = TrainBatch(**{k: v for k, v in batch.items() if k not in KEYS})
    h = forward_hidden(model.student, batch, compute_dtype=dtype, remat=cfg.model.remat)
    real = jnp.asarray(batch.attention_mask)[:, 1:] != 0  # a padded position never counts
    targets = jnp.where(real, jnp.asarray(batch.labels, jnp.int32)[:, 1:], IGNORE_INDEX)
    targets = targets.reshape(-1)
    hs = _shift(h)
    table, cap = _table(model.student)
    if "teacher_logits" in extras:  # offline: [B, T, k] logits and ids per position
        tk, tid = _shift(jnp.asarray(extras["teacher_logits"])), _shift(
            jnp.asarray(extras["teacher_ids"], jnp.int32))
        xs: tuple = (hs, targets, tk, tid)
    else:
        if model.teacher is None:
            raise ValueError("distill: no teacher; set distill.teacher or distill.logits")
        ht = jax.lax.stop_gradient(forward_hidden(model.teacher, batch, compute_dtype=dtype))
        xs = (hs, targets, _shift(ht))
    t_table, t_cap = _table(model.teacher) if len(xs) == 3 else (None, None)
    n = hs.shape[0]
    chunk = max(1, min(int(cfg.model.loss_chunk), n))
    pad = -n % chunk

    def padded(x, fill=0):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
        return x.reshape(-1, chunk, *x.shape[1:])

    xs = tuple(padded(x, IGNORE_INDEX if i == 1 else 0) for i, x in enumerate(xs))

    @jax.checkpoint  # the backward recomputes each chunk's logits (never [N, V] at once)
    def one(parts, tbl):
        sl = _chunk_logits(parts[0], tbl, cap)
        if len(parts) == 4:
            return kd_chunk(sl, parts[1], parts[2], parts[3], alpha=s.alpha,
                            temperature=s.temperature)
        tl = jax.lax.stop_gradient(_chunk_logits(parts[2], t_table, t_cap))
        ids = None
        if s.top_k:
            tl, ids = jax.lax.top_k(tl, min(s.top_k, tl.shape[-1]))
        return kd_chunk(sl, parts[1], tl, ids, alpha=s.alpha, temperature=s.temperature)

    def body(total, parts):
        return total + one(parts, table), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(targets >= 0).astype(jnp.int32)


def _in_student(inner: Any) -> Any:
    def trainable(path: tuple, variable: Any) -> bool:
        return bool(path) and path[0] == "student" and inner(tuple(path[1:]), variable)

    return trainable


def prepare(cfg: Any) -> Prepared:
    """The student as ``sft`` prepares it (LoRA or full), the teacher loaded frozen beside it."""
    from medgemma_core.checkpoints.export import load_any

    from . import sft

    s: DistillSettings = cfg.options or DistillSettings()
    if not s.teacher and not s.logits:
        raise ValueError("distill: no teacher; pass --set distill.teacher=CHECKPOINT (online) "
                         "or --set distill.logits=FOLDER (from medgemma-train teacher-logits)")
    student = sft.prepare(cfg)
    teacher = None
    if s.teacher:
        path = Path(s.teacher).expanduser()
        if not path.exists():
            raise ValueError(f"distill.teacher {path} not found; pass an existing checkpoint")
        teacher = load_any(path, s.teacher_dtype)
        if type(teacher) is not type(student.model):
            raise ValueError(f"distill: the teacher is a {type(teacher).__name__} but the "
                             f"student a {type(student.model).__name__}; use two text or two "
                             f"image-text checkpoints")
        v_t, v_s = _table(teacher)[0].shape[0], _table(student.model)[0].shape[0]
        if v_t != v_s:
            raise ValueError(f"distill: the teacher's vocabulary has {v_t} rows, the "
                             f"student's {v_s}; the two must share one tokenizer")
    else:
        from .teacher_logits import check_store

        check_store(Path(s.logits), cfg)
    model = Distill(student.model, teacher)
    extra = dict(student.extra, teacher=s.teacher or None, logits=s.logits or None)
    return Prepared(model, student.processor, _in_student(student.trainable),
                    student.image_text, extra)


def finish(model: Distill, prepared: Prepared, cfg: Any, run_dir: Path) -> dict:
    from . import sft

    return sft.finish(model.student, prepared, cfg, run_dir)


class _Encoder:
    """sft's rows and batches, plus the offline teacher's top-k arrays when ``distill.logits``
    is set (``teacher_logits``, ``teacher_ids`` ``[A, b, T, k]``)."""

    def __init__(self, cfg: Any, prepared: Prepared, sources: Any):
        from .pipeline import Encoder

        slots = 0
        if prepared.image_text:
            slots = cfg.data.image_slots or max([1] + [ex.images for src in sources
                                                       for ex in src.examples])
        self.encoder = Encoder(prepared.processor, seq_len=cfg.data.seq_len, slots=slots,
                               image_text=prepared.image_text,
                               mask_prompt=cfg.data.mask_prompt, system=cfg.data.system,
                               skip_bad=cfg.data.skip_bad)
        self.extras = None
        if cfg.options is not None and cfg.options.logits:
            from .teacher_logits import batch_extras

            self.extras = batch_extras(Path(cfg.options.logits))

    @property
    def bad(self) -> list:
        return self.encoder.bad

    def __call__(self, rows: Any, accum: int = 1) -> dict:
        out = self.encoder(rows, accum)
        if self.extras is not None:
            out.update(self.extras(rows, out))
        return out


def _keys(cfg: Any, prepared: Prepared) -> tuple[str, ...]:
    from .teacher_logits import KEYS

    keys = ("tokens", "labels", "attention_mask") + (("pixels", "image_mask")
                                                      if prepared.image_text else ())
    return keys + (KEYS if cfg.options is not None and cfg.options.logits else ())


DISTILL = StageSpec(
    name="distill",
    description="distillation from a teacher's logits (online, or offline top-k files), "
                "alpha*T^2*KL + (1-alpha)*CE on the counted tokens",
    prepare=prepare,
    loss=distill_loss,
    finish=finish,
    settings=DistillSettings,
    data=DataSpec(encoder=_Encoder, keys=_keys, tokens_key="attention_mask"),
    defaults={"lora.rank": 0},
)


@hookimpl
def medgemma_train_stages(register: Any) -> None:
    register(DISTILL)
