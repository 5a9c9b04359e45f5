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
