"""The three scoring modes: items -> records (the rows of ``items.jsonl``).

Every record has ``id``, ``mode``, ``prompt`` (the exact text the model saw), ``gold``,
``parsed`` (the answer taken from the model), ``correct`` (None for reports) and ``meta``.
``loglik`` adds ``options``: per option its ``letter``, ``continuation`` text,
``continuation_ids``, summed ``loglik`` and ``greedy``; ``generate`` adds ``output`` (the raw
decoded text, thinking included) and ``output_tokens``; ``zeroshot`` adds ``scores``
(label -> sigmoid probability). An item whose image cannot be read becomes a record with
``skipped`` (the reason) and no answer; it is counted, never scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .metrics import normalize_answer
from .parse import parse_choice, parse_labels, parse_short, strip_thinking
from .prompts import loglik_request, messages, zeroshot_texts
from .spec import EvalError, EvalItem, EvalTask

Record = dict[str, Any]


class Scorer(Protocol):
    """Scores a chunk of items of one task (``chunk``: items per call)."""

    mode: str
    chunk: int

    def score(self, items: Sequence[EvalItem], task: EvalTask) -> list[Record]: ...


def _base(item: EvalItem, mode: str) -> Record:
    gold: Any = list(item.gold) if isinstance(item.gold, tuple) else item.gold
    return {"id": item.id, "mode": mode, "where": item.where, "gold": gold,
            "meta": dict(item.meta)}


def judge(task: EvalTask, item: EvalItem, output: str) -> tuple[Any, bool | None]:
    """``(parsed, correct)`` of a generated answer, by the task's kind."""
    if task.kind == "mcq":
        letter = parse_choice(output, item.options)
        return letter, letter == item.gold
    if task.kind == "vqa":
        short = parse_short(output, str(item.gold))
        return short, normalize_answer(short) == normalize_answer(str(item.gold))
    if task.kind == "multilabel":
        found = parse_labels(output, task.labels)
        return list(found), set(found) == set(item.gold)
    return (strip_thinking(output) or "").strip(), None


def _images(item: EvalItem) -> tuple[list[Any] | None, str]:
    from medgemma_data import MedgemmaDataError

    try:
        return item.load_images(), ""
    except (MedgemmaDataError, OSError, ValueError) as exc:
        return None, f"image unreadable: {exc}"


def _skipped(item: EvalItem, mode: str, reason: str) -> Record:
    return {**_base(item, mode), "skipped": reason, "parsed": None, "correct": None}


class LoglikMode:
    """``loglik``: every option's continuation scored in batched forwards; the answer is the
    option with the highest summed log-likelihood (the first on ties)."""

    mode = "loglik"

    def __init__(self, model: Any, *, batch_size: int = 8):
        from .loglik import LoglikScorer

        self.scorer = LoglikScorer(model, batch_size=batch_size)
        self.chunk = 4 * self.scorer.batch_size

    def score(self, items: Sequence[EvalItem], task: EvalTask) -> list[Record]:
        requests = [loglik_request(item, task) for item in items]
        pairs = [(ctx, cont) for ctx, conts in requests for _, cont in conts]
        results = iter(self.scorer.score(pairs))
        records = []
        for item, (ctx, conts) in zip(items, requests):
            options = []
            for letter, cont in conts:
                r = next(results)
                options.append({"letter": letter, "continuation": cont,
                                "continuation_ids": r.continuation_ids, "loglik": r.loglik,
                                "greedy": r.greedy})
            best = max(range(len(options)), key=lambda i: (options[i]["loglik"], -i))
            parsed = options[best]["letter"]
            records.append({**_base(item, self.mode), "prompt": ctx, "bos": True,
                            "options": options, "parsed": parsed,
                            "correct": parsed == item.gold})
        return records


class GenerateMode:
    """``generate``: greedy answers through ``MedGemma.chat_completions`` (``batch_size``
    conversations per call; a short last batch is padded with copies so that it reuses the
    compiled shapes), then the task's parser."""

    mode = "generate"

    def __init__(self, model: Any, *, batch_size: int = 8, max_new_tokens: int | None = None):
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = max_new_tokens
        self.chunk = self.batch_size

    def score(self, items: Sequence[EvalItem], task: EvalTask) -> list[Record]:
        from medgemma_core.chat import format_chat

        records: list[Record | None] = [None] * len(items)
        convs, where = [], []
        for n, item in enumerate(items):
            images, why = _images(item)
            if images is None:
                records[n] = _skipped(item, self.mode, why)
                continue
            if images and not self.model.is_multimodal:
                raise EvalError(f"task {task.name} has images but the checkpoint is text-only; "
                                "load a MedGemma image-text checkpoint (e.g. medgemma-4b-it)")
            convs.append(messages(item, task, images))
            where.append(n)
        if convs:
            padded = convs + [convs[-1]] * (-len(convs) % self.batch_size)
            done = self.model.chat_completions(
                padded, max_new_tokens=self.max_new_tokens or task.max_new_tokens)
            stops = set(self.model.engine.stop_ids)
            for n, conv, completion in zip(where, convs, done):
                ids = [int(t) for t in completion.token_ids]
                raw = self.model.tokenizer.decode([t for t in ids if t not in stops])
                parsed, correct = judge(task, items[n], raw)
                records[n] = {**_base(items[n], self.mode), "prompt": format_chat(conv),
                              "output": raw, "output_tokens": ids, "parsed": parsed,
                              "correct": correct}
        return records  # type: ignore[return-value]


class ZeroShotMode:
    """``zeroshot``: MedSigLIP's sigmoid probability of each label's text
    (:data:`~medgemma_train.evals.prompts.CXR_ZEROSHOT`) for each image; ``parsed`` holds the
    labels at probability >= 0.5."""

    mode = "zeroshot"

    def __init__(self, model: Any, *, batch_size: int = 8):
        self.model = model
        self.chunk = max(1, int(batch_size))

    def score(self, items: Sequence[EvalItem], task: EvalTask) -> list[Record]:
        texts = zeroshot_texts(task)
        records: list[Record | None] = [None] * len(items)
        images, where = [], []
        for n, item in enumerate(items):
            got, why = _images(item)
            if got is None or len(got) != 1:
                records[n] = _skipped(item, self.mode, why or "zeroshot needs one image")
                continue
            images.append(got[0])
            where.append(n)
        if images:
            probs = self.model.zero_shot(images, texts)
            for n, row in zip(where, probs):
                scores = {lab: float(p) for lab, p in zip(task.labels, row)}
                parsed = [lab for lab in task.labels if scores[lab] >= 0.5]
                records[n] = {**_base(items[n], self.mode), "prompt": texts,
                              "scores": scores, "parsed": parsed,
                              "correct": set(parsed) == set(items[n].gold)}
        return records  # type: ignore[return-value]
