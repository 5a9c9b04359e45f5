"""Compiled generation: bucketed prefill, a decode loop that runs inside XLA, streaming.

Prompts of a batch are left-padded to a common bucketed length, so a new prompt length does
not mean a new compile. The decode loop is a ``lax.while_loop``: no Python runs per token.
Streaming runs the same compiled loop a few tokens at a time.

The step API drives that loop directly (what :meth:`Engine.stream` does, and benchmarks use)::

    state = engine.start(prompts, max_new_tokens=64)    # prefill: the first token of each row
    state = engine.decode(state, 64)                      # the loop, up to 64 tokens in all
    state.tokens                                          # [B, N] produced ids (pad after stop)
    state = engine.keep(state, [0, 2])                    # rows 0 and 2 go on alone
    state = engine.join(state, [1], engine.start([ids]))  # a new row takes row 1's place

A prefix shared by many prompts (a few-shot frame, a system prompt) can be prefilled once:
``prefix = engine.cache_prefix(ids)``; ``start(..., prefix=prefix)`` then copies its KV into
each row whose prompt begins with (part of) it and prefills only the rest. The result equals
the plain prefill's: causal attention makes a prefix's keys and values independent of what
follows, and RoPE positions count from each row's first token.

JAX's persistent compilation cache is not switched on here: that is the application's choice
(:func:`enable_compilation_cache`, which the ``medgemma`` command calls).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .sampling import Sampling, control_repetition, select
from .transformer import Gemma3, KVCache

# Powers of two up to 512, then steps of 1.5x and 2x (multiples of the attention's query
# block): a 2,100-token prompt (8 images) is padded to 3,072, not 4,096.
PROMPT_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288,
                  16384, 24576, 32768, 49152, 65536, 98304, 131072)


#: XLA options of the compiled decode loop. Region analysis lets copy insertion see that
#: each layer's cache is read before its new entry is written: without it XLA on CPUs copies
#: every layer's keys and values twice per step (72 copies of [B, 1, S, 256] for the 270M).
DECODE_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}

#: Buckets of the decode loop's length (new tokens): the KV cache holds the prompt's bucket plus
#: this one, so callers that plan room for rows to join a running batch use the same ladder.
DECODE_BUCKETS = tuple(2**i for i in range(4, 18))

#: Buckets of the columns a cached prefix leaves to prefill (a question after a few-shot
#: frame is often under 16 tokens).
TAIL_BUCKETS = (16, *PROMPT_BUCKETS)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turn on JAX's persistent compilation cache, so that the next process skips compiling
    (``~/.cache/medgemma/jax``; ``path`` or MEDGEMMA_JAX_CACHE=DIR moves it,
    MEDGEMMA_JAX_CACHE=0 keeps it off). Applications opt in: the ``medgemma`` command and the
    demo call this once; loading a model never does. A cache folder already configured in JAX
    is left as it is."""
    env = os.environ.get("MEDGEMMA_JAX_CACHE")
    if env == "0" or jax.config.jax_compilation_cache_dir:
        return
    folder = Path(path or env or Path.home() / ".cache" / "medgemma" / "jax")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def bucket(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"a prompt of {n} tokens is longer than the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class Generation:
    """Result of :meth:`Engine.generate`: generated ids per row (stop token included when one
    was produced), and the prompt lengths."""

    token_ids: list[list[int]]
    prompt_tokens: list[int]
    stopped: list[bool]


@dataclasses.dataclass(frozen=True)
class CachedPrefix:
    """The KV cache of a prompt prefix (:meth:`Engine.cache_prefix`): ``tokens``, and per
    layer ``(k [K, P, Hd], v [K, Hd, P])`` at positions 0..P-1 (every layer keeps all P)."""

    tokens: tuple[int, ...]
    layers: tuple[tuple[jax.Array, jax.Array], ...]

    def shared(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` this prefix covers."""
        n = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            n += 1
        return n


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _LoopState:
    cache: KVCache
    token: jax.Array  # [B] last produced token
    done: jax.Array  # [B] bool
    out: jax.Array  # [B, N] produced tokens (pad after stop)
    step: jax.Array  # () number of tokens produced so far
    # repetition control (Sampling.controls_repetition), else [B, 0] and [B]: the prompt
    # (left-padded to T) then the produced tokens, [B, T + N]; where each row's history starts
    hist: jax.Array
    first: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """A generation in progress: made by :meth:`Engine.start`, advanced by
    :meth:`Engine.decode` (which consumes it: its buffers are donated to the next state).

    ``tokens [B, N]`` holds the ids produced so far (``N >= max_new_tokens``, pad after a row
    stopped); ``step`` counts them; ``prompt_tokens`` are the prompt lengths."""

    carry: _LoopState
    key: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    sampling: Sampling
    stops: tuple[int, ...]
    max_new_tokens: int
    prompt_tokens: tuple[int, ...]

    @property
    def tokens(self) -> jax.Array:
        return self.carry.out

    @property
    def step(self) -> int:
        """Tokens produced per row so far (waits for the device)."""
        return int(self.carry.step)


class Engine:
    """Generation over a loaded :class:`Gemma3` (or anything with the same call signature)."""

    def __init__(self, model: Gemma3, *, stop_ids: Sequence[int] = (1, 106), pad_id: int = 0):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.stop_ids = tuple(int(s) for s in stop_ids)
        self.pad_id = int(pad_id)
        self.cache_dtype = model.dtype

    # ---- compiled pieces ------------------------------------------------------------------
    @functools.partial(jax.jit, static_argnames=("self", "cache_len", "max_new", "skey", "stops"))
    def _prefill(self, state, tokens, start, embeddings, image_id, key, temperature, top_p, *,
                 cache_len: int, max_new: int, skey, stops):
        model = nnx.merge(self.graphdef, state)
        cache = KVCache.create(self.config, tokens.shape[0], cache_len, start, self.cache_dtype)
        logits, cache = model(tokens, embeddings=embeddings, cache=cache, image_id=image_id,
                              logits_at="last")
        return self._first(logits, cache, tokens, start, key, temperature, top_p,
                           max_new=max_new, skey=skey, stops=stops)

    @functools.partial(jax.jit, static_argnames=("self", "cache_len", "tail", "max_new", "skey",
                                                 "stops"))
    def _prefill_cached(self, state, prefix, tokens, start, key, temperature, top_p, *,
                        cache_len: int, tail: int, max_new: int, skey, stops):
        """:meth:`_prefill` of left-padded ``tokens [B, T]`` whose first ``T - tail`` columns
        are, in every row, padding or the start of ``prefix`` (per layer k [K, P, Hd],
        v [K, Hd, P]): those are copied into the cache, only the last ``tail`` columns run."""
        model = nnx.merge(self.graphdef, state)
        b, t = tokens.shape
        base = t - tail
        cache = KVCache.create(self.config, b, cache_len, start, self.cache_dtype)
        layers = []
        ring = None
        for i, ((ck, _), (pk, pv)) in enumerate(zip(cache.layers, prefix)):
            s = ck.shape[2]
            slots = jnp.arange(s, dtype=jnp.int32)
            # the index each slot holds after indices 0..base-1 were written (-1: none yet)
            idx = base - 1 - (base - 1 - slots) % s if self.config.is_local(i) else slots
            if self.config.is_local(i):
                ring = jnp.where(idx >= 0, idx, -1)
            rel = idx[None, :] - start[:, None]  # [B, S] the prefix position each slot holds
            ok = (rel >= 0) & (idx[None, :] < base)
            rel = jnp.clip(rel, 0, pk.shape[1] - 1)
            k = jnp.where(ok[None, :, :, None], jnp.take(pk, rel, axis=1), 0)  # [K, B, S, Hd]
            v = jnp.where(ok[None, None], jnp.take(pv, rel, axis=2), 0)  # [K, Hd, B, S]
            layers.append((k.transpose(1, 0, 2, 3).astype(ck.dtype),
                           v.transpose(2, 0, 1, 3).astype(ck.dtype)))
        if ring is None:
            ring = cache.ring_index
        cache = cache.replace(layers=tuple(layers), ring_index=ring,
                              length=jnp.asarray(base, jnp.int32))
        logits, cache = model(tokens[:, base:], cache=cache, logits_at="last")
        return self._first(logits, cache, tokens, start, key, temperature, top_p,
                           max_new=max_new, skey=skey, stops=stops)

    @functools.partial(jax.jit, static_argnames=("self",))
    def _prefix_kv(self, state, tokens):
        """KV of ``tokens [1, P]`` at positions 0..P-1, every layer keeping all P (a local
        layer's ring is made P slots long, so that nothing is overwritten)."""
        model = nnx.merge(self.graphdef, state)
        c = self.config
        p = tokens.shape[1]
        empty = tuple((jnp.zeros((1, c.num_kv_heads, p, c.head_dim), self.cache_dtype),
                       jnp.zeros((1, c.num_kv_heads, c.head_dim, p), self.cache_dtype))
                      for _ in range(c.num_layers))
        cache = KVCache(empty, jnp.full((p,), -1, jnp.int32), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((), jnp.int32))
        _, cache = model(tokens, cache=cache, logits_at="none")
        return tuple((k[0], v[0]) for k, v in cache.layers)

    def _first(self, logits, cache, tokens, start, key, temperature, top_p, *, max_new, skey,
               stops):
        """The loop state after a prefill: each row's first token (traced, inside a jit)."""
        b, t = tokens.shape
        if skey[3] != 1.0 or skey[4] > 0:  # repetition control: the prompt's history
            hist = jnp.concatenate([tokens, jnp.full((b, max_new), self.pad_id, jnp.int32)], 1)
            first = start.astype(jnp.int32) if skey[5] else jnp.full((b,), t, jnp.int32)
            logits = control_repetition(logits, hist, first, jnp.int32(t), penalty=skey[3],
                                        ngram=skey[4])
        else:
            hist, first = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32)
        tok = select(logits, jax.random.fold_in(key, 0), temperature, top_p,
                     greedy=skey[0], top_k=skey[1], use_top_p=skey[2])
        done = _is_stop(tok, stops)
        out = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(tok)
        if hist.shape[1]:
            hist = hist.at[:, t].set(tok)
        return _LoopState(cache, tok, done, out, jnp.ones((), jnp.int32), hist, first)

    @functools.partial(jax.jit, static_argnames=("self", "skey", "stops"), donate_argnums=(2,),
                       compiler_options=DECODE_OPTIONS)
    def _decode(self, state, loop: _LoopState, limit, key, temperature, top_p, *, skey, stops):
        model = nnx.merge(self.graphdef, state)

        def cond(s: _LoopState):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s: _LoopState):
            logits, cache = model(s.token[:, None], cache=s.cache, logits_at="last")
            hist = s.hist
            if hist.shape[1]:  # repetition control over the prompt (or not) and the answer
                end = hist.shape[1] - s.out.shape[1] + s.step
                logits = control_repetition(logits, hist, s.first, end, penalty=skey[3],
                                            ngram=skey[4])
            tok = select(logits, jax.random.fold_in(key, s.step), temperature, top_p,
                         greedy=skey[0], top_k=skey[1], use_top_p=skey[2])
            tok = jnp.where(s.done, self.pad_id, tok)
            out = jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step))
            if hist.shape[1]:
                hist = jax.lax.dynamic_update_slice(hist, tok[:, None], (0, end))
            return _LoopState(cache, tok, s.done | _is_stop(tok, stops), out, s.step + 1, hist,
                              s.first)

        return jax.lax.while_loop(cond, body, loop)

    # ---- driver ---------------------------------------------------------------------------
    def cache_prefix(self, ids: Sequence[int]) -> CachedPrefix:
        """Prefill ``ids`` once, for :meth:`start`'s ``prefix=`` (prompts that begin with
        them). Compiles once per prefix length."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("a cached prefix needs at least one token")
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(f"a prefix of {len(ids)} tokens is longer than the model's context "
                             f"of {self.config.max_position_embeddings}")
        layers = self._prefix_kv(self.state, jnp.asarray([ids], jnp.int32))
        return CachedPrefix(tuple(ids), layers)

    def prefill_tail(self, prompts: Sequence[Sequence[int]],
                     prefix: CachedPrefix | None) -> int:
        """Columns of the padded prompt batch that :meth:`start` runs through the model:
        all of them (the bucket) without a usable ``prefix``, else the bucket of the longest
        part of a row that the prefix does not cover."""
        t = bucket(max(len(p) for p in prompts))
        if prefix is None:
            return t
        rest = max(max(len(p) - prefix.shared(p), 1) for p in prompts)
        return min(bucket(rest, TAIL_BUCKETS), t)

    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
              sampling: Sampling = Sampling(), ignore_eos: bool = False,
              embeddings: jax.Array | None = None, image_id: jax.Array | None = None,
              prefix: CachedPrefix | None = None) -> DecodeState:
        """Prefill a batch of token-id prompts (any lengths; left-padded to a bucket) and pick
        each row's first token. ``embeddings [B, T0, D]`` / ``image_id [B, T0]``: the decoder
        input of right-aligned prompts (``T0`` the longest), for prompts with images.
        ``prefix``: a :meth:`cache_prefix` result; rows that begin with (part of) it prefill
        only the rest (text prompts; the result is the same)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        lengths = [len(p) for p in prompts]
        context = self.config.max_position_embeddings
        if max(lengths) + max_new_tokens > context:
            raise ValueError(
                f"a prompt of {max(lengths)} tokens + max_new_tokens={max_new_tokens} exceed the "
                f"model's context length of {context} tokens; shorten the prompt or lower "
                f"max_new_tokens")
        t = bucket(max(lengths))
        tokens = np.full((len(prompts), t), self.pad_id, np.int32)
        start = np.array([t - n for n in lengths], np.int32)
        for row, p in enumerate(prompts):
            tokens[row, t - len(p):] = p
        if embeddings is not None:  # caller-provided [B, T0, D] for right-aligned prompts
            pad = t - embeddings.shape[1]
            embeddings = jnp.pad(embeddings, ((0, 0), (pad, 0), (0, 0)))
            image_id = jnp.pad(image_id, ((0, 0), (pad, 0)))
        max_new = bucket(max_new_tokens, DECODE_BUCKETS)
        stops = () if ignore_eos else self.stop_ids
        key = jax.random.key(sampling.seed)
        temp = jnp.float32(max(sampling.temperature, 1e-6))
        top_p = jnp.float32(sampling.top_p)
        tail = t if embeddings is not None else self.prefill_tail(prompts, prefix)
        if tail < t:
            carry = self._prefill_cached(self.state, prefix.layers, jnp.asarray(tokens),
                                         jnp.asarray(start), key, temp, top_p,
                                         cache_len=t + max_new, tail=tail, max_new=max_new,
                                         skey=sampling.static_key(), stops=stops)
        else:
            carry = self._prefill(self.state, jnp.asarray(tokens), jnp.asarray(start),
                                  embeddings, image_id, key, temp, top_p, cache_len=t + max_new,
                                  max_new=max_new, skey=sampling.static_key(), stops=stops)
        return DecodeState(carry, key, temp, top_p, sampling, stops, max_new_tokens,
                           tuple(lengths))

    def decode(self, state: DecodeState, limit: int) -> DecodeState:
        """Run the compiled decode loop until ``limit`` tokens per row are produced (at most
        ``max_new_tokens``) or every row has stopped. ``state`` is consumed."""
        limit = jnp.int32(min(int(limit), state.max_new_tokens))
        carry = self._decode(self.state, state.carry, limit, state.key, state.temperature,
                             state.top_p, skey=state.sampling.static_key(), stops=state.stops)
        return dataclasses.replace(state, carry=carry)

    def keep(self, state: DecodeState, rows: Sequence[int]) -> DecodeState:
        """Go on with ``rows`` of a generation only (in that order; a row may repeat): once
        most rows have ended, a smaller batch decodes the rest faster. Greedy rows continue
        exactly as they would have (rows never see each other); sampled ones draw other
        numbers. ``state`` stays valid."""
        rows = [int(r) for r in rows]
        if not rows or not all(0 <= r < len(state.prompt_tokens) for r in rows):
            raise ValueError(f"rows must be indices of the {len(state.prompt_tokens)} rows")
        carry = self._keep(state.carry, jnp.asarray(rows, jnp.int32))
        return dataclasses.replace(state, carry=carry,
                                   prompt_tokens=tuple(state.prompt_tokens[r] for r in rows))

    @functools.partial(jax.jit, static_argnames=("self",))
    def _keep(self, loop: _LoopState, rows):
        def take(a):
            return jnp.take(a, rows, axis=0)

        cache = loop.cache.replace(layers=tuple((take(k), take(v)) for k, v in loop.cache.layers),
                                   start=take(loop.cache.start))
        return _LoopState(cache, take(loop.token), take(loop.done), take(loop.out), loop.step,
                          take(loop.hist), take(loop.first))

    def join(self, state: DecodeState, rows: Sequence[int], new: DecodeState) -> DecodeState:
        """Continuous batching: the rows of ``new`` (a :meth:`start` result, one token per
        row) take the places ``rows`` of ``state`` (rows that ended, or repeats from
        :meth:`keep`) and decode on with the others. Each joining row is moved into the
        running frame (its prompt ends at the batch's next index); RoPE positions count from
        a row's own first token, so its keys, values and greedy answer are those it has alone.
        Its ids start at column ``state.step - 1`` of ``tokens``. Needs the same sampling and
        stops, prompts no longer than the batch's current index, and room:
        ``state.step - 1 + new.max_new_tokens <= state.max_new_tokens``. ``state`` is consumed."""
        rows = [int(r) for r in rows]
        b = len(state.prompt_tokens)
        if (len(rows) != len(new.prompt_tokens) or len(set(rows)) != len(rows)
                or not all(0 <= r < b for r in rows)):
            raise ValueError(f"rows must be {len(new.prompt_tokens)} distinct indices of the "
                             f"{b} running rows")
        if (new.sampling.static_key() != state.sampling.static_key()
                or new.stops != state.stops):
            raise ValueError("joining rows need the running batch's sampling and stop tokens")
        step, fresh = state.step, new.step
        if fresh != 1:
            raise ValueError("join rows straight after start() (one token each)")
        length = int(state.carry.cache.length)
        if max(new.prompt_tokens) > length:
            raise ValueError(f"a prompt of {max(new.prompt_tokens)} tokens cannot join a batch "
                             f"at index {length}; start it in a batch of its own")
        if step - 1 + new.max_new_tokens > state.max_new_tokens:
            raise ValueError(f"no room: {new.max_new_tokens} new tokens from step {step} pass "
                             f"the running batch's max_new_tokens={state.max_new_tokens}")
        shift = length - int(new.carry.cache.length)
        carry = self._join(state.carry, new.carry, jnp.asarray(rows, jnp.int32),
                           jnp.int32(shift), jnp.int32(step))
        tokens = list(state.prompt_tokens)
        for r, n in zip(rows, new.prompt_tokens):
            tokens[r] = n
        return dataclasses.replace(state, carry=carry, prompt_tokens=tuple(tokens))

    @functools.partial(jax.jit, static_argnames=("self",), donate_argnums=(1,))
    def _join(self, loop: _LoopState, new: _LoopState, rows, shift, step):
        """``new``'s rows into ``loop``'s places ``rows``; ``shift``: the running index of
        ``new``'s index 0."""
        run, add = loop.cache, new.cache
        layers = []
        for i, ((rk, rv), (nk, nv)) in enumerate(zip(run.layers, add.layers)):
            s_new = nk.shape[2]
            if self.config.is_local(i):  # ring slots: the running index each one holds
                idx = run.ring_index
                src = idx - shift
                slot = src % s_new
                ok = (idx >= 0) & (jnp.take(add.ring_index, slot) == src)
            else:
                src = jnp.arange(rk.shape[2], dtype=jnp.int32) - shift
                slot = jnp.clip(src, 0, s_new - 1)
                ok = src < s_new
            ok = ok[None] & (src[None] >= add.start[:, None]) & (src[None] < add.length)
            k = jnp.where(ok[:, None, :, None], jnp.take(nk, slot, axis=2), 0)
            v = jnp.where(ok[:, None, None, :], jnp.take(nv, slot, axis=3), 0)
            layers.append((rk.at[rows].set(k.astype(rk.dtype)),
                           rv.at[rows].set(v.astype(rv.dtype))))
        cache = run.replace(layers=tuple(layers), start=run.start.at[rows].set(add.start + shift))
        n = loop.out.shape[1]
        out = jnp.where(jnp.arange(n)[None] == step - 1, new.token[:, None], self.pad_id)
        hist = loop.hist
        if hist.shape[1]:  # the prompt and first token, moved by the same shift
            cols = jnp.arange(hist.shape[1], dtype=jnp.int32) - shift
            ok = (cols >= 0) & (cols <= add.length)
            moved = jnp.take(new.hist, jnp.clip(cols, 0, new.hist.shape[1] - 1), axis=1)
            hist = hist.at[rows].set(jnp.where(ok[None], moved, self.pad_id))
        return _LoopState(cache, loop.token.at[rows].set(new.token),
                          loop.done.at[rows].set(new.done), loop.out.at[rows].set(out),
                          loop.step, hist, loop.first.at[rows].set(new.first + shift))

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
               sampling: Sampling = Sampling(), chunk: int = 4, ignore_eos: bool = False,
               embeddings: jax.Array | None = None, image_id: jax.Array | None = None,
               prefix: CachedPrefix | None = None) -> Iterator[list[list[int]]]:
        """Yield, chunk by chunk, the new tokens of each row (empty once a row stopped)."""
        state = self.start(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           ignore_eos=ignore_eos, embeddings=embeddings, image_id=image_id,
                           prefix=prefix)
        stops = state.stops
        emitted = 0
        finished = [False] * len(prompts)
        while True:
            produced = min(state.step, max_new_tokens)
            out = np.asarray(state.tokens[:, emitted:produced])
            piece = []
            for r, row in enumerate(out.tolist()):
                ids: list[int] = []
                for tok in [] if finished[r] else row:
                    ids.append(tok)
                    if tok in stops:
                        finished[r] = True
                        break
                piece.append(ids)
            yield piece
            emitted = produced
            if produced >= max_new_tokens or all(finished):
                return
            state = self.decode(state, produced + chunk)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 sampling: Sampling = Sampling(), ignore_eos: bool = False,
                 embeddings: jax.Array | None = None, image_id: jax.Array | None = None,
                 prefix: CachedPrefix | None = None) -> Generation:
        """Generate for a batch of token-id prompts (of any lengths) in one compiled loop."""
        rows: list[list[int]] = [[] for _ in prompts]
        for piece in self.stream(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                 chunk=max_new_tokens, ignore_eos=ignore_eos,
                                 embeddings=embeddings, image_id=image_id, prefix=prefix):
            for r, ids in zip(rows, piece):
                r.extend(ids)
        stops = set(self.stop_ids) if not ignore_eos else set()
        return Generation(rows, [len(p) for p in prompts],
                          [bool(r) and r[-1] in stops for r in rows])


def _is_stop(tok: jax.Array, stops: tuple[int, ...]) -> jax.Array:
    stop = jnp.zeros(tok.shape, bool)
    for s in stops:
        stop = stop | (tok == s)
    return stop
