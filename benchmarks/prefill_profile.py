"""Where the forward pass's time goes: a jax.profiler trace of the jitted
``Gemma3(tokens, logits_at="last")`` on the real 270M shapes (random weights; ``--layers`` of
them, default one 5-local + 1-global period), batch 1, float32; XLA ops aggregated by name
(their summed durations on every thread, and the share of the total). Prints a table; with
``--hlo FILE`` also writes the optimized HLO text.

    python benchmarks/prefill_profile.py --tokens 512 [--layers 6] [--repeats 3] [--top 30]
        [--set LOCAL_BLOCK=128]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--hlo", default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=INT",
                    help="override medgemma_core.attention block constants, e.g. LOCAL_BLOCK=128")
    args = ap.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from medgemma_core import Gemma3, Gemma3Config, attention

    for item in args.set:
        name, value = item.split("=")
        setattr(attention, name, int(value))

    cfg = Gemma3Config.gemma3_270m()
    cfg = dataclasses.replace(cfg, num_layers=args.layers,
                              layer_types=cfg.layer_types[:args.layers])
    graphdef, state = nnx.split(Gemma3(cfg, rngs=nnx.Rngs(0)))
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, logits_at="last")[0])
    ids = np.random.default_rng(0).integers(3, 260_000, (1, args.tokens)).astype(np.int32)
    lowered = fwd.lower(state, ids)
    compiled = lowered.compile()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
    jax.block_until_ready(compiled(state, ids))
    walls = []
    cpu = time.process_time()
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(state, ids))
        walls.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(args.repeats):
            jax.block_until_ready(compiled(state, ids))
    path = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    what = _what(compiled.as_text())
    totals, by_what = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name not in what:
            continue  # host events, and containers (while, conditional) whose ops count apart
        us = e["dur"] / args.repeats
        totals[re.sub(r"\.\d+$", "", name)] += us
        by_what[what[name]] += us
    whole = sum(totals.values())
    print(json.dumps({"tokens": args.tokens, "layers": args.layers,
                      "wall_s_median": round(sorted(walls)[len(walls) // 2], 4),
                      "cpu_s_per_run": round(cpu / args.repeats, 3),
                      "op_time_ms_per_run": round(whole / 1000, 1),
                      "set": args.set, "load": [round(x, 2) for x in os.getloadavg()]}))
    print("-- by XLA op kind")
    for name, us in totals.most_common(args.top):
        print(f"{us / 1000:9.2f} ms {100 * us / whole:5.1f}%  {name}")
    print("-- by the JAX operation that made it (HLO metadata op_name of the fusion's root)")
    for name, us in by_what.most_common(args.top):
        print(f"{us / 1000:9.2f} ms {100 * us / whole:5.1f}%  {name}")


def _what(hlo: str) -> dict[str, str]:
    """Instruction name -> "root opcode: JAX op_name" for every instruction that is not a
    container (while, conditional, call), from the optimized HLO text."""
    roots = {}  # fused computation -> (root opcode, op_name)
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^%(\S+) \(", line)
        if head:
            current = head.group(1)
        m = re.match(r"\s*ROOT %\S+ = \S+ ([\w-]+)\(.*?(?:op_name=\"([^\"]*)\")?", line)
        if m and current:
            roots[current] = (m.group(1), m.group(2) or "")
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = .*? ([\w-]+)\((.*)$", hlo, re.M):
        name, op, rest = m.groups()
        if op in ("while", "conditional", "call", "parameter", "get-tuple-element", "tuple",
                  "constant", "bitcast"):
            continue
        meta = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"calls=%([^,\s]+)", rest)
        if called and called.group(1) in roots:
            op, root_meta = roots[called.group(1)]
            label = root_meta or (meta.group(1) if meta else "")
        else:
            label = meta.group(1) if meta else ""
        label = re.sub(r"^jit\([^)]*\)/", "", label)
        out[name] = f"{op}: {label}"
    return out


if __name__ == "__main__":
    main()
