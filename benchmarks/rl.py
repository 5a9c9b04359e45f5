"""GRPO's generation step against transformers' batched ``generate``, and the time split of an
RL step (rollout / reference forward / policy update), on the real Gemma 3 270M (CPU).

Prompts: the first ``--prompts`` MedQA fixture questions (cut to ``--question-chars``) as
chat turns, each repeated ``--group`` times (G = 8): ``P * G`` rows in one batch. Both sides
sample at temperature 1 with no top-k / top-p and produce exactly ``--new`` tokens per row
(end of turn ignored), from the same token ids, in float32, in the same process one after the
other (torch on every core). Ours is the ``rl`` stage's sampler
(:class:`medgemma_train.engine.rl.Roller`: medgemma-core's compiled prefill and decode loop);
its first call (compile) is reported apart. Rollout tokens/s = ``P * G * new`` / the median of
``--repeats`` timed calls.

Then ``medgemma-train rl`` runs ``--steps`` steps (LoRA r=16, the ``letter`` reward) on the
same prompts and the median per-step seconds of rollout, reference forward and update (after
the first step, which compiles) are read from its ``metrics.jsonl``. Prints one JSON object.

    python benchmarks/rl.py [--prompts 2] [--group 8] [--new 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "qa" / "medqa_sampled_50.jsonl"


def _rows(n: int, chars: int) -> list[dict]:
    out = []
    for line in DATA.read_text().splitlines()[:n]:
        item = json.loads(line)
        q = item.get("question") or item.get("sent1") or ""
        opts = item.get("options") or {}
        text = q[:chars] + "\n" + "\n".join(f"{k}. {v}" for k, v in sorted(opts.items()))
        gold = item.get("answer_idx") or item.get("answer") or "A"
        out.append({"messages": [{"role": "user", "content": text + "\nAnswer with a letter."},
                                 {"role": "assistant", "content": str(gold)}]})
    return out


def _hf_folder(gguf: str, cache: Path) -> Path:
    folder = cache / "gemma3-270m-hf"
    if not (folder / "config.json").is_file():
        from medgemma_core.checkpoints.export import load_any, save_hf

        save_hf(load_any(gguf, "float32"), folder, source=gguf, overwrite=True)
    return folder


def ours_rollout(gguf: str, rows: list[dict], a: argparse.Namespace) -> tuple[dict, list]:
    import jax

    from medgemma_core.checkpoints.export import load_any
    from medgemma_train.engine.rl import Prompt, RLSettings, Roller
    from medgemma_train.engine.sft import _processor

    model = load_any(gguf, "float32")
    model.eval()
    roller = Roller(model, _processor(Path(gguf), False), False, 0)
    roller.refresh(model)
    prompts = [Prompt(r["messages"][:1], "", {}) for r in rows]
    s = RLSettings(group_size=a.group, max_new_tokens=a.new)
    roller.engine.stop_ids = ()  # exactly --new tokens per row, as min_new_tokens on theirs
    t0 = time.perf_counter()
    batch, completions, _ = roller(prompts, a.group, s, seed=0)
    first = time.perf_counter() - t0
    times = []
    for i in range(a.repeats):
        t0 = time.perf_counter()
        batch, completions, _ = roller(prompts, a.group, s, seed=i + 1)
        jax.effects_barrier()
        times.append(time.perf_counter() - t0)
    tokens = sum(len(c) for c in completions)
    med = statistics.median(times)
    return ({"first_call_s": first, "median_s": med, "tokens": tokens,
             "compile_s": max(first - med, 0.0), "tokens_per_s": tokens / med},
            [list(r.input_ids) for r in batch])


def theirs_rollout(hf: Path, ids: list[list[int]], a: argparse.Namespace) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    t = max(len(r) for r in ids)
    pad = 0
    x = torch.full((len(ids), t), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, r in enumerate(ids):
        x[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    kw = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              max_new_tokens=a.new, min_new_tokens=a.new, pad_token_id=pad)
    times = []
    with torch.inference_mode():
        model.generate(x, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for i in range(a.repeats):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            out = model.generate(x, **kw)
            times.append(time.perf_counter() - t0)
    tokens = int((out.shape[1] - t) * out.shape[0])
    med = statistics.median(times)
    return {"median_s": med, "tokens": tokens, "tokens_per_s": tokens / med}


def rl_steps(gguf: str, data: Path, a: argparse.Namespace, tmp: Path) -> dict:
    import contextlib

    from medgemma_train.cli import main

    out = tmp / "rlrun"
    argv = ["rl", "--checkpoint", gguf, "--data", str(data), "--out", str(out),
            "--max-steps", str(a.steps), "--lora-rank", "16", "--seq-len", str(a.seq),
            "--no-progress", "--set", f"rl.group_size={a.group}",
            "--set", f"rl.prompts_per_step={a.prompts}", "--set", f"rl.max_new_tokens={a.new}",
            "--set", "rl.rewards=[letter]", "--set", "run.tensorboard=false"]
    with contextlib.redirect_stdout(sys.stderr):  # the command's summary line: not our JSON
        code = main(argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    later = rows[1:] or rows
    split = {k: statistics.median(r[k] for r in later)
             for k in ("rollout_s", "reference_s", "update_s")}
    return {"code": code, "steps": len(rows), "median_after_first": split,
            "first_step": {k: rows[0][k] for k in split},
            "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--question-chars", type=int, default=300)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-steps", action="store_true", help="only the rollout comparison")
    ap.add_argument("--skip-rollout", action="store_true", help="only the RL step time split")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "medgemma-train-bench"))
    ap.add_argument("--checkpoint", default="", help="another model (default: the real 270M)")
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from medgemma_core import default_checkpoint, enable_compilation_cache

    enable_compilation_cache()
    gguf = a.checkpoint or str(default_checkpoint())
    cache = Path(a.cache) / (Path(a.checkpoint).name if a.checkpoint else "")
    cache.mkdir(parents=True, exist_ok=True)
    rows = _rows(a.prompts, a.question_chars)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_start": os.getloadavg(),
              "settings": {"prompts": a.prompts, "group": a.group, "new_tokens": a.new,
                           "rows": a.prompts * a.group, "dtype": "float32"}}
    if not a.skip_rollout:
        mine, ids = ours_rollout(gguf, rows, a)
        result["prompt_tokens"] = [len(r) for r in ids[::a.group]]
        peer = theirs_rollout(_hf_folder(gguf, cache), ids, a)
        result["rollout"] = {"medgemma_rl": mine, "transformers_generate": peer,
                             "speedup": mine["tokens_per_s"] / peer["tokens_per_s"]}
        print(json.dumps({"rollout": result["rollout"]}), file=sys.stderr, flush=True)
    if not a.skip_steps:
        with tempfile.TemporaryDirectory() as d:
            data = Path(d) / "prompts.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            result["rl_step"] = rl_steps(gguf, data, a, Path(d))
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
