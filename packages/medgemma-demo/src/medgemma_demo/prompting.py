"""Chat turns -> the message list a :class:`~medgemma_demo.host.ChatModel` reads.

A user turn is the typed question followed by the parts of every attached sample, in order,
as :func:`medgemma_data.to_messages` builds it (images as ``uint8 [H, W, 3]`` items, the
plugins' text such as ``SLICE 3`` or a FHIR summary as text items). A text-only model gets the
text parts only; :func:`user_turn` reports how many images it left out so the page can say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medgemma_data import Sample, to_messages


@dataclass(frozen=True)
class Turn:
    """One user turn as sent to the model: ``content`` (str or items), images left out."""

    content: str | list[dict]
    dropped_images: int


def user_turn(text: str, samples: Sequence[Sample], *, multimodal: bool) -> Turn:
    """The user's ``text`` plus the attached ``samples``' parts.

    Multimodal: ``[{"type": "text"}, {"type": "image"}, ...]`` in sample order (one string
    when there is no image). Text-only: one string, the texts joined by blank lines; images
    (and their ``SLICE k`` labels) are left out and counted in ``dropped_images``.
    """
    [user] = to_messages(list(samples), text, images=multimodal)
    dropped = 0 if multimodal else sum(len(s.images) for s in samples)
    return Turn(user["content"], dropped)


def messages(system: str, history: Sequence[dict], turn: Turn) -> list[dict]:
    """``[system?] + history + [user turn]``; ``history`` alternates user / assistant."""
    out: list[dict] = []
    if system.strip():
        out.append({"role": "system", "content": system.strip()})
    out.extend(history)
    out.append({"role": "user", "content": turn.content})
    return out


# ---- base (not instruction-tuned) models: a completion-style prompt ----------------------

#: Prompt modes: the checkpoint's chat template, or the completion frame below.
CHAT, BASE = "chat", "base"

#: The completion frame for base models: a header, two worked examples (a free question and
#: a multiple-choice one), then the past turns and the new question, each as
#: ``Question: ...\nAnswer: ...``. The answer ends at a blank line or a new ``Question:``.
BASE_HEADER = ("The following are medical questions, each followed by a short, correct answer "
               "written by a physician.")
BASE_EXAMPLES = (
    ("What is hypertension?",
     "Hypertension is blood pressure that stays high, usually 130/80 mm Hg or more."),
    ("Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\n"
     "D. Vitamin D", "C. Vitamin C"),
)
#: Where a base model's answer ends (the text from there on is dropped).
BASE_STOPS = ("\n\n", "\nQuestion:", "\nQ:")


def _question_text(content: str | list[dict]) -> str:
    text = content if isinstance(content, str) else "\n\n".join(
        i["text"] for i in content if i.get("type") == "text")
    text = text.strip()
    # a QA file's text already starts with "Question:" (medgemma-data's qa plugin)
    return text[len("Question:"):].strip() if text.startswith("Question:") else text


def base_prompt(system: str, history: Sequence[dict], turn: Turn) -> str:
    """The completion prompt for a base model: the frame, the past turns, the new question.

    ``system`` becomes the first line (instead of :data:`BASE_HEADER`) when given. Images are
    not part of it (base checkpoints here are text-only)."""
    parts = [system.strip() or BASE_HEADER, ""]
    pairs = list(BASE_EXAMPLES)
    for user, assistant in zip(history[::2], history[1::2]):
        pairs.append((_question_text(user["content"]), str(assistant["content"]).strip()))
    for q, a in pairs:
        parts += [f"Question: {q}", f"Answer: {a}", ""]
    parts += [f"Question: {_question_text(turn.content)}", "Answer:"]
    return "\n".join(parts)


def cut_at_stop(text: str, stops: Sequence[str] = BASE_STOPS) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def held_back(text: str, stops: Sequence[str] = BASE_STOPS) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (kept back
    from a stream until the next piece decides)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best
