"""Generation: sampling rules, seeds, streaming, stop handling, the ring-buffer cache, buckets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medgemma_core import Engine, Gemma3, Gemma3Config, KVCache, Sampling
from medgemma_core.generate import bucket
from medgemma_core.sampling import select

CFG = Gemma3Config.tiny(vocab_size=128)


@pytest.fixture(scope="module")
def engine():
    model = Gemma3(CFG, rngs=nnx.Rngs(0))
    return Engine(model, stop_ids=(1, 106), pad_id=0)


def _draws(logits, n, *, top_k=0, top_p=1.0):
    """n independent draws at temperature 1 from one row of logits."""
    def one(key):
        return select(logits[None], key, jnp.float32(1.0), jnp.float32(top_p), greedy=False,
                      top_k=top_k, use_top_p=top_p < 1)[0]
    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), n)))


def test_top_k_and_top_p_supports_match_hand_computation():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    assert set(_draws(logits, 2000, top_k=2)) == {0, 1}
    # top_p = 0.8: 0.4 + 0.3 = 0.7 < 0.8, so the third (0.15) is kept, the rest dropped.
    drawn = _draws(logits, 4000, top_p=0.8)
    assert set(drawn) == {0, 1, 2}
    freq = np.bincount(drawn, minlength=5)[:3] / len(drawn)
    np.testing.assert_allclose(freq, probs[:3] / probs[:3].sum(), atol=0.03)
    # unrestricted sampling follows the distribution
    freq = np.bincount(_draws(logits, 8000), minlength=5) / 8000
    np.testing.assert_allclose(freq, probs, atol=0.02)


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    out = select(logits, jax.random.key(0), jnp.float32(1), jnp.float32(1), greedy=True,
                 top_k=0, use_top_p=False)
    assert out.tolist() == [1, 0]
    # as numpy's argmax: the first of tied maxima, of infinities, the first NaN, an all -inf row
    rows = np.asarray([[1.0, 4.0, 4.0, 2.0], [np.inf, 0.0, np.inf, 1.0],
                       [1.0, np.nan, 9.0, np.nan], [-np.inf] * 4], np.float32)
    out = select(jnp.asarray(rows), jax.random.key(0), jnp.float32(1), jnp.float32(1),
                 greedy=True, top_k=0, use_top_p=False)
    assert out.dtype == jnp.int32 and out.tolist() == np.argmax(rows, axis=-1).tolist()


def test_seeded_sampling_is_reproducible(engine):
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = engine.generate([[2, 5, 9]], max_new_tokens=16, sampling=s, ignore_eos=True)
    b = engine.generate([[2, 5, 9]], max_new_tokens=16, sampling=s, ignore_eos=True)
    c = engine.generate([[2, 5, 9]], max_new_tokens=16, ignore_eos=True,
                        sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stream_equals_generate_and_ignore_eos_counts(engine):
    prompts = [[2, 7, 8, 9, 10], [2, 3]]
    whole = engine.generate(prompts, max_new_tokens=20, ignore_eos=True)
    assert [len(r) for r in whole.token_ids] == [20, 20]
    rows = [[], []]
    for piece in engine.stream(prompts, max_new_tokens=20, ignore_eos=True, chunk=3):
        for r, ids in zip(rows, piece):
            r.extend(ids)
    assert rows == whole.token_ids


def test_step_api_equals_generate(engine):
    """start (prefill) + decode in two steps gives what generate gives, and stops at the limit."""
    prompts = [[2, 7, 8, 9], [2, 3, 4, 5, 6, 7]]
    whole = engine.generate(prompts, max_new_tokens=12, ignore_eos=True)
    state = engine.start(prompts, max_new_tokens=12, ignore_eos=True)
    assert state.step == 1 and state.prompt_tokens == (4, 6)
    state = engine.decode(state, 5)
    assert state.step == 5
    state = engine.decode(state, 100)  # capped at max_new_tokens
    assert state.step == 12
    assert np.asarray(state.tokens)[:, :12].tolist() == whole.token_ids


def test_context_length_counts_the_prompt_and_the_new_tokens():
    """A 40-token prompt fits a 64-position model alone, and with 24 new tokens (64), but not
    with 25: the error names both numbers and the limit."""
    model = Gemma3(Gemma3Config.tiny(vocab_size=128, max_position_embeddings=64),
                   rngs=nnx.Rngs(4))
    eng = Engine(model, stop_ids=(), pad_id=0)
    prompt = [[2] + list(range(3, 42))]
    assert len(prompt[0]) == 40
    assert len(eng.generate(prompt, max_new_tokens=24).token_ids[0]) == 24
    with pytest.raises(ValueError, match="40 tokens \\+ max_new_tokens=25 exceed the model's "
                                         "context length of 64"):
        eng.generate(prompt, max_new_tokens=25)
    with pytest.raises(ValueError, match="context length of 64"):
        next(eng.stream([[2] * 70], max_new_tokens=1))


def test_compilation_cache_is_the_applications_choice(tmp_path):
    """Building an engine leaves JAX's persistent cache alone; enable_compilation_cache turns it
    on (MEDGEMMA_JAX_CACHE=0 keeps it off)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, jax\n"
        "from flax import nnx\n"
        "from medgemma_core import Engine, Gemma3, Gemma3Config, enable_compilation_cache\n"
        "Engine(Gemma3(Gemma3Config.tiny(vocab_size=128), rngs=nnx.Rngs(0)))\n"
        "print('engine', jax.config.jax_compilation_cache_dir)\n"
        "enable_compilation_cache(sys.argv[1])\n"
        "print('enabled', jax.config.jax_compilation_cache_dir)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("MEDGEMMA_JAX_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["engine None", f"enabled {tmp_path / 'c'}"]
    env["MEDGEMMA_JAX_CACHE"] = "0"
    off = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert off.stdout.split("\n")[:2] == ["engine None", "enabled None"], off.stderr[-2000:]


def test_stops_on_eos_and_end_of_turn():
    """A model whose every logit favours a stop token stops after it, per row."""
    model = Gemma3(CFG, rngs=nnx.Rngs(1))
    emb = np.asarray(model.embedding[...]).copy()
    eng = Engine(model, stop_ids=(106,), pad_id=0)
    free = eng.generate([[2, 4, 5]], max_new_tokens=12, ignore_eos=True).token_ids[0]
    stop_at = free[3]  # declare the 4th free-running token a stop token
    eng2 = Engine(model, stop_ids=(stop_at,), pad_id=0)
    got = eng2.generate([[2, 4, 5]], max_new_tokens=12)
    assert got.token_ids[0] == free[: free.index(stop_at) + 1]
    assert got.stopped == [True]
    assert np.array_equal(emb, np.asarray(model.embedding[...]))


def test_local_layers_keep_a_window_sized_ring_buffer():
    cache = KVCache.create(CFG, batch=2, max_len=4096, start=jnp.zeros(2, jnp.int32))
    for i, (k, v) in enumerate(cache.layers):
        want = CFG.sliding_window if CFG.is_local(i) else 4096
        assert k.shape == (2, CFG.num_kv_heads, want, CFG.head_dim)
        assert v.shape == (2, CFG.num_kv_heads, CFG.head_dim, want)


def test_decode_with_cache_equals_full_forward_past_the_window():
    """Prefill + token-by-token decode through the ring buffer == one full forward pass."""
    model = Gemma3(CFG, rngs=nnx.Rngs(2))
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, size=(1, 5 * CFG.sliding_window))
    full, _ = model(ids)
    p = 6
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache=cache)

    cache = KVCache.create(CFG, 1, ids.shape[1], jnp.zeros(1, jnp.int32))
    logits, cache = step(state, ids[:, :p], cache)
    steps = [logits]
    for i in range(p, ids.shape[1]):
        logits, cache = step(state, ids[:, i:i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1),
                               np.asarray(full), atol=2e-5, rtol=2e-5)


def test_prompts_in_one_bucket_share_one_compile(engine):
    engine.generate([[2, 3, 4]], max_new_tokens=8)
    before = engine._prefill._cache_size()
    engine.generate([[2] + list(range(3, 20))], max_new_tokens=8)
    engine.generate([[2, 9]], max_new_tokens=5)
    assert engine._prefill._cache_size() == before
    assert bucket(3) == bucket(20) == 32 and bucket(33) == 64


def test_query_blocked_attention_equals_unblocked(monkeypatch):
    """Long prompts attend in query blocks (no T x T scores); the result is unchanged."""
    from medgemma_core import attention

    model = Gemma3(CFG, rngs=nnx.Rngs(3))
    ids = np.random.default_rng(1).integers(3, CFG.vocab_size, size=(2, 64))
    start = np.array([0, 9])
    image_id = np.zeros((2, 64), np.int32)
    image_id[:, 20:30] = 1  # a bidirectional block across a query-block boundary (16)
    whole, _ = model(ids, start=start, image_id=image_id)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    blocked, _ = model(ids, start=start, image_id=image_id)
    # real positions only: a padding query sees no key (the dense path averages every value,
    # the blocked one gives zeros; neither reaches a real position)
    for row, s in enumerate(start):
        np.testing.assert_allclose(np.asarray(blocked[row, s:]), np.asarray(whole[row, s:]),
                                   atol=1e-5, rtol=1e-5)


MEMORY = r"""
import json
import medgemma_core  # sets the XLA CPU scheduler flag before JAX starts its backend
import jax, jax.numpy as jnp
from flax import nnx
from medgemma_core.config import Gemma3Config
from medgemma_core.generate import Engine
from medgemma_core.sampling import Sampling
from medgemma_core.transformer import Gemma3

cfg = Gemma3Config.gemma3_4b()
model = nnx.eval_shape(lambda: Gemma3(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
eng = Engine(model)
s, new, key, one = Sampling(), 16, jax.random.key(0), jnp.float32(1)


def prefill(t, multimodal):
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    emb = jax.ShapeDtypeStruct((1, t, cfg.hidden_size), jnp.bfloat16) if multimodal else None
    args = (eng.state, ids, jax.ShapeDtypeStruct((1,), jnp.int32), emb,
            ids if multimodal else None, key, one, one)
    kw = dict(cache_len=t + new, max_new=new, skey=s.static_key(), stops=(1,))
    return args, kw


args, kw = prefill(64, False)
loop = jax.eval_shape(lambda *a: eng._prefill(*a, **kw), *args)
mem = Engine._decode.lower(eng, eng.state, loop, jnp.int32(4), key, one, one,
                           skey=s.static_key(), stops=(1,)).compile().memory_analysis()
args, kw = prefill(24576, True)  # the bucket of 85 images x 256 soft tokens + text
long = Engine._prefill.lower(eng, *args, **kw).compile().memory_analysis()
print(json.dumps({"weights": mem.argument_size_in_bytes, "decode_temp": mem.temp_size_in_bytes,
                  "long_prefill_temp": long.temp_size_in_bytes}))
"""


@pytest.fixture(scope="module")
def compiled_4b_memory():
    """Compiled (never run) memory of the abstract bf16 4B decoder's programs, in a fresh
    process so that ``import medgemma_core`` comes before JAX starts."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", MEDGEMMA_JAX_CACHE="0")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", MEMORY], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_decode_loop_does_not_hold_float32_copies_of_the_weights(compiled_4b_memory):
    """XLA on CPUs computes bf16 products in float32. The compiled decode loop of the bf16 4B
    decoder must need scratch memory well under the weights' size: before the fix it held
    float32 copies of every weight and two of the embedding table (2x the weights, 15.7 GB),
    and answering with the 4B model ran out of 24 GB."""
    mem = compiled_4b_memory
    assert mem["weights"] > 7e9
    assert mem["decode_temp"] < 0.45 * mem["weights"], mem


def test_85_image_prefill_never_builds_a_full_score_matrix(compiled_4b_memory):
    """A 4B prefill of 24,576 tokens (85 images) with soft-token embeddings and image blocks
    attends in query blocks: its scratch stays under 12 GB, below even one layer's full
    f32 score tensor (8 heads x 24,576^2 x 4 bytes = 19.3 GB; unblocked it measures 68 GB)."""
    assert compiled_4b_memory["long_prefill_temp"] < 12e9, compiled_4b_memory


def test_a_late_import_is_detected_and_warned_about_for_bf16():
    """When JAX started before ``import medgemma_core`` the scheduler flag cannot apply: bf16
    loads on the CPU say so (one warning), float32 loads stay quiet."""
    import os
    import subprocess
    import sys

    script = (
        "import jax, jax.numpy as jnp\n"
        "jnp.zeros(1).block_until_ready()\n"
        "import medgemma_core\n"
        "from medgemma_core.api import _warn_if_cpu_scheduler_flag_late as warn\n"
        "print('late', medgemma_core.XLA_CPU_FLAG_LATE)\n"
        "warn('float32'); print('--', flush=True); warn('bfloat16')\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("MEDGEMMA_XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "late True" in proc.stdout
    warned = [line for line in proc.stderr.splitlines() if "scheduler is on" in line]
    assert len(warned) == 1 and "bfloat16" in warned[0]
