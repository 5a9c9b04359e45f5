"""The independent references: lm-evaluation-harness (transformers backend) given our exact
prompts through a custom task YAML, and transformers' greedy generate."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def lm_eval_loglik(model: Any, tokenizer: Any, rows: list[dict[str, Any]], folder: Path, *,
                   batch_size: int = 4) -> dict[str, list[float]]:
    """``{id: [loglik of each choice]}`` from lm-eval's ``multiple_choice`` output type.

    ``rows``: ``{"id", "prompt", "choices", "gold"}``; lm-eval builds each request as
    ``(doc_to_text, target_delimiter + choice)``: with ``target_delimiter: ""`` the choices
    are our continuations exactly (``" A"``), and ``doc_to_text`` is our prompt exactly."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"medgemma_ours_{folder.name}".replace("-", "_")
    (folder / "task.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=True, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder)))
    samples = out["samples"][name]
    for s in samples:  # the prompt lm-eval scored is ours, character for character
        assert s["arguments"][0][0] == s["doc"]["prompt"]
    return {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}


def mcq_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval rows from our loglik records (prompt and continuations as we scored them)."""
    return [{"id": r["id"], "prompt": r["prompt"],
             "choices": [o["continuation"] for o in r["options"]],
             "gold": [o["letter"] for o in r["options"]].index(r["gold"])} for r in records]


def hf_greedy(model: Any, tokenizer: Any, prompt_text: str, n: int,
              stops: tuple[int, ...] = (1, 106)) -> list[int]:
    """transformers' greedy ids for the exact prompt text (it starts with ``<bos>``, so no
    special tokens are added), cut after the first stop token."""
    import torch

    ids = tokenizer(prompt_text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False, eos_token_id=list(stops),
                             pad_token_id=0)
    row = out[0, ids.shape[1]:].tolist()
    for i, tok in enumerate(row):
        if tok in stops:
            return row[:i + 1]
    return row
