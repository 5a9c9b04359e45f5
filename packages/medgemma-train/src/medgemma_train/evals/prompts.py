"""Rendering a task's :class:`~medgemma_train.evals.spec.Prompt` for one item: the exact text.

The built-in templates (the README's "Prompts" section shows them rendered):

* multiple choice, ``loglik``: :data:`MCQ_LOGLIK` (MMLU: :data:`MMLU_LOGLIK`), continued by
  ``" {letter}"`` for each option, as lm-evaluation-harness' MMLU task;
* multiple choice, ``generate``: :data:`MCQ_GENERATE` (MMLU: :data:`MMLU_GENERATE`) as the user
  turn of the chat template;
* VQA: :data:`VQA_GENERATE`, the image after the text;
* CXR labels: :data:`CXR_LABELS_GENERATE`; zero-shot text per label: :data:`CXR_ZEROSHOT`;
* CXR report: :data:`CXR_REPORT_GENERATE`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .spec import EvalItem, EvalTask

MCQ_LOGLIK = ("The following are multiple choice questions (with answers) about medicine.\n\n"
              "Question: {question}\n{options}\nAnswer:")
MMLU_LOGLIK = ("The following are multiple choice questions (with answers) about {subject}.\n\n"
               "Question: {question}\n{options}\nAnswer:")
MCQ_GENERATE = ("Answer the following multiple choice question about medicine. Reply with "
                "the letter of the correct option.\n\nQuestion: {question}\n{options}")
MMLU_GENERATE = ("Answer the following multiple choice question about {subject}. Reply with "
                 "the letter of the correct option.\n\nQuestion: {question}\n{options}")
VQA_GENERATE = "{question}\nAnswer with a single word or a short phrase."
CXR_LABELS_GENERATE = ("Which of the following findings are present in this chest X-ray: "
                       "{labels}? List the findings that are present, separated by commas, "
                       "or answer \"No Finding\".")
CXR_ZEROSHOT = "chest x-ray showing {label}"
CXR_REPORT_GENERATE = "Write the findings section of a radiology report for this chest X-ray."


def options_text(options: Mapping[str, str]) -> str:
    """One ``X. text`` line per option, in letter order."""
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def fields(item: EvalItem, task: EvalTask) -> dict[str, Any]:
    """The placeholder values of ``item`` (see :class:`~medgemma_train.evals.spec.Prompt`)."""
    subject = str(item.meta.get("subject") or "medicine").replace("_", " ")
    return {"question": item.question, "options": options_text(item.options),
            "subject": subject, "labels": ", ".join(task.labels)}


def loglik_request(item: EvalItem, task: EvalTask) -> tuple[str, list[tuple[str, str]]]:
    """``(context, [(letter, continuation), ...])`` of a multiple-choice item."""
    values = fields(item, task)
    context = task.prompt.loglik.format(**values)
    conts = [(k, task.prompt.continuation.format(letter=k, text=v, **values))
             for k, v in item.options.items()]
    return context, conts


def user_text(item: EvalItem, task: EvalTask) -> str:
    return task.prompt.generate.format(**fields(item, task))


def messages(item: EvalItem, task: EvalTask,
             images: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The chat messages of ``item`` for the generate mode: an optional system message, then
    the user turn (text, then the images as image items)."""
    out: list[dict[str, Any]] = []
    if task.prompt.system:
        out.append({"role": "system", "content": task.prompt.system})
    text = user_text(item, task)
    if images:
        content: Any = [{"type": "text", "text": text},
                        *({"type": "image", "image": img} for img in images)]
    else:
        content = text
    out.append({"role": "user", "content": content})
    return out


def zeroshot_texts(task: EvalTask) -> list[str]:
    """The text each label is scored with (zeroshot mode)."""
    return [task.prompt.zeroshot.format(label=lab.lower()) for lab in task.labels]
