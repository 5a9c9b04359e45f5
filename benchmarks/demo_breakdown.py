"""Where a demo batch's time goes: the embedded Gemma 3 270M in base mode, 1 vs 8 rows.

    python benchmarks/demo_breakdown.py [--rows 1 8] [--steps 32]

The demo's own prompts (the few-shot "Question: ... Answer:" frame around the load test's
questions) and sampling (repetition control over the answer). For each row count: the
prefill of whole prompts and with the frame's cached KV (``Engine.cache_prefix``), one
decode step (from a ``--steps`` loop, stop tokens off), and the vocabulary projection alone
(``[B, 640] x [640, 262144]``, what a decode step spends on logits). Also each question's
answer length in tokens (where the demo's stop strings end it): a batch decodes until its
longest row ends. Best of 3, wall and process CPU seconds; the load average beside them.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_load import QUESTIONS  # noqa: E402


def best(fn, repeat=3):
    """Best (wall, CPU) seconds of ``repeat`` calls."""
    out = (float("inf"), float("inf"))
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out = min(out, (time.perf_counter() - t, time.process_time() - c))
    return [round(x, 4) for x in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from medgemma_core import Sampling, load
    from medgemma_core.layers import vocab_projection
    from medgemma_demo.backends import CoreBackend
    from medgemma_demo.chat import REPETITION
    from medgemma_demo.prompting import BASE, BASE_STOPS, Turn, base_prompt, cut_at_stop

    load_avg = [os.getloadavg()]
    model = load(None)
    engine, tok = model.engine, model.tokenizer
    penalty, ngram = REPETITION[BASE]
    sampling = Sampling(repetition_penalty=penalty, no_repeat_ngram_size=ngram,
                        penalize_prompt=False)
    texts = [base_prompt("", [], Turn(q, 0)) for q in QUESTIONS[:8]]
    ids = [tok.encode(t, add_bos=True) for t in texts]
    backend = CoreBackend(model, BASE)
    prefix = backend.prefix()
    out: dict = {"prompt_tokens": [len(i) for i in ids], "prefix_tokens": len(prefix.tokens),
                 "prefill_s": {}, "prefill_cached_s": {}, "decode_step_s": {},
                 "logits_s": {}, "answer_tokens": None}
    emb = nnx_embedding(engine)
    project = jax.jit(lambda h, e: jnp.argmax(vocab_projection(h, e), -1))
    for b in args.rows:
        rows = (ids * b)[:b]

        def prefill(pre=None, rows=rows):
            jax.block_until_ready(engine.start(rows, max_new_tokens=128, sampling=sampling,
                                               prefix=pre).tokens)

        prefill()
        prefill(prefix)  # compile both
        out["prefill_s"][b] = best(prefill)
        out["prefill_cached_s"][b] = best(lambda: prefill(prefix))

        def decode(rows=rows):
            state = engine.start(rows, max_new_tokens=args.steps + 1, sampling=sampling,
                                 ignore_eos=True, prefix=prefix)
            jax.block_until_ready(state.tokens)
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(engine.decode(state, args.steps + 1).tokens)
            return time.perf_counter() - t, time.process_time() - c

        decode()
        runs = [decode() for _ in range(3)]
        out["decode_step_s"][b] = [round(min(r[0] for r in runs) / args.steps, 4),
                                   round(min(r[1] for r in runs) / args.steps, 4)]
        h = jnp.ones((b, engine.config.hidden_size), jnp.float32)
        jax.block_until_ready(project(h, emb))
        out["logits_s"][b] = best(lambda h=h: jax.block_until_ready(project(h, emb)))
        load_avg.append(os.getloadavg())
    gen = engine.generate(ids, max_new_tokens=128, sampling=sampling, prefix=prefix)
    lengths = []
    for row in gen.token_ids:
        dec, text, n = tok.stream_decoder(), "", len(row)
        for k, t in enumerate(row):
            text += dec.feed(t)
            if cut_at_stop(text, BASE_STOPS)[1]:
                n = k + 1
                break
        lengths.append(n)
    out["answer_tokens"] = lengths
    out["loadavg"] = load_avg
    print(json.dumps(out, indent=1))


def nnx_embedding(engine):
    from flax import nnx

    return nnx.merge(engine.graphdef, engine.state).embedding[...]


if __name__ == "__main__":
    main()
