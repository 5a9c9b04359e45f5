"""Where a training step's CPU time goes, and A/B timing of step variants in one process.

The step is ``benchmarks/train_step.py``'s (forward, backward and an AdamW update, float32,
``medgemma_core.next_token_loss``), on the Gemma 3 270M shapes with random weights and
``--layers`` of its layers (default one 5-local + 1-global period; ``--labelled N``: loss on
each row's last N tokens only, as an SFT answer), full fine-tuning or LoRA
r=16 on every decoder projection. Each ``--variant`` is compiled once; then the variants run
alternately (A B A B ...) for ``--rounds`` rounds, and each one's process CPU seconds and wall
seconds per step are reported (medians) with the load average. ``--trace`` profiles the first
variant with ``jax.profiler`` and aggregates its XLA ops by kind and by the JAX operation that
made them (as ``benchmarks/prefill_profile.py`` does).

A variant is a comma-separated list of settings (or ``default``):
``xla:NAME=VALUE`` (an XLA option for that compile, e.g.
``xla:xla_cpu_experimental_onednn_fusion_type=dot``) or ``set:module.attr=VALUE`` (a module
constant set while that variant is traced, e.g. ``set:medgemma_core.attention.QUERY_BLOCK=256``;
VALUE is parsed as a Python literal, or ``@module.attr`` names another object).

    python benchmarks/train_step_profile.py --mode lora --layers 6 --batch 2 --seq 512 \
        --variant default --variant xla:xla_cpu_use_onednn=true --rounds 3 [--trace] [--hlo DIR]
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import glob
import gzip
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _parse(variant: str) -> tuple[dict, list]:
    xla, sets = {}, []
    if variant == "default":
        return xla, sets
    for item in variant.split(","):
        kind, _, rest = item.partition(":")
        name, _, value = rest.partition("=")
        if kind == "xla":
            xla[name] = value
        elif kind == "set":
            mod, _, attr = name.rpartition(".")
            if value.startswith("@"):  # another object: @module.attr
                owner, _, obj = value[1:].rpartition(".")
                val = getattr(importlib.import_module(owner), obj)
            else:
                try:
                    val = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    val = value
            sets.append((mod, attr, val))
        else:
            raise SystemExit(f"variant item {item!r}: start it with xla: or set:")
    return xla, sets


@contextlib.contextmanager
def _patched(sets):
    old = []
    for mod, attr, val in sets:
        m = importlib.import_module(mod)
        old.append((m, attr, getattr(m, attr)))
        setattr(m, attr, val)
    try:
        yield
    finally:
        for m, attr, val in reversed(old):
            setattr(m, attr, val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--labelled", type=int, default=0,
                    help="label only each row's last N tokens (an SFT answer; 0: every token)")
    ap.add_argument("--variant", action="append", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--hlo", default=None, help="folder: each variant's optimized HLO text")
    args = ap.parse_args()
    variants = args.variant or ["default"]

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from medgemma_core import Gemma3, Gemma3Config, lora, next_token_loss
    from medgemma_core.training import TrainBatch

    cfg = Gemma3Config.gemma3_270m()
    cfg = dataclasses.replace(cfg, num_layers=args.layers,
                              layer_types=cfg.layer_types[:args.layers])
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256_000, size=(args.batch, args.seq), dtype=np.int32)
    tokens[:, 0] = 2
    labels = tokens.copy()
    if args.labelled:
        labels[:, :-args.labelled] = -100
    batch = TrainBatch(tokens=jnp.asarray(tokens), labels=jnp.asarray(labels),
                       attention_mask=jnp.ones(tokens.shape, jnp.int32))
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

    def build(sets):
        model = Gemma3(cfg, rngs=nnx.Rngs(0))
        if args.mode == "lora":
            lora.apply_lora(model, lora.LoRAConfig(rank=16, alpha=16, dropout=args.dropout),
                            rngs=nnx.Rngs(0))
            wrt = lora.trainable_filter(model, decoder="lora")
            if args.dropout:
                model.train()
        else:
            wrt = nnx.Param
        graphdef, trainable, rest = nnx.split(model, wrt, ...)

        def loss_fn(trainable, rest, batch):
            total, n = next_token_loss(nnx.merge(graphdef, trainable, rest), batch,
                                       chunk=args.chunk)
            return total / n

        def step(trainable, opt_state, rest, batch):
            loss, grads = jax.value_and_grad(loss_fn)(trainable, rest, batch)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        return step, trainable, tx.init(trainable), rest

    runs = []
    for i, v in enumerate(variants):
        xla, sets = _parse(v)
        with _patched(sets):
            step, trainable, opt_state, rest = build(sets)
            t = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, rest,
                                                                batch)
            compiled = lowered.compile(compiler_options=xla or None)
            compile_s = time.perf_counter() - t
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if args.hlo:
            os.makedirs(args.hlo, exist_ok=True)
            with open(os.path.join(args.hlo, f"variant{i}.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
        state = {"t": trainable, "o": opt_state, "rest": rest, "f": compiled, "loss": None}
        runs.append({"variant": v, "state": state, "walls": [], "cpus": [],
                     "compile_s": round(compile_s, 1),
                     "gflops": round(cost.get("flops", float("nan")) / 1e9, 1),
                     "temp_mb": round(compiled.memory_analysis().temp_size_in_bytes / 2**20)})

    def one(r):
        s = r["state"]
        s["t"], s["o"], loss = s["f"](s["t"], s["o"], s["rest"], batch)
        s["loss"] = float(jax.block_until_ready(loss))

    for r in runs:  # warm-up
        one(r)
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for r in runs:
            t, c = time.perf_counter(), time.process_time()
            one(r)
            r["walls"].append(time.perf_counter() - t)
            r["cpus"].append(time.process_time() - c)
        loads.append(os.getloadavg()[0])
    ntok = args.batch * args.seq
    print(json.dumps({"mode": args.mode, "layers": args.layers, "batch": args.batch,
                      "seq": args.seq, "load1": [round(x, 2) for x in loads]}))
    for r in runs:
        cpu = statistics.median(r["cpus"])
        print(json.dumps({"variant": r["variant"], "cpu_s": round(cpu, 3),
                          "cpu_s_all": [round(x, 2) for x in r["cpus"]],
                          "wall_s": round(statistics.median(r["walls"]), 3),
                          "tok_per_cpu_s": round(ntok / cpu, 1),
                          "gflop_per_cpu_s": round(r["gflops"] / cpu, 1),
                          "gflops": r["gflops"], "temp_mb": r["temp_mb"],
                          "compile_s": r["compile_s"], "loss": r["state"]["loss"]}))
    if args.trace:
        _trace(runs[0], one, args.top)


def _trace(run, one, top: int) -> None:
    import jax
    from prefill_profile import _what

    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        one(run)
    path = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    what = _what(run["state"]["f"].as_text())
    import re

    totals, by_what = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name not in what:
            continue
        totals[re.sub(r"\.\d+$", "", name)] += e["dur"]
        by_what[what[name]] += e["dur"]
    whole = sum(totals.values())
    print(f"-- op time {whole / 1e6:.2f} s (summed over threads), by XLA op kind")
    for name, us in totals.most_common(top):
        print(f"{us / 1000:9.1f} ms {100 * us / whole:5.1f}%  {name}")
    print("-- by the JAX operation that made it (HLO op_name of the fusion's root)")
    for name, us in by_what.most_common(top):
        print(f"{us / 1000:9.1f} ms {100 * us / whole:5.1f}%  {name[:150]}")


if __name__ == "__main__":
    main()
