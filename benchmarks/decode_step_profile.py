"""Where one decode step of the embedded Gemma 3 270M goes, at 1 and 8 rows.

    python benchmarks/decode_step_profile.py [--parts step vocab sample hlo] [--rows 1 8]

The demo's prompts (the few-shot frame cached, the load test's questions) and sampling
(greedy, repetition penalty 1.2 and no repeated 3-grams over the answer). Parts:

- ``step``: one step of ``Engine.decode`` (a ``--steps`` loop, stop tokens off), per row count.
- ``vocab``: the vocabulary product ``[B, D] x [V, D]`` in several formulations, A/B in turn.
- ``sample``: the repetition control and the argmax over ``[B, V]`` logits alone.
- ``hlo``: what the compiled decode loop holds: its copies, transposes, dots and fusions.
- ``trace``: a profiler trace of the loop: seconds per step by op kind (thread time summed).
- ``copies``: the loop as compiled now against one without ``generate.DECODE_OPTIONS``.

Variants are measured alternately in the same process (round-robin, ``--rounds``), the best
(lowest CPU) kept: process CPU seconds (``time.process_time``, every thread) beside wall;
the load average before and after. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_load import QUESTIONS  # noqa: E402


def timed(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def ab(variants: dict, rounds: int, per: int = 1) -> dict:
    """Best (wall, CPU) seconds per call of each variant, measured round-robin."""
    best = {k: (float("inf"), float("inf")) for k in variants}
    for fn in variants.values():
        fn()  # compile
    for _ in range(rounds):
        for k, fn in variants.items():
            w, c = timed(fn)
            best[k] = min(best[k], (w / per, c / per), key=lambda x: x[1])
    return {k: [round(w, 4), round(c, 4)] for k, (w, c) in best.items()}


def demo_setup():
    from medgemma_core import Sampling, load
    from medgemma_demo.backends import CoreBackend
    from medgemma_demo.chat import REPETITION
    from medgemma_demo.prompting import BASE, Turn, base_prompt

    model = load(None)
    penalty, ngram = REPETITION[BASE]
    sampling = Sampling(repetition_penalty=penalty, no_repeat_ngram_size=ngram,
                        penalize_prompt=False)
    ids = [model.tokenizer.encode(base_prompt("", [], Turn(q, 0)), add_bos=True)
           for q in QUESTIONS[:8]]
    prefix = CoreBackend(model, BASE).prefix()
    return model, sampling, ids, prefix


def part_step(engine, sampling, ids, prefix, rows, steps, rounds):
    import jax

    def make(b):
        prompts = (ids * b)[:b]

        def run():
            st = engine.start(prompts, max_new_tokens=steps + 1, sampling=sampling,
                              ignore_eos=True, prefix=prefix)
            jax.block_until_ready(st.tokens)
            w, c = timed(lambda: jax.block_until_ready(engine.decode(st, steps + 1).tokens))
            run.last = (w, c)
        return run

    fns = {b: make(b) for b in rows}
    best = {b: (float("inf"), float("inf")) for b in rows}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for b, fn in fns.items():
            fn()
            w, c = fn.last
            best[b] = min(best[b], (w / steps, c / steps), key=lambda x: x[1])
    return {b: [round(w, 4), round(c, 4)] for b, (w, c) in best.items()}


def part_vocab(table, rows, rounds):
    """The [B, D] x [V, D] product, variants; each returns argmax ids (what the step uses) and
    is checked to give the same ids as the plain einsum."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    v, d = table.shape
    table_t = jax.block_until_ready(jnp.asarray(table.T))  # [D, V] copy (a layout variant)

    def plain(h, e):
        return jnp.einsum("bd,vd->bv", h, e)

    def flipped(h, e):  # [V, B] product, transposed after
        return jnp.einsum("vd,bd->vb", e, h).T

    def transposed(h, et):  # the table stored [D, V]
        return jnp.einsum("bd,dv->bv", h, et)

    def chunked(n):
        def f(h, e):
            parts = [jnp.einsum("bd,vd->bv", h, c) for c in jnp.split(e, n)]
            return jnp.concatenate(parts, axis=1)
        return f

    def mapped(n):
        def f(h, e):
            out = jax.lax.map(lambda c: jnp.einsum("bd,vd->bv", h, c), e.reshape(n, v // n, d))
            return jnp.moveaxis(out, 0, 1).reshape(h.shape[0], v)
        return f

    def per_row(h, e):  # B matrix-vector products
        return jnp.stack([jnp.einsum("d,vd->v", h[i], e) for i in range(h.shape[0])])

    forms = {"plain": (plain, table), "flipped": (flipped, table),
             "transposed_table": (transposed, table_t), "split8": (chunked(8), table),
             "split64": (chunked(64), table), "map16": (mapped(16), table),
             "map256": (mapped(256), table), "per_row": (per_row, table)}
    out = {}
    for b in rows:
        h = jax.random.normal(jax.random.key(b), (b, d), jnp.float32)
        ref = None
        variants = {}
        for name, (f, e) in forms.items():
            fn = jax.jit(lambda h, e, f=f: (jnp.argmax(f(h, e), -1), f(h, e)[:, :8]))
            got = jax.block_until_ready(fn(h, e))
            ref = got if ref is None else ref
            same = bool(np.array_equal(got[0], ref[0]))
            maxdiff = float(np.max(np.abs(np.asarray(got[1]) - np.asarray(ref[1]))))
            variants[name] = (lambda fn=fn, e=e, h=h: jax.block_until_ready(fn(h, e)))
            out.setdefault(b, {})[name + "_same_ids"] = [same, maxdiff]
        out[b]["times"] = ab(variants, rounds)
    return out


def part_sample(sampling, vocab, rows, rounds, hist_len=192):
    import jax
    import jax.numpy as jnp

    from medgemma_core.sampling import control_repetition, select

    out = {}
    skey = sampling.static_key()
    for b in rows:
        logits = jax.random.normal(jax.random.key(0), (b, vocab), jnp.float32)
        hist = jax.random.randint(jax.random.key(1), (b, hist_len), 0, vocab, jnp.int32)
        first = jnp.full((b,), 128, jnp.int32)
        end = jnp.int32(150)

        @jax.jit
        def both(logits, hist, first, end):
            lg = control_repetition(logits, hist, first, end, penalty=skey[3], ngram=skey[4])
            return select(lg, jax.random.key(0), 1.0, 1.0, greedy=True, top_k=0,
                          use_top_p=False)

        @jax.jit
        def argmax_only(logits):
            return jnp.argmax(logits, -1)

        args = (logits, hist, first, end)
        out[b] = ab({"control_and_argmax": lambda a=args: jax.block_until_ready(both(*a)),
                     "argmax": lambda a=args: jax.block_until_ready(argmax_only(a[0]))},
                    rounds)
    return out


def part_hlo(engine, sampling, ids, prefix, rows):
    import jax

    out = {}
    for b in rows:
        st = engine.start((ids * b)[:b], max_new_tokens=33, sampling=sampling, ignore_eos=True,
                          prefix=prefix)
        text = engine._decode.lower(engine, engine.state, st.carry, jax.numpy.int32(33), st.key,
                                    st.temperature, st.top_p, skey=sampling.static_key(),
                                    stops=st.stops).compile().as_text()
        ops = collections.Counter()
        big = []
        for line in text.splitlines():
            m = re.search(r"= (\S+?)\[?([\d,]*)\]?\{?[^ ]* (copy|transpose|dot|fusion|"
                          r"dynamic-update-slice|scatter|sort|while|custom-call)\(", line)
            if m:
                ops[m.group(3)] += 1
                shape = re.search(r"= \w+\[([\d,]+)\]", line)
                n = 1
                for x in (shape.group(1).split(",") if shape else []):
                    n *= int(x) if x else 1
                if m.group(3) in ("copy", "transpose") and n >= 1 << 16:
                    big.append(line.strip()[:200])
        out[b] = {"ops": dict(ops), "large_copies": big[:20], "hlo_chars": len(text)}
        Path(os.environ.get("HLO_DIR", "/tmp")).joinpath(f"decode_b{b}.hlo.txt").write_text(text)
    return out


def part_copies(model, sampling, ids, prefix, rows, steps, rounds):
    """The decode loop as compiled now (``generate.DECODE_OPTIONS``: copy insertion with
    region analysis) against the same loop without those options: copies in the compiled
    loop, same greedy ids, CPU seconds per step (A/B in turn)."""
    import jax
    import numpy as np

    from medgemma_core import Engine

    class Plain(Engine):
        _decode = jax.jit(Engine._decode.__wrapped__, static_argnames=("self", "skey", "stops"),
                          donate_argnums=(2,))

    now = model.engine
    plain = Plain(nnx_model(now), stop_ids=now.stop_ids, pad_id=now.pad_id)
    out = {}
    for b in rows:
        prompts = (ids * b)[:b]
        fns, toks, copies = {}, {}, {}
        for name, eng in (("plain", plain), ("region", now)):
            def run(eng=eng, name=name, prompts=prompts, toks=toks):
                st = eng.start(prompts, max_new_tokens=steps + 1, sampling=sampling,
                               ignore_eos=True, prefix=prefix)
                jax.block_until_ready(st.tokens)
                t, c = time.perf_counter(), time.process_time()
                st = eng.decode(st, steps + 1)
                toks[name] = np.asarray(st.tokens)
                run.last = ((time.perf_counter() - t) / steps,
                            (time.process_time() - c) / steps)
            run()
            st = eng.start(prompts, max_new_tokens=steps + 1, sampling=sampling,
                           ignore_eos=True, prefix=prefix)
            text = eng._decode.lower(eng, eng.state, st.carry, jax.numpy.int32(steps),
                                     st.key, st.temperature, st.top_p,
                                     skey=sampling.static_key(),
                                     stops=st.stops).compile().as_text()
            copies[name] = text.count(" copy(")
            fns[name] = run
        best = {k: (9.0, 9.0) for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                fn()
                best[k] = min(best[k], fn.last, key=lambda x: x[1])
        out[b] = {"copies": copies,
                  "same_ids": bool(np.array_equal(toks["plain"], toks["region"])),
                  "step_s": {k: [round(w, 4), round(c, 4)] for k, (w, c) in best.items()}}
    return out


def part_trace(engine, sampling, ids, prefix, rows, steps, folder="/tmp/dsp_trace"):
    """A profiler trace of one decode loop per row count (perfetto JSON): the thunks' total
    time by kind and the 12 costliest ops, per step."""
    import glob
    import gzip

    import jax

    out = {}
    for b in rows:
        prompts = (ids * b)[:b]
        st = engine.start(prompts, max_new_tokens=steps + 1, sampling=sampling,
                          ignore_eos=True, prefix=prefix)
        jax.block_until_ready(engine.decode(st, steps + 1).tokens)  # compiled
        st = engine.start(prompts, max_new_tokens=steps + 1, sampling=sampling,
                          ignore_eos=True, prefix=prefix)
        jax.block_until_ready(st.tokens)
        where = f"{folder}/b{b}"
        with jax.profiler.trace(where, create_perfetto_trace=True):
            jax.block_until_ready(engine.decode(st, steps + 1).tokens)
        path = sorted(glob.glob(f"{where}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(path))
        events = events["traceEvents"] if isinstance(events, dict) else events
        by_name: collections.Counter = collections.Counter()
        by_kind: collections.Counter = collections.Counter()
        for e in events:
            if e.get("ph") != "X" or "dur" not in e:
                continue
            name = e.get("name", "")
            by_name[name] += e["dur"] / 1e6 / steps
            kind = re.sub(r"[._]?\d+$", "", name)
            by_kind[kind] += e["dur"] / 1e6 / steps
        out[b] = {"by_kind": {k: round(v, 5) for k, v in by_kind.most_common(25)},
                  "top": {k: round(v, 5) for k, v in by_name.most_common(12)}}
    return out


def nnx_model(engine):
    from flax import nnx

    return nnx.merge(engine.graphdef, engine.state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["step", "vocab", "sample", "hlo"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    out: dict = {"loadavg": [os.getloadavg()], "xla_flags": os.environ.get("XLA_FLAGS", "")}
    model, sampling, ids, prefix = demo_setup()
    engine = model.engine
    if "hlo" in args.parts:
        out["hlo"] = part_hlo(engine, sampling, ids, prefix, args.rows)
    if "step" in args.parts:
        out["step_s"] = part_step(engine, sampling, ids, prefix, args.rows, args.steps,
                                  args.rounds)
    out["loadavg"].append(os.getloadavg())
    if "trace" in args.parts:
        out["trace"] = part_trace(engine, sampling, ids, prefix, args.rows, args.steps)
    if "copies" in args.parts:
        out["copies"] = part_copies(model, sampling, ids, prefix, args.rows, args.steps,
                                    args.rounds)
    if "sample" in args.parts:
        out["sample_s"] = part_sample(sampling, engine.config.vocab_size, args.rows, args.rounds)
    if "vocab" in args.parts:
        from flax import nnx

        table = nnx.merge(engine.graphdef, engine.state).embedding[...]
        out["vocab_s"] = part_vocab(table, args.rows, args.rounds)
    out["loadavg"].append(os.getloadavg())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
