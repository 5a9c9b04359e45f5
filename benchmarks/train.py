"""`medgemma-train sft` against transformers' Trainer (+ peft) on the real Gemma 3 270M.

Both sides train on the same rows (the 50 MedQA fixture items as chat turns, loss on the
answers), at the same sequence length (every row padded to ``--seq``), batch, learning rate
schedule (2e-4, warmup 3%, linear decay), max grad norm 0.3 and AdamW, in float32 on the CPU:
full fine-tuning and LoRA r=16 (alpha 16, dropout 0.05; ours on every decoder projection,
peft's ``all-linear``, which leaves out the tied head as we do). Each run is its own
subprocess, so its peak resident memory is its own.

Reported per run: tokens/s (real, non-padding input tokens per second over the median step
after the first ``--warmup`` steps: ours from ``metrics.jsonl``, theirs from a Trainer
callback), compile time (ours: the first step's time less a median step), peak RSS, and the
first and last training losses. Ours includes its whole pipeline (reading, tokenizing,
collating); theirs gets rows we tokenized. Prints one JSON object.

    python benchmarks/train.py [--seq 256] [--batch 4] [--steps 8] [--modes full lora]

``--modes siglip pretrain``: the stage rows of ``benchmarks/train_stages.py`` (a random
SigLIP against transformers' SiglipModel with the sigmoid loss in torch; the tiny image-text
model against Gemma3ForConditionalGeneration), same batches, same run. ``pretrain-memory``:
the planned peak memory of a pretrain step per row length (1 to 85 images), remat on / off.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "qa" / "medqa_sampled_50.jsonl"

OURS = r"""
import json, resource, sys
from medgemma_train.cli import main
code = main(sys.argv[2:])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "code": code}), file=open(sys.argv[1], "w"))
"""

THEIRS = r"""
import json, math, resource, statistics, sys, time
import torch, transformers
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
rows = json.load(open(args["rows"]))
model = transformers.AutoModelForCausalLM.from_pretrained(args["hf"], dtype=torch.float32,
                                                          attn_implementation="eager")
if args["mode"] == "lora":
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
data = [{k: torch.tensor(v) for k, v in r.items()} for r in rows]
times, losses = [], []
class Clock(transformers.TrainerCallback):
    def on_step_begin(self, a, s, c, **kw): self.t = time.perf_counter()
    def on_step_end(self, a, s, c, **kw): times.append(time.perf_counter() - self.t)
    def on_log(self, a, s, c, logs=None, **kw):
        if logs and "loss" in logs: losses.append(logs["loss"])
targs = transformers.TrainingArguments(
    output_dir=args["tmp"], per_device_train_batch_size=args["batch"], max_steps=args["steps"],
    learning_rate=2e-4, lr_scheduler_type="linear", max_grad_norm=0.3,
    warmup_steps=math.ceil(0.03 * args["steps"]),
    weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
    dataloader_num_workers=0, seed=0, remove_unused_columns=False)
trainer = transformers.Trainer(model=model, args=targs, train_dataset=data,
                               data_collator=lambda b: {k: torch.stack([r[k] for r in b])
                                                        for k in b[0]}, callbacks=[Clock()])
trainer.train()
w = args["warmup"]
tokens = statistics.mean(sum(r["attention_mask"]) for r in rows) * args["batch"]
step = statistics.median(times[w:] or times)
print(json.dumps({"tokens_per_s": tokens / step, "step_s": step, "first_loss": losses[0],
                  "last_loss": losses[-1],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _hf_folder(gguf: str, cache: Path) -> Path:
    folder = cache / "gemma3-270m-hf"
    if not (folder / "config.json").is_file():
        from medgemma_core.checkpoints.export import load_any, save_hf

        save_hf(load_any(gguf, "float32"), folder, source=gguf, overwrite=True)
    return folder


def _rows(gguf: str, seq: int, path: Path) -> Path:
    """Our tokenization of the fixture, padded to ``seq``: what the torch side trains on."""
    from medgemma_train.engine.config import SourceConfig
    from medgemma_train.engine.data import read_source
    from medgemma_train.engine.pipeline import Encoder
    from medgemma_train.engine.sft import _processor

    src = read_source(SourceConfig(path=str(DATA)))
    enc = Encoder(_processor(Path(gguf), False), seq_len=seq, slots=0, image_text=False,
                  mask_prompt=True)
    # rows whose answer is cut off at ``seq`` are bad rows: ours drops them (--skip-bad), so do we
    kept = [ex for ex in src.examples if not enc.cut_problem(enc.token_ids(ex))]
    b = enc(kept, 1)
    rows = [{"input_ids": b["tokens"][0, i].tolist(), "labels": b["labels"][0, i].tolist(),
             "attention_mask": b["attention_mask"][0, i].tolist()}
            for i in range(len(kept))]
    path.write_text(json.dumps(rows))
    return path


def ours(gguf: str, mode: str, a: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"ours-{mode}"
    stats = tmp / f"ours-{mode}.json"
    cmd = [sys.executable, "-c", OURS, str(stats), "sft", "--checkpoint", gguf, "--data",
           str(DATA), "--out", str(out), "--max-steps", str(a.steps), "--batch-size",
           str(a.batch), "--seq-len", str(a.seq), "--lora-rank", "16" if mode == "lora" else "0",
           "--no-progress", "--skip-bad", "--set", "data.mask_prompt=true", "--set", "run.save_every=0",
           "--set", "run.keep_best=0", "--set", f"model.loss_chunk={a.chunk}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"medgemma-train side failed: {run.stderr[-2000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    times = [b["time"] - p["time"] for p, b in zip(train, train[1:])]
    step = statistics.median(times[max(0, a.warmup - 1):] or times)
    tokens = statistics.mean(r["input_tokens"] for r in train)
    return {"tokens_per_s": tokens / step, "step_s": step,
            "compile_s": max(0.0, train[0]["time"] - step), "first_loss": train[0]["loss"],
            "last_loss": train[-1]["loss"], **json.loads(stats.read_text())}


def theirs(hf: Path, rows: Path, mode: str, a: argparse.Namespace, tmp: Path) -> dict:
    spec = {"hf": str(hf), "rows": str(rows), "mode": mode, "batch": a.batch, "steps": a.steps,
            "warmup": a.warmup, "threads": a.threads, "tmp": str(tmp / f"hf-{mode}")}
    out = subprocess.run([sys.executable, "-c", THEIRS, json.dumps(spec)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"transformers side failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--modes", nargs="+", default=["full", "lora", "siglip", "pretrain"],
                    choices=["full", "lora", "siglip", "pretrain", "pretrain-memory"])
    ap.add_argument("--memory-images", type=int, nargs="+", default=[1, 8, 32, 85])
    ap.add_argument("--siglip-width", type=int, default=256)
    ap.add_argument("--siglip-layers", type=int, default=4)
    ap.add_argument("--pretrain-seq", type=int, default=64)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "medgemma-train-bench"))
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from medgemma_core import default_checkpoint

    sft_modes = [m for m in a.modes if m in ("full", "lora")]
    gguf = str(default_checkpoint()) if sft_modes else ""
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    hf = _hf_folder(gguf, cache) if sft_modes else None
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_start": os.getloadavg(),
              "settings": {"seq": a.seq, "batch": a.batch, "steps": a.steps, "dtype": "float32"},
              "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = _rows(gguf, a.seq, tmp / "rows.json") if sft_modes else None
        for mode in a.modes:
            if mode in ("siglip", "pretrain", "pretrain-memory"):
                sys.path.insert(0, str(Path(__file__).parent))
                import train_stages

                if mode == "pretrain-memory":
                    result["runs"][mode] = train_stages.memory_rows(a)
                    continue
                row = train_stages.siglip_row if mode == "siglip" else train_stages.pretrain_row
                result["runs"][mode] = row(a, tmp, OURS)
                continue
            mine = ours(gguf, mode, a, tmp)
            peer = theirs(hf, rows, mode, a, tmp)
            result["runs"][mode] = {"medgemma_train": mine, "transformers_trainer": peer,
                                    "speedup": mine["tokens_per_s"] / peer["tokens_per_s"]}
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
